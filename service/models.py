"""The tables, as SQLAlchemy 2 mapped classes. Alembic migrations are the schema's source."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    SmallInteger,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class JobStatus(enum.StrEnum):
    """The gateway's own job states (see DESIGN.md: the job's life)."""

    queued = "queued"
    submitting = "submitting"
    running = "running"
    finalizing = "finalizing"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"

    @property
    def terminal(self) -> bool:
        """True for the three states a job never leaves."""
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.canceled})
ACTIVE = tuple(s for s in JobStatus if s not in TERMINAL)


class ApiKey(Base):
    """A client's or admin's key; only its hash is stored."""

    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    owner: Mapped[str] = mapped_column(String(100), nullable=False, index=True)
    role: Mapped[str] = mapped_column(String(16), nullable=False)
    key_hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    prefix: Mapped[str] = mapped_column(String(16), nullable=False)
    # Kept in the clear: signing a webhook needs the secret itself (Standard Webhooks).
    webhook_secret: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Admission: at most this many of the key's jobs at Wiro at once (None: no own limit).
    max_in_flight: Mapped[int | None] = mapped_column(Integer)
    # Submits allowed per window, in the ``limits`` notation ("10/second", "600/minute").
    submit_rate_limit: Mapped[str | None] = mapped_column(String(32))
    # Monthly (UTC calendar month) spend at Wiro this key may reach; None: no budget.
    budget_usd: Mapped[Decimal | None] = mapped_column(Numeric(14, 6))
    # When the 80 % warning last went out: at most one per key per month.
    budget_warned_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        CheckConstraint("role IN ('client','admin')", name="role"),
        CheckConstraint(
            "max_in_flight IS NULL OR max_in_flight >= 1", name="max_in_flight_positive"
        ),
        CheckConstraint("budget_usd IS NULL OR budget_usd >= 0", name="budget_non_negative"),
    )


class IdempotencyKey(Base):
    """A client's Idempotency-Key and the job (and answer) it produced, kept 24 h."""

    __tablename__ = "idempotency_keys"

    owner: Mapped[str] = mapped_column(String(100), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    job_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False
    )
    response: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now(), index=True
    )


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    owner: Mapped[str] = mapped_column(String(100), nullable=False)
    api_key_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("api_keys.id", ondelete="SET NULL")
    )
    # Which webhook events the client wants for this job; None means all of them.
    webhook_events: Mapped[list[str] | None] = mapped_column(JSONB)
    prompt: Mapped[str] = mapped_column(Text, nullable=False)
    steps: Mapped[int] = mapped_column(Integer, nullable=False)
    scale: Mapped[Decimal] = mapped_column(Numeric(6, 3), nullable=False)
    webhook_url: Mapped[str | None] = mapped_column(Text)
    # -1 low, 0 normal, 1 high: orders one owner's queued jobs, never across owners.
    priority: Mapped[int] = mapped_column(SmallInteger, nullable=False, server_default="0")
    metadata_: Mapped[dict[str, Any]] = mapped_column(
        "metadata", JSONB, nullable=False, server_default=text("'{}'::jsonb")
    )
    # Set when a worker claims the job for Run; only the hash of the token is kept.
    callback_token_hash: Mapped[str | None] = mapped_column(String(64))

    wiro_taskid: Mapped[str | None] = mapped_column(String(64), unique=True)
    wiro_socket_token: Mapped[str | None] = mapped_column(String(128))
    wiro_status: Mapped[str | None] = mapped_column(String(40))
    wiro_outputs: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONB)
    wiro_cost: Mapped[Decimal | None] = mapped_column(Numeric(18, 12))

    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)

    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    # When a task message was last sent for this job; the sweep re-sends stale ones.
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Set just before the Run request leaves: from then on Wiro may hold a task for us.
    run_sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Last word from Wiro about this job (callback, poll); drives the sweep's polling.
    last_news_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    next_poll_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    poll_count: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    cancel_requested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The client's Cancel-After as an instant: past it the job is canceled wherever it is.
    deadline_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # A task to stop at Wiro (cancel, deadline, timeout): when the sweep tries next; NULL
    # when there is nothing to stop. It outlives the job's end until Wiro confirms.
    wiro_stop_next_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    wiro_stop_attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    # Wiro accepted a Cancel or Kill: from then on the job can no longer succeed.
    wiro_stop_accepted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # WIRO_DELETE_AFTER_COPY: when to try Task/InputOutputDelete next (NULL: nothing to do),
    # how often it was tried, and when Wiro confirmed the deletion.
    wiro_delete_next_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    wiro_delete_attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    wiro_deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Live progress from Wiro's websocket (service/progress.py): shown, never decisive.
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    progress_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    inputs: Mapped[list[JobInput]] = relationship(
        back_populates="job", order_by="JobInput.position"
    )
    outputs: Mapped[list[JobOutput]] = relationship(
        back_populates="job", order_by="JobOutput.position"
    )
    events: Mapped[list[JobEvent]] = relationship(back_populates="job", order_by="JobEvent.id")

    __table_args__ = (
        CheckConstraint(
            "status IN ('queued','submitting','running','finalizing',"
            "'succeeded','failed','canceled')",
            name="valid",
        ),
        CheckConstraint("priority IN (-1, 0, 1)", name="priority"),
        Index("ix_jobs_created_at_id", "created_at", "id"),
        Index(
            "ix_jobs_running_next_poll",
            "next_poll_at",
            postgresql_where=text("status = 'running'"),
        ),
        Index("ix_jobs_owner_created_at_id", "owner", "created_at", "id"),
        Index("ix_jobs_key_created_at", "api_key_id", "created_at"),
        Index(
            "ix_jobs_wiro_delete_due",
            "wiro_delete_next_at",
            postgresql_where=text("wiro_delete_next_at IS NOT NULL"),
        ),
        Index("ix_jobs_status_created_at", "status", "created_at"),
        Index(
            "ix_jobs_in_flight_owner",
            "owner",
            postgresql_where=text("status IN ('submitting', 'running')"),
        ),
        Index(
            "ix_jobs_queued_owner_priority",
            "owner",
            text("priority DESC"),
            "created_at",
            "id",
            postgresql_where=text("status = 'queued'"),
        ),
        Index(
            "ix_jobs_in_flight_key",
            "api_key_id",
            postgresql_where=text("status IN ('submitting', 'running')"),
        ),
        Index(
            "ix_jobs_finished_at",
            "finished_at",
            postgresql_where=text("status = 'succeeded' AND run_sent_at IS NOT NULL"),
        ),
        Index(
            "ix_jobs_deadline_active",
            "deadline_at",
            postgresql_where=text(
                "deadline_at IS NOT NULL AND status IN ('queued', 'submitting', 'running')"
            ),
        ),
        Index(
            "ix_jobs_running_run_sent",
            "run_sent_at",
            postgresql_where=text("status = 'running'"),
        ),
        Index(
            "ix_jobs_wiro_stop_due",
            "wiro_stop_next_at",
            postgresql_where=text("wiro_stop_next_at IS NOT NULL"),
        ),
        Index(
            "ix_jobs_active_updated",
            "status",
            "updated_at",
            postgresql_where=text("status IN ('queued','submitting','running','finalizing')"),
        ),
    )


class JobInput(Base):
    """One input image in the order given; an uploaded file in S3 or a URL passed through."""

    __tablename__ = "job_inputs"

    job_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(8), nullable=False)  # "file" | "url"
    url: Mapped[str | None] = mapped_column(Text)
    s3_key: Mapped[str | None] = mapped_column(Text)
    filename: Mapped[str | None] = mapped_column(Text)
    content_type: Mapped[str | None] = mapped_column(String(100))
    size: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))
    # A small JPEG made at intake (service/thumbnails.py), for /ops; None for URLs.
    thumb_key: Mapped[str | None] = mapped_column(Text)

    job: Mapped[Job] = relationship(back_populates="inputs")


class JobOutput(Base):
    """One output image, copied from Wiro's URL into S3."""

    __tablename__ = "job_outputs"

    job_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    s3_key: Mapped[str] = mapped_column(Text, nullable=False)
    filename: Mapped[str] = mapped_column(Text, nullable=False)
    content_type: Mapped[str] = mapped_column(String(100), nullable=False)
    size: Mapped[int] = mapped_column(BigInteger, nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    source_url: Mapped[str] = mapped_column(Text, nullable=False)
    # A small JPEG made at finalize (service/thumbnails.py), for /ops.
    thumb_key: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )

    job: Mapped[Job] = relationship(back_populates="outputs")


class JobEvent(Base):
    """One row per state change (or notable fact): the job's timeline."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False, index=True
    )
    at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.clock_timestamp()
    )
    from_status: Mapped[str | None] = mapped_column(String(16))
    to_status: Mapped[str | None] = mapped_column(String(16))
    kind: Mapped[str] = mapped_column(String(32), nullable=False, server_default="transition")
    detail: Mapped[dict[str, Any]] = mapped_column(
        JSONB, nullable=False, server_default=text("'{}'::jsonb")
    )

    job: Mapped[Job] = relationship(back_populates="events")


class WebhookMessage(Base):
    """One webhook to send: a job event a client wants to hear about, with its frozen body.

    ``job_event_id`` is unique, so dispatching the same event twice makes one message; its
    ``msg_id`` is the ``webhook-id`` header of every attempt.
    """

    __tablename__ = "webhook_messages"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    msg_id: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    job_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False, index=True
    )
    job_event_id: Mapped[int] = mapped_column(
        ForeignKey("job_events.id", ondelete="CASCADE"), nullable=False, unique=True
    )
    event_type: Mapped[str] = mapped_column(String(32), nullable=False)
    url: Mapped[str] = mapped_column(Text, nullable=False)
    # The raw JSON body, byte for byte as sent on every attempt.
    body: Mapped[str] = mapped_column(Text, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, server_default="pending")
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )

    deliveries: Mapped[list[WebhookDelivery]] = relationship(
        back_populates="message", order_by="WebhookDelivery.attempt"
    )

    __table_args__ = (
        CheckConstraint("status IN ('pending','delivered','failed')", name="status"),
        Index(
            "ix_webhook_messages_pending_next",
            "next_attempt_at",
            postgresql_where=text("status = 'pending'"),
        ),
    )


class WiroAdmission(Base):
    """The one row of the adaptive in-flight limit (service/admission.py)."""

    __tablename__ = "wiro_admission"
    __table_args__ = (
        CheckConstraint("id = 1", name="one_row"),
        CheckConstraint("limit_in_force >= 1", name="limit_positive"),
    )

    id: Mapped[int] = mapped_column(SmallInteger, primary_key=True, autoincrement=False)
    limit_in_force: Mapped[int] = mapped_column(Integer, nullable=False)
    successes: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    # The limit in force when Wiro last refused a Run; reaching it again is a rare probe.
    ceiling: Mapped[int | None] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    # Wiro refuses our account (credentials or balance) since then; NULL when it does not.
    account_refused_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    account_reason: Mapped[str | None] = mapped_column(String(16))
    account_message: Mapped[str | None] = mapped_column(Text)
    account_refusals: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    # While refused, no probe Run before this instant.
    account_probe_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class WiroStatusSeen(Base):
    """A status Wiro reported that none of its documented lists names (WIRO.md)."""

    __tablename__ = "wiro_statuses_seen"

    status: Mapped[str] = mapped_column(String(64), primary_key=True)
    first_seen: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    last_seen: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    count: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="1")


class WebhookDelivery(Base):
    """One attempt to deliver a webhook message, whatever its outcome."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    message_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("webhook_messages.id", ondelete="CASCADE"), nullable=False, index=True
    )
    attempt: Mapped[int] = mapped_column(Integer, nullable=False)
    status_code: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    # At most the first 1 KiB of the response body.
    response_excerpt: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.clock_timestamp()
    )

    message: Mapped[WebhookMessage] = relationship(back_populates="deliveries")
