"""Deadlines (Cancel-After, task timeout), stopping tasks at Wiro until it confirms,
account refusals (credentials, balance) that pause admission, and unknown Wiro statuses

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 23:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ACTIVE_AT_WIRO = "status IN ('queued', 'submitting', 'running')"


def upgrade() -> None:
    # The client's Cancel-After, as an instant; the sweep finds passed ones by index.
    op.add_column("jobs", sa.Column("deadline_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_jobs_deadline_active",
        "jobs",
        ["deadline_at"],
        postgresql_where=sa.text(f"deadline_at IS NOT NULL AND {ACTIVE_AT_WIRO}"),
    )
    # WIRO_TASK_TIMEOUT_S counts from the Run: running jobs by when it left.
    op.create_index(
        "ix_jobs_running_run_sent",
        "jobs",
        ["run_sent_at"],
        postgresql_where=sa.text("status = 'running'"),
    )
    # A task to stop at Wiro (a cancel, a deadline, a timeout) until Wiro confirms or the
    # task ends; NULL when there is nothing to stop. It may outlive the job's own end.
    op.add_column(
        "jobs", sa.Column("wiro_stop_next_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column(
        "jobs",
        sa.Column("wiro_stop_attempts", sa.Integer(), server_default="0", nullable=False),
    )
    op.add_column(
        "jobs", sa.Column("wiro_stop_accepted_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.create_index(
        "ix_jobs_wiro_stop_due",
        "jobs",
        ["wiro_stop_next_at"],
        postgresql_where=sa.text("wiro_stop_next_at IS NOT NULL"),
    )
    # Wiro refusing our account pauses admission for everyone, with one probe at a time.
    op.add_column(
        "wiro_admission",
        sa.Column("account_refused_since", sa.DateTime(timezone=True), nullable=True),
    )
    op.add_column("wiro_admission", sa.Column("account_reason", sa.String(16), nullable=True))
    op.add_column("wiro_admission", sa.Column("account_message", sa.Text(), nullable=True))
    op.add_column(
        "wiro_admission",
        sa.Column("account_refusals", sa.Integer(), server_default="0", nullable=False),
    )
    op.add_column(
        "wiro_admission",
        sa.Column("account_probe_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "wiro_statuses_seen",
        sa.Column("status", sa.String(64), primary_key=True),
        sa.Column(
            "first_seen", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column(
            "last_seen", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("count", sa.BigInteger(), server_default="1", nullable=False),
        sa.PrimaryKeyConstraint("status", name="pk_wiro_statuses_seen"),
    )


def downgrade() -> None:
    op.drop_table("wiro_statuses_seen")
    for column in (
        "account_probe_at",
        "account_refusals",
        "account_message",
        "account_reason",
        "account_refused_since",
    ):
        op.drop_column("wiro_admission", column)
    op.drop_index("ix_jobs_wiro_stop_due", table_name="jobs")
    op.drop_column("jobs", "wiro_stop_accepted_at")
    op.drop_column("jobs", "wiro_stop_attempts")
    op.drop_column("jobs", "wiro_stop_next_at")
    op.drop_index("ix_jobs_running_run_sent", table_name="jobs")
    op.drop_index("ix_jobs_deadline_active", table_name="jobs")
    op.drop_column("jobs", "deadline_at")
