"""Thumbnails of inputs and outputs for the /ops console.

Revision ID: 0008_ops
Revises: 0008_usage
Create Date: 2026-12-02 07:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_ops"
down_revision: str | None = "0008_usage"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("job_inputs", sa.Column("thumb_key", sa.Text(), nullable=True))
    op.add_column("job_outputs", sa.Column("thumb_key", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("job_outputs", "thumb_key")
    op.drop_column("job_inputs", "thumb_key")
