"""Per-job priority, per-key admission limits, and the AIMD ceiling

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26 17:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # -1 low, 0 normal, 1 high: orders one owner's queued jobs (not across owners).
    op.add_column(
        "jobs", sa.Column("priority", sa.SmallInteger(), server_default="0", nullable=False)
    )
    op.create_check_constraint("priority", "jobs", "priority IN (-1, 0, 1)")
    # Admission and queue_position walk one owner's queue in priority order.
    op.drop_index("ix_jobs_queued_owner_created", table_name="jobs")
    op.create_index(
        "ix_jobs_queued_owner_priority",
        "jobs",
        ["owner", sa.text("priority DESC"), "created_at", "id"],
        postgresql_where=sa.text("status = 'queued'"),
    )
    op.create_index(
        "ix_jobs_in_flight_key",
        "jobs",
        ["api_key_id"],
        postgresql_where=sa.text("status IN ('submitting', 'running')"),
    )
    op.create_index(
        "ix_jobs_finished_at",
        "jobs",
        ["finished_at"],
        postgresql_where=sa.text("status = 'succeeded' AND run_sent_at IS NOT NULL"),
    )
    op.add_column("api_keys", sa.Column("max_in_flight", sa.Integer(), nullable=True))
    op.add_column("api_keys", sa.Column("submit_rate_limit", sa.String(32), nullable=True))
    op.create_check_constraint(
        "max_in_flight_positive", "api_keys", "max_in_flight IS NULL OR max_in_flight >= 1"
    )
    # The limit in force Wiro last refused at: probing up to it again is rare.
    op.add_column("wiro_admission", sa.Column("ceiling", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column("wiro_admission", "ceiling")
    op.drop_constraint("ck_api_keys_max_in_flight_positive", "api_keys", type_="check")
    op.drop_column("api_keys", "submit_rate_limit")
    op.drop_column("api_keys", "max_in_flight")
    op.drop_index("ix_jobs_finished_at", table_name="jobs")
    op.drop_index("ix_jobs_in_flight_key", table_name="jobs")
    op.drop_index("ix_jobs_queued_owner_priority", table_name="jobs")
    op.create_index(
        "ix_jobs_queued_owner_created",
        "jobs",
        ["owner", "created_at", "id"],
        postgresql_where=sa.text("status = 'queued'"),
    )
    op.drop_constraint("ck_jobs_priority", "jobs", type_="check")
    op.drop_column("jobs", "priority")
