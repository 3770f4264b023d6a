"""API keys, job owners, idempotency keys, and NOTIFY on every job event

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 13:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("owner", sa.String(length=100), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("webhook_secret", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"),
                  nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("role IN ('client','admin')", name=op.f("ck_api_keys_role")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
    )
    op.create_index(op.f("ix_api_keys_owner"), "api_keys", ["owner"])

    op.add_column("jobs", sa.Column("owner", sa.String(length=100), nullable=False,
                                    server_default=""))
    op.alter_column("jobs", "owner", server_default=None)
    op.add_column("jobs", sa.Column("api_key_id", sa.UUID(), nullable=True))
    op.create_foreign_key(op.f("fk_jobs_api_key_id_api_keys"), "jobs", "api_keys",
                          ["api_key_id"], ["id"], ondelete="SET NULL")
    op.add_column("jobs", sa.Column("webhook_events", postgresql.JSONB(), nullable=True))
    op.create_index("ix_jobs_owner_created_at_id", "jobs", ["owner", "created_at", "id"])

    op.create_table(
        "idempotency_keys",
        sa.Column("owner", sa.String(length=100), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("job_id", sa.UUID(), nullable=False),
        sa.Column("response", postgresql.JSONB(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"),
                  nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"],
                                name=op.f("fk_idempotency_keys_job_id_jobs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("owner", "key", name=op.f("pk_idempotency_keys")),
    )
    op.create_index(op.f("ix_idempotency_keys_created_at"), "idempotency_keys", ["created_at"])

    # Waiters (Prefer: wait, SSE) listen on one connection per gateway process instead of
    # polling: every timeline row announces itself when its transaction commits.
    op.execute(
        """
        CREATE FUNCTION notify_job_event() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          PERFORM pg_notify('job_events', NEW.job_id::text || ':' || NEW.id::text);
          RETURN NEW;
        END $$;
        CREATE TRIGGER job_events_notify AFTER INSERT ON job_events
          FOR EACH ROW EXECUTE FUNCTION notify_job_event();
        """
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER job_events_notify ON job_events; DROP FUNCTION notify_job_event();")
    op.drop_index(op.f("ix_idempotency_keys_created_at"), table_name="idempotency_keys")
    op.drop_table("idempotency_keys")
    op.drop_index("ix_jobs_owner_created_at_id", table_name="jobs")
    op.drop_column("jobs", "webhook_events")
    op.drop_constraint(op.f("fk_jobs_api_key_id_api_keys"), "jobs", type_="foreignkey")
    op.drop_column("jobs", "api_key_id")
    op.drop_column("jobs", "owner")
    op.drop_index(op.f("ix_api_keys_owner"), table_name="api_keys")
    op.drop_table("api_keys")
