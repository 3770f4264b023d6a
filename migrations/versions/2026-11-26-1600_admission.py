"""Admission to Wiro: the adaptive in-flight limit, and an index for admission passes

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 16:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "wiro_admission",
        sa.Column("id", sa.SmallInteger(), nullable=False),
        sa.Column("limit_in_force", sa.Integer(), nullable=False),
        sa.Column("successes", sa.Integer(), server_default="0", nullable=False),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.CheckConstraint("id = 1", name=op.f("ck_wiro_admission_one_row")),
        sa.CheckConstraint("limit_in_force >= 1", name=op.f("ck_wiro_admission_limit_positive")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_wiro_admission")),
    )
    # Admission counts jobs in flight per owner and ranks queued jobs per owner.
    op.create_index(
        "ix_jobs_in_flight_owner",
        "jobs",
        ["owner"],
        postgresql_where=sa.text("status IN ('submitting', 'running')"),
    )
    op.create_index(
        "ix_jobs_queued_owner_created",
        "jobs",
        ["owner", "created_at", "id"],
        postgresql_where=sa.text("status = 'queued'"),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_queued_owner_created", table_name="jobs")
    op.drop_index("ix_jobs_in_flight_owner", table_name="jobs")
    op.drop_table("wiro_admission")
