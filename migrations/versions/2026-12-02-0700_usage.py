"""Usage and budgets per key, and deleting a task's files at Wiro after the copy

Revision ID: 0008_usage
Revises: 0007
Create Date: 2026-12-02 07:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_usage"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A key's monthly budget in USD (NULL: none) and when its 80 % warning last went out.
    op.add_column("api_keys", sa.Column("budget_usd", sa.Numeric(14, 6), nullable=True))
    op.add_column(
        "api_keys", sa.Column("budget_warned_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.create_check_constraint(
        op.f("ck_api_keys_budget_non_negative"),
        "api_keys",
        "budget_usd IS NULL OR budget_usd >= 0",
    )
    # A submit sums its key's month: jobs by key and creation time.
    op.create_index("ix_jobs_key_created_at", "jobs", ["api_key_id", "created_at"])
    # WIRO_DELETE_AFTER_COPY: the next try of Task/InputOutputDelete, until it worked or
    # gave up; NULL when there is nothing to delete.
    op.add_column(
        "jobs", sa.Column("wiro_delete_next_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column(
        "jobs",
        sa.Column("wiro_delete_attempts", sa.Integer(), server_default="0", nullable=False),
    )
    op.add_column("jobs", sa.Column("wiro_deleted_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_jobs_wiro_delete_due",
        "jobs",
        ["wiro_delete_next_at"],
        postgresql_where=sa.text("wiro_delete_next_at IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_wiro_delete_due", table_name="jobs")
    op.drop_column("jobs", "wiro_deleted_at")
    op.drop_column("jobs", "wiro_delete_attempts")
    op.drop_column("jobs", "wiro_delete_next_at")
    op.drop_index("ix_jobs_key_created_at", table_name="jobs")
    op.drop_constraint(op.f("ck_api_keys_budget_non_negative"), "api_keys", type_="check")
    op.drop_column("api_keys", "budget_warned_at")
    op.drop_column("api_keys", "budget_usd")
