"""Partial index for the sweep's due polls; every running job gets a next_poll_at

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 15:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The sweep now selects on next_poll_at alone; running jobs from before need one.
    op.execute(
        "UPDATE jobs SET next_poll_at = now() WHERE status = 'running' AND next_poll_at IS NULL"
    )
    op.create_index(
        "ix_jobs_running_next_poll",
        "jobs",
        ["next_poll_at"],
        postgresql_where=sa.text("status = 'running'"),
    )


def downgrade() -> None:
    op.drop_index(
        "ix_jobs_running_next_poll",
        table_name="jobs",
        postgresql_where=sa.text("status = 'running'"),
    )
