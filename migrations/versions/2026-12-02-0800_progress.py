"""Live progress of a task at Wiro, from its websocket

Revision ID: 0009_progress
Revises: 0008_ops
Create Date: 2026-12-02 08:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0009_progress"
down_revision: str | None = "0008_ops"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # {"percentage", "step", "steps", "eta_s"} from Wiro's socket; only ever shown.
    op.add_column("jobs", sa.Column("progress", postgresql.JSONB(), nullable=True))
    op.add_column("jobs", sa.Column("progress_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "progress_at")
    op.drop_column("jobs", "progress")
