"""The job state machine and the job table's queries.

Every state change is one statement: a guarded UPDATE of ``jobs`` and the INSERT of its
``job_events`` row, chained in a CTE. A transition whose guard fails changes nothing and
returns ``None``; callers then stop quietly, which is what makes duplicate callbacks,
polls racing callbacks and redelivered Celery messages harmless.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Literal, NamedTuple, NotRequired, TypedDict, Unpack

import psycopg
import structlog
from psycopg.rows import dict_row
from sqlalchemy import (
    ClauseElement,
    ColumnElement,
    Float,
    String,
    bindparam,
    cast,
    delete,
    func,
    insert,
    literal,
    literal_column,
    select,
    text,
    update,
)
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.postgresql import psycopg as postgresql_psycopg
from sqlalchemy.orm import Session, selectinload
from sqlalchemy.orm.attributes import set_committed_value

from service import metrics, tracing, uow
from service.models import ACTIVE, TERMINAL, Job, JobEvent, JobInput, JobOutput, JobStatus

S = JobStatus

# Who may move a job where. A transition not listed here is a bug, not a race.
# failed -> queued is the one way out of a terminal state, and only an admin takes it
# (POST /v1/admin/jobs/{id}/retry, pipeline.retry): a new attempt of the same job, its
# timeline kept. No worker, callback or sweep ever moves a job out of failed.
ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    S.submitting: frozenset({S.queued}),
    # Run certainly refused, or never sent; or an admin's retry of a failed job.
    S.queued: frozenset({S.submitting, S.failed}),
    S.running: frozenset({S.submitting}),
    S.finalizing: frozenset({S.running, S.submitting}),
    S.succeeded: frozenset({S.finalizing}),
    S.failed: frozenset({S.queued, S.submitting, S.running, S.finalizing}),
    S.canceled: frozenset({S.queued, S.submitting, S.running}),
}


class IllegalTransition(ValueError):
    """A caller asked for a move the state machine does not have."""


@dataclass(frozen=True)
class Moved:
    """What a transition that happened did: the state left, the state entered, its event."""

    from_status: JobStatus
    to_status: JobStatus
    event_id: int
    job_id: uuid.UUID
    # The job has a webhook URL: only then can the move make a webhook message.
    hooked: bool = True


@dataclass(frozen=True)
class NewInput:
    """An input image as accepted by the API, before it is stored."""

    kind: str  # "file" | "url"
    url: str | None = None
    s3_key: str | None = None
    filename: str | None = None
    content_type: str | None = None
    size: int | None = None
    sha256: str | None = None


# A job's priority as the API names it, and as stored (higher goes first within an owner).
PRIORITIES = {"low": -1, "normal": 0, "high": 1}
PRIORITY_NAMES = {v: k for k, v in PRIORITIES.items()}


@dataclass(frozen=True)
class Origin:
    """Where a job came from: its request id and trace context (its first event's detail)."""

    request_id: str | None
    trace: dict[str, str] | None


# An admission pass's claim, set-based: every candidate still queued moves to
# submitting, each with its event, and comes back with its origin, in one statement
# rather than a transition per job and a read of the origins (PERFORMANCE.md, round 8).
# The guard is the transition's (status = 'queued', re-checked under each row's lock);
# the sweep's clock for "claimed but the Run never left" starts at enqueued_at.
# ``ADMIT_MOVES`` is the claim as CTEs (``moved``, ``event``) over ``{picks}``, a query of
# job ids and their order (id, ord), with ``{detail}`` the events' detail as an SQL
# expression; ``ADMITTED`` reads what it claimed. admission's pass embeds both in its own
# statement (service/admission.py).
ADMIT_MOVES = """
    moved AS (
        UPDATE jobs SET status = 'submitting', updated_at = now(), enqueued_at = now(),
            callback_token_hash = NULL, run_sent_at = NULL
        FROM ({picks}) AS pick
        WHERE jobs.id = pick.id AND jobs.status = 'queued'
        RETURNING jobs.id, pick.ord, jobs.webhook_url IS NOT NULL AS hooked
    ),
    event AS (
        INSERT INTO job_events (job_id, from_status, to_status, kind, detail)
        SELECT id, 'queued', 'submitting', 'transition', {detail} FROM moved
        RETURNING id, job_id
    )"""
ADMITTED = """
    SELECT e.id, e.job_id, m.hooked, m.ord, first.detail AS origin
    FROM event e JOIN moved m ON m.id = e.job_id
    LEFT JOIN LATERAL (
        SELECT f.detail FROM job_events f
        WHERE f.job_id = e.job_id AND f.from_status IS NULL AND f.kind = 'transition'
        ORDER BY f.id LIMIT 1
    ) first ON true"""
_ADMIT = text(
    "WITH "  # noqa: S608 - constant fragments only, no input
    + ADMIT_MOVES.format(
        picks="SELECT id, ord FROM unnest(CAST(:ids AS uuid[])) WITH ORDINALITY AS u(id, ord)",
        detail="CAST(:detail AS jsonb)",
    )
    + ADMITTED
    + " ORDER BY m.ord"
)


def admit(
    session: Session, job_ids: Sequence[uuid.UUID], detail: dict[str, Any]
) -> dict[uuid.UUID, Origin]:
    """Move the jobs of ``job_ids`` still queued to ``submitting`` (one event each, with
    ``detail``); the moved ones, with their origins, in the order given."""
    if not job_ids:
        return {}
    rows = session.connection().execute(
        _ADMIT, {"ids": list(job_ids), "detail": json.dumps(detail)}
    )
    return admitted(session, rows)


def admitted(session: Session, rows: Iterable[Any]) -> dict[uuid.UUID, Origin]:
    """Record the moves of an ``ADMITTED`` read (rows without a job are skipped); the jobs
    with their origins, in the rows' order."""
    moved: dict[uuid.UUID, Origin] = {}
    for row in rows:
        if row.job_id is None:
            continue
        origin = row.origin or {}
        moved[row.job_id] = Origin(request_id=origin.get("request_id"), trace=origin.get("trace"))
        uow.record(
            session,
            Moved(
                from_status=S.queued,
                to_status=S.submitting,
                event_id=row.id,
                job_id=row.job_id,
                hooked=bool(row.hooked),
            ),
        )
    if moved:
        metrics.TRANSITIONS.labels(str(S.queued), str(S.submitting)).inc(len(moved))
    return moved


# The job, its inputs, its first event and the admission wake-up in ONE statement: a
# submit is one round trip to PostgreSQL (no BEGIN/COMMIT of its own when the caller runs
# it in autocommit), and the row and event come back for the answer (no re-read).
# Data-modifying CTEs all run, in one snapshot; the inputs' foreign key is checked at the
# end of the statement, when the job exists.
_CREATE = text(
    """
    WITH job AS (
        INSERT INTO jobs (id, status, owner, api_key_id, webhook_events, prompt, steps, scale,
            webhook_url, metadata, priority, enqueued_at, deadline_at)
        VALUES (:id, 'queued', :owner, :api_key_id, CAST(:webhook_events AS jsonb), :prompt,
            :steps, :scale, :webhook_url, CAST(:metadata AS jsonb), :priority, now(),
            now() + make_interval(secs => CAST(:cancel_after_s AS double precision)))
        RETURNING *
    ), inputs AS (
        INSERT INTO job_inputs (job_id, position, kind, url, s3_key, filename, content_type,
            size, sha256)
        SELECT :id, r.position, r.kind, r.url, r.s3_key, r.filename, r.content_type, r.size,
            r.sha256
        FROM jsonb_to_recordset(CAST(:inputs AS jsonb)) AS r(position int, kind text,
            url text, s3_key text, filename text, content_type text, size bigint, sha256 text)
    ), event AS (
        INSERT INTO job_events (job_id, from_status, to_status, kind, detail)
        SELECT id, NULL, 'queued', 'transition', CAST(:detail AS jsonb) FROM job
        RETURNING id AS event_id, at AS event_at, detail AS event_detail
    )
    SELECT job.*, event.*, pg_notify(:channel, :why) AS woke FROM job, event
    """
)
_JOB_ATTRS = {prop.columns[0].name: prop.key for prop in sa_inspect(Job).column_attrs}


class NewJob(TypedDict):
    """What a new job is made of (``create``, ``create_async``)."""

    job_id: uuid.UUID
    owner: str
    prompt: str
    steps: int
    scale: float
    webhook_url: str | None
    metadata: dict[str, Any]
    inputs: Sequence[NewInput]
    api_key_id: NotRequired[uuid.UUID | None]
    webhook_events: NotRequired[list[str] | None]
    priority: NotRequired[str]
    cancel_after: NotRequired[timedelta | None]


def create(session: Session, **new: Unpack[NewJob]) -> tuple[Job, JobEvent]:
    """Insert a queued job, its inputs in order and its first timeline event, and wake
    admission; returns the job (its inputs, no outputs, the event loaded) and the event,
    as committed, not attached to the session."""
    params, rows = _create_params(new)
    return _created(session.execute(_CREATE, params).mappings().one(), new["job_id"], rows)


# The same statement in psycopg's own parameter style, for the event loop's pool.
_CREATE_PG = str(_CREATE.compile(dialect=postgresql_psycopg.dialect()))  # type: ignore[no-untyped-call]


async def create_async(
    conn: psycopg.AsyncConnection[Any], **new: Unpack[NewJob]
) -> tuple[Job, JobEvent]:
    """``create`` on an autocommit connection of the event loop's pool (db.open_async_pool):
    the same one statement, and the same job and event back."""
    params, rows = _create_params(new)
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(_CREATE_PG, params)
    row = await cur.fetchone()
    assert row is not None  # the CTE returns its one row, or raises
    return _created(row, new["job_id"], rows)


def _create_params(new: NewJob) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    # The request that made the job, for the log lines of the worker that later sends it.
    request_id = structlog.contextvars.get_contextvars().get("request_id")
    detail: dict[str, Any] = {"request_id": request_id} if request_id else {}
    if trace := tracing.carrier():
        detail["trace"] = trace  # the admission pass sends the submit in this trace
    rows = [
        {
            "position": n,
            "kind": i.kind,
            "url": i.url,
            "s3_key": i.s3_key,
            "filename": i.filename,
            "content_type": i.content_type,
            "size": i.size,
            "sha256": i.sha256,
        }
        for n, i in enumerate(new["inputs"])
    ]
    webhook_events = new.get("webhook_events")
    cancel_after = new.get("cancel_after")
    params = {
        "id": new["job_id"],
        "owner": new["owner"],
        "api_key_id": new.get("api_key_id"),
        "webhook_events": None if webhook_events is None else json.dumps(webhook_events),
        "prompt": new["prompt"],
        "steps": new["steps"],
        "scale": new["scale"],
        "webhook_url": new["webhook_url"],
        "metadata": json.dumps(new["metadata"]),
        "priority": PRIORITIES[new.get("priority", "normal")],
        "cancel_after_s": None if cancel_after is None else cancel_after.total_seconds(),
        "inputs": json.dumps(rows),
        "detail": json.dumps(detail),
        "channel": uow.ADMIT_CHANNEL,
        "why": uow.QUEUED,
    }
    return params, rows


def _created(
    row: Mapping[Any, Any], job_id: uuid.UUID, rows: list[dict[str, Any]]
) -> tuple[Job, JobEvent]:
    job = Job(**{attr: row[col] for col, attr in _JOB_ATTRS.items()})
    event = JobEvent(
        id=row["event_id"],
        job_id=job_id,
        at=row["event_at"],
        from_status=None,
        to_status=S.queued,
        kind="transition",
        detail=row["event_detail"],
    )
    # Loaded as if read from the database; none of it is added to the session.
    set_committed_value(job, "inputs", [JobInput(job_id=job_id, **r) for r in rows])
    set_committed_value(job, "outputs", [])
    set_committed_value(job, "events", [event])
    return job, event


@dataclass(frozen=True)
class FromNow:
    """A time ``seconds`` after the statement's ``now()``, as a value of a transition: bound
    as a parameter, so the statement is built once per shape (``func.now() +
    timedelta(…)`` would embed its value and make every call a new statement)."""

    seconds: float

    def sql(self) -> ColumnElement[Any]:
        """The same as an expression, for statements that are not cached."""
        return func.now() + timedelta(seconds=self.seconds)


def transition(
    session: Session,
    job_id: uuid.UUID,
    to: JobStatus,
    *,
    from_: Iterable[JobStatus] | None = None,
    detail: dict[str, Any] | None = None,
    guard: ColumnElement[bool] | None = None,
    **values: Any,
) -> Moved | None:
    """Move a job to ``to`` if it is in one of ``from_`` (and ``guard`` holds on its row);
    None when it was not there."""
    allowed = ALLOWED[to]
    sources = frozenset(from_) if from_ is not None else allowed
    if not sources <= allowed:
        raise IllegalTransition(f"{sorted(sources - allowed)} -> {to}")
    if to in TERMINAL:
        values.setdefault("finished_at", func.now())
    params: dict[str, Any] = {"job_id": job_id, "detail": json.dumps(detail or {})}
    bound, shape = _bind(values, params)
    statement = _statement(
        ("transition", to, sources, _static_key(guard), *shape),
        lambda: _transition_statement(to, sources, guard, bound),
    )
    row = session.connection().execute(statement, params).one_or_none()
    if row is None:
        return None
    metrics.TRANSITIONS.labels(row.from_status, str(to)).inc()
    done = Moved(
        from_status=JobStatus(row.from_status),
        to_status=to,
        event_id=row.id,
        job_id=job_id,
        hooked=bool(row.hooked),
    )
    uow.record(session, done)
    return done


# Built statements by shape (for a transition: target, sources, guard, columns and the
# kinds of their values). SQLAlchemy caches the compiled SQL, but building a statement and
# walking it for its cache key on every call was a quarter of a worker's CPU in the
# pipeline benchmark (docs/PERFORMANCE.md, round 7); a reused statement object keeps its
# cache key. Only shapes without embedded values are kept (see ``_static_key``).
_STATEMENTS: dict[tuple[Any, ...], Any] = {}
_UNCACHEABLE = object()


def _bind(
    values: Mapping[str, Any], params: dict[str, Any], table: Any = Job.__table__
) -> tuple[dict[str, Any], list[Any]]:
    """Column values of ``table`` as expressions (plain values and FromNow's seconds become
    parameters, added to ``params``) and the shape they leave: each column and the kind of
    its value."""
    bound: dict[str, Any] = {}
    shape: list[Any] = []
    for name, value in sorted(values.items()):
        if isinstance(value, FromNow):
            params[f"v_{name}"] = value.seconds
            bound[name] = func.now() + literal_column("interval '1 second'") * bindparam(
                f"v_{name}", type_=Float
            )
            shape.append((name, FromNow))
        elif isinstance(value, ClauseElement):
            bound[name] = value
            shape.append((name, _static_key(value)))
        else:
            params[f"v_{name}"] = value
            bound[name] = bindparam(f"v_{name}", type_=table.c[name].type)
            shape.append((name, None))
    return bound, shape


def _statement(key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
    """The statement of this shape: built once, or every time when it embeds values."""
    if _UNCACHEABLE in key or any(isinstance(k, tuple) and _UNCACHEABLE in k for k in key):
        return build()
    statement = _STATEMENTS.get(key)
    if statement is None:
        if len(_STATEMENTS) > 512:
            _STATEMENTS.clear()  # a leak guard: the shapes in use are a few dozen
        statement = _STATEMENTS[key] = build()
    return statement


def _static_key(expr: ClauseElement | None) -> Any:
    """A hashable key of an expression that embeds no value (``Job.x.is_(None)``,
    ``func.now()``), or ``_UNCACHEABLE`` when it carries bound values of its own."""
    if expr is None:
        return None
    cache_key = expr._generate_cache_key()
    if cache_key is None or cache_key.bindparams:
        return _UNCACHEABLE
    return cache_key.key


def _status(status: JobStatus) -> ColumnElement[str]:
    return literal_column(f"'{status}'", String)  # our own enum's value: no quoting needed


def _statuses(statuses: Iterable[JobStatus]) -> list[ColumnElement[str]]:
    """Statuses as SQL literals, for ``IN``: a list of plain values would be an "expanding"
    parameter, rendered into the SQL again on every execution (a fifth of a transition's
    CPU, PERFORMANCE.md round 8)."""
    return [_status(s) for s in sorted(statuses)]


def _transition_statement(
    to: JobStatus,
    sources: frozenset[JobStatus],
    guard: ColumnElement[bool] | None,
    bound: Mapping[str, Any],
) -> Any:
    """The guarded UPDATE (setting ``bound``: column -> expression or parameter) and its
    event INSERT as one statement."""
    columns = Job.__table__.c
    old = (
        select(Job.id, Job.status)
        .where(Job.id == bindparam("job_id", type_=columns["id"].type))
        .with_for_update()
        .cte("old")
    )
    conditions = [Job.id == old.c.id, old.c.status.in_(_statuses(sources))]
    if guard is not None:
        conditions.append(guard)
    moved = (
        update(Job)
        .where(*conditions)
        .values(status=str(to), updated_at=func.now(), **bound)
        .returning(
            Job.id,
            old.c.status.label("from_status"),
            Job.webhook_url.is_not(None).label("hooked"),
        )
        .cte("moved")
    )
    event = (
        insert(JobEvent)
        .from_select(
            ["job_id", "from_status", "to_status", "kind", "detail"],
            select(
                moved.c.id,
                moved.c.from_status,
                _status(to),
                literal_column("'transition'", String),
                cast(bindparam("detail", type_=String), JSONB),
            ),
        )
        .returning(JobEvent.id, JobEvent.job_id, JobEvent.from_status)
        .cte("event")
    )
    return select(event.c.id, event.c.from_status, moved.c.hooked).join_from(
        event, moved, event.c.job_id == moved.c.id
    )


# A callback named a task for a job whose Run is uncertain: kept so that the sweep can
# adopt the task even if the callback's reconcile message is lost.
CALLBACK_HINT = "callback_hint"


def note(session: Session, job_id: uuid.UUID, kind: str, detail: dict[str, Any]) -> int:
    """Append a timeline event that is not a state change (e.g. an uncertain Run); its id."""
    event_id: int = (
        session.connection()
        .execute(
            insert(JobEvent).values(job_id=job_id, kind=kind, detail=detail).returning(JobEvent.id)
        )
        .scalar_one()
    )
    return event_id


def update_fields(
    session: Session,
    job_id: uuid.UUID,
    *,
    when: Iterable[JobStatus],
    guard: ColumnElement[bool] | None = None,
    **values: Any,
) -> bool:
    """Set bookkeeping columns (not the status) while the job is in one of ``when`` (and
    ``guard`` holds)."""
    states = frozenset(when)
    params: dict[str, Any] = {"job_id": job_id}
    bound, shape = _bind(values, params)

    def build() -> Any:
        conditions = [Job.id == _JOB_ID, Job.status.in_(_statuses(states))]
        if guard is not None:
            conditions.append(guard)
        return update(Job).where(*conditions).values(**bound).returning(Job.id)

    statement = _statement(("fields", states, _static_key(guard), *shape), build)
    return session.connection().execute(statement, params).scalar_one_or_none() is not None


RELATIONS = ("inputs", "outputs", "events")


def get(
    session: Session,
    job_id: uuid.UUID,
    *,
    full: bool = False,
    load: Sequence[str] | None = None,
) -> Job | None:
    """One job; with its inputs, outputs and timeline when ``full``, or only the relations
    named in ``load`` (a worker step reads what it uses). The row alone by default."""
    query = select(Job).where(Job.id == job_id)
    names = load if load is not None else (RELATIONS if full else ())
    if names:
        query = query.options(*(selectinload(getattr(Job, n)) for n in names))
    return session.execute(query).scalar_one_or_none()


def status_of(session: Session, job_id: uuid.UUID) -> JobStatus | None:
    """The job's status alone (None: no such job)."""
    value = session.execute(select(Job.status).where(Job.id == job_id)).scalar_one_or_none()
    return None if value is None else JobStatus(value)


def owner_of(session: Session, job_id: uuid.UUID) -> str | None:
    """The job's owner alone (None: no such job)."""
    owner: str | None = session.execute(
        select(Job.owner).where(Job.id == job_id)
    ).scalar_one_or_none()
    return owner


class OwnerAndStatus(NamedTuple):
    """Who owns a job and where it is."""

    owner: str
    status: JobStatus


def owner_and_status(session: Session, job_id: uuid.UUID) -> OwnerAndStatus | None:
    """The job's owner and status, read together (None: no such job)."""
    row = session.execute(select(Job.owner, Job.status).where(Job.id == job_id)).one_or_none()
    return None if row is None else OwnerAndStatus(row.owner, JobStatus(row.status))


def timeline(session: Session, job_id: uuid.UUID) -> Sequence[JobEvent]:
    """The job's events in order (what ``Job.events`` loads, without the job)."""
    return session.scalars(
        select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
    ).all()


def event_of(session: Session, event_id: int) -> JobEvent | None:
    """One timeline event (None: no such event)."""
    return session.get(JobEvent, event_id)


class HookWish(NamedTuple):
    """What a job event is and what its job's webhook asks for."""

    kind: str
    to_status: str | None
    webhook_url: str | None
    webhook_events: list[str] | None


def hook_wish(session: Session, event_id: int) -> HookWish | None:
    """One light read of an event and its job's webhook wishes (None: no such event)."""
    row = session.execute(
        select(JobEvent.kind, JobEvent.to_status, Job.webhook_url, Job.webhook_events)
        .join(Job, Job.id == JobEvent.job_id)
        .where(JobEvent.id == event_id)
    ).one_or_none()
    return None if row is None else HookWish(*row)


def transitions_of(
    session: Session, job_ids: Sequence[uuid.UUID], where: ColumnElement[bool]
) -> Sequence[tuple[uuid.UUID, str | None, str | None, datetime]]:
    """The transitions of many jobs that match ``where``, in order: ``(job_id, from, to,
    at)`` (one query for a page of jobs)."""
    rows = session.execute(
        select(JobEvent.job_id, JobEvent.from_status, JobEvent.to_status, JobEvent.at)
        .where(JobEvent.job_id.in_(job_ids), JobEvent.kind == "transition", where)
        .order_by(JobEvent.id)
    )
    return rows.tuples().all()


def output_key_of(session: Session, job_id: uuid.UUID, position: int) -> str | None:
    """Where output ``position`` of the job is stored (None: no such output)."""
    key: str | None = session.execute(
        select(JobOutput.s3_key).where(JobOutput.job_id == job_id, JobOutput.position == position)
    ).scalar_one_or_none()
    return key


def image_keys_of(
    session: Session, job_id: uuid.UUID, kind: Literal["inputs", "outputs"], position: int
) -> tuple[str | None, str | None] | None:
    """Where input or output ``position`` and its thumbnail are stored, ``(s3_key,
    thumb_key)``, either None when absent (a URL input, a thumbnail not made yet); None
    when there is no such input or output."""
    table = JobInput if kind == "inputs" else JobOutput
    row = session.execute(
        select(table.s3_key, table.thumb_key).where(
            table.job_id == job_id, table.position == position
        )
    ).one_or_none()
    return None if row is None else (row.s3_key, row.thumb_key)


def set_thumb_key(
    session: Session,
    job_id: uuid.UUID,
    kind: Literal["inputs", "outputs"],
    position: int,
    key: str,
) -> None:
    """Record the thumbnail just made of input or output ``position`` (the first wins)."""
    table = JobInput if kind == "inputs" else JobOutput
    session.execute(
        update(table)
        .where(table.job_id == job_id, table.position == position, table.thumb_key.is_(None))
        .values(thumb_key=key)
    )


class TaskRef(NamedTuple):
    """What a reconcile needs of its job to ask Wiro about the task (no ORM object)."""

    id: uuid.UUID
    status: str
    wiro_taskid: str | None
    run_sent_at: datetime | None
    callback_token_hash: str | None


_TASK_REF = text(
    "SELECT id, status, wiro_taskid, run_sent_at, callback_token_hash FROM jobs WHERE id = :id"
)
_TASK_REF_PG = str(_TASK_REF.compile(dialect=postgresql_psycopg.dialect()))  # type: ignore[no-untyped-call]


def task_ref(session: Session, job_id: uuid.UUID) -> TaskRef | None:
    """The job's status and task columns, or None when there is no such job."""
    row = session.connection().execute(_TASK_REF, {"id": job_id}).one_or_none()
    return None if row is None else TaskRef(*row)


async def task_ref_async(conn: psycopg.AsyncConnection[Any], job_id: uuid.UUID) -> TaskRef | None:
    """``task_ref`` on a connection of the event loop's pool (db.open_async_pool)."""
    cur = await conn.execute(_TASK_REF_PG, {"id": job_id})
    row = await cur.fetchone()
    return None if row is None else TaskRef(*row)


_JOB_ID = bindparam("job_id", type_=Job.__table__.c["id"].type)
_CANCEL_ASKED = select(Job.cancel_requested_at.is_not(None)).where(Job.id == _JOB_ID)


def cancel_requested(session: Session, job_id: uuid.UUID) -> bool:
    """Whether a client asked to cancel the job."""
    asked = session.connection().execute(_CANCEL_ASKED, {"job_id": job_id}).scalar_one_or_none()
    return bool(asked)


def add_output(session: Session, job_id: uuid.UUID, position: int, **values: Any) -> None:
    """Record a copied output; a second copy of the same position changes nothing."""
    params: dict[str, Any] = {}
    row = {"job_id": job_id, "position": position, **values}
    bound, shape = _bind(row, params, JobOutput.__table__)
    statement = _statement(
        ("output", *shape),
        lambda: pg_insert(JobOutput).values(**bound).on_conflict_do_nothing(),
    )
    session.connection().execute(statement, params)


def forget_outputs(session: Session, job_id: uuid.UUID) -> None:
    """Drop the outputs of an earlier attempt (a retried job's belonged to the old task)."""
    session.execute(delete(JobOutput).where(JobOutput.job_id == job_id))


class RunInputRef(NamedTuple):
    """One input as a Run sends it."""

    kind: str
    url: str | None
    s3_key: str | None
    filename: str | None
    content_type: str | None


class Claimed(NamedTuple):
    """What a submit needs of the job it claimed (no ORM object)."""

    id: uuid.UUID
    created_at: datetime
    prompt: str
    steps: int
    scale: Decimal
    callback_token_hash: str
    inputs: list[RunInputRef]


# The claim and the inputs in one round trip: the UPDATE's RETURNING reads them.
_CLAIM = text(
    """
    UPDATE jobs SET callback_token_hash = :token_hash
    WHERE id = :id AND status = 'submitting' AND run_sent_at IS NULL
      AND callback_token_hash IS NULL
    RETURNING id, created_at, prompt, steps, scale, callback_token_hash, (
        SELECT coalesce(json_agg(json_build_array(i.kind, i.url, i.s3_key, i.filename,
            i.content_type) ORDER BY i.position), '[]')
        FROM job_inputs i WHERE i.job_id = jobs.id) AS inputs
    """
)


def claim_for_submit(session: Session, job_id: uuid.UUID, token_hash: str) -> Claimed | None:
    """Set the callback token of a job admission claimed, if no submit did yet; the job
    and its inputs (what a Run sends), or None. The guard against a redelivered submit."""
    row = (
        session.connection().execute(_CLAIM, {"id": job_id, "token_hash": token_hash}).one_or_none()
    )
    if row is None:
        return None
    return Claimed(
        id=row.id,
        created_at=row.created_at,
        prompt=row.prompt,
        steps=row.steps,
        scale=row.scale,
        callback_token_hash=row.callback_token_hash,
        inputs=[RunInputRef(*i) for i in row.inputs],
    )


def encode_cursor(job: Job) -> str:
    """An opaque cursor that points just past ``job`` in newest-first order."""
    raw = f"{job.created_at.isoformat()}|{job.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """The (created_at, id) a cursor points past; ValueError when it is not one of ours."""
    padded = cursor + "=" * (-len(cursor) % 4)
    try:
        created, job_id = base64.urlsafe_b64decode(padded).decode().split("|")
        return datetime.fromisoformat(created), uuid.UUID(job_id)
    except Exception as exc:
        raise ValueError("malformed cursor") from exc


def page(
    session: Session,
    *,
    owner: str | None,
    status: JobStatus | None,
    cursor: str | None,
    limit: int,
) -> tuple[list[Job], str | None]:
    """Newest-first page of jobs and the cursor of the next page (None at the end)."""
    query = select(Job).options(selectinload(Job.outputs))
    if owner is not None:
        query = query.where(Job.owner == owner)
    if status is not None:
        query = query.where(Job.status == str(status))
    if cursor:
        created, job_id = decode_cursor(cursor)
        query = query.where(func.row(Job.created_at, Job.id) < func.row(created, job_id))
    query = query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    jobs = list(session.execute(query).scalars())
    more = len(jobs) > limit
    jobs = jobs[:limit]
    return jobs, encode_cursor(jobs[-1]) if more and jobs else None


def due_polls(session: Session, *, grace: timedelta, batch: int) -> list[uuid.UUID]:
    """Claim running jobs whose next poll is due; push their next poll out.

    News from Wiro (Run, callback, poll) sets ``next_poll_at`` a grace period ahead, so a
    due poll means a job silent for that long; the partial index on ``next_poll_at`` of
    running jobs makes this an index range scan however many jobs run.
    """
    now = func.now()
    due = (
        select(Job.id)
        .where(Job.status == S.running, Job.next_poll_at <= now)
        .order_by(Job.next_poll_at)
        .limit(batch)
        .with_for_update(skip_locked=True)
        .cte("due")
    )
    # Back off per job: grace, 2x, 4x ... capped at 16x, so a long task costs few polls.
    backoff = func.least(func.power(2, Job.poll_count), 16) * grace
    claimed = session.execute(
        update(Job)
        .where(Job.id == due.c.id)
        .values(next_poll_at=now + backoff, poll_count=Job.poll_count + 1)
        .returning(Job.id)
    )
    return list(claimed.scalars())


def stale(
    session: Session, status: JobStatus, *, older_than: timedelta, batch: int, **extra: Any
) -> list[Job]:
    """Claim jobs in ``status`` whose last message is older than ``older_than``."""
    now = func.now()
    conditions = [
        Job.status == str(status),
        func.coalesce(Job.enqueued_at, Job.updated_at) < now - older_than,
    ]
    conditions += [
        getattr(Job, k).is_(None) if v is None else getattr(Job, k) == v for k, v in extra.items()
    ]
    due = (
        select(Job.id).where(*conditions).limit(batch).with_for_update(skip_locked=True).cte("due")
    )
    claimed = session.execute(
        update(Job).where(Job.id == due.c.id).values(enqueued_at=now).returning(Job)
    )
    return list(claimed.scalars())


def past_deadline(session: Session, *, batch: int) -> list[uuid.UUID]:
    """Jobs not yet done at Wiro whose Cancel-After has passed (an index range scan)."""
    rows = session.execute(
        select(Job.id)
        .where(
            Job.deadline_at.is_not(None),
            Job.deadline_at <= func.now(),
            Job.status.in_([S.queued, S.submitting, S.running]),
        )
        .order_by(Job.deadline_at)
        .limit(batch)
        .with_for_update(skip_locked=True)
    )
    return list(rows.scalars())


def timed_out(session: Session, *, older_than: timedelta, batch: int) -> list[uuid.UUID]:
    """Running jobs whose Run left more than ``older_than`` ago (WIRO_TASK_TIMEOUT_S)."""
    rows = session.execute(
        select(Job.id)
        .where(Job.status == S.running, Job.run_sent_at < func.now() - older_than)
        .order_by(Job.run_sent_at)
        .limit(batch)
        .with_for_update(skip_locked=True)
    )
    return list(rows.scalars())


def due_stops(session: Session, *, lease: timedelta, batch: int) -> list[uuid.UUID]:
    """Claim jobs whose task is to be stopped at Wiro and whose next try is due.

    The claim pushes the next try a lease away, so two sweeps never try the same job at
    once; the stop step itself then sets when to try again, if ever.
    """
    due = (
        select(Job.id)
        .where(Job.wiro_stop_next_at.is_not(None), Job.wiro_stop_next_at <= func.now())
        .order_by(Job.wiro_stop_next_at)
        .limit(batch)
        .with_for_update(skip_locked=True)
        .cte("due")
    )
    claimed = session.execute(
        update(Job)
        .where(Job.id == due.c.id)
        .values(wiro_stop_next_at=func.now() + lease)
        .returning(Job.id)
    )
    return list(claimed.scalars())


def queued_since(session: Session, *, older_than: timedelta, batch: int) -> list[uuid.UUID]:
    """Queued jobs created more than ``older_than`` ago, oldest first."""
    rows = session.execute(
        select(Job.id)
        .where(Job.status == S.queued, Job.created_at < func.now() - older_than)
        .order_by(Job.created_at)
        .limit(batch)
        .with_for_update(skip_locked=True)
    )
    return list(rows.scalars())


def refusals(session: Session, job_id: uuid.UUID) -> int:
    """How many times Wiro refused this job's Run so far (the back-off's exponent)."""
    count = session.execute(
        select(func.count())
        .select_from(JobEvent)
        .where(
            JobEvent.job_id == job_id,
            JobEvent.from_status == S.submitting,
            JobEvent.to_status == S.queued,
        )
    ).scalar_one()
    return int(count)


@dataclass(frozen=True)
class UncertainRun:
    """A Run that may have reached Wiro and has not named its task for too long."""

    job_id: uuid.UUID
    # The taskid a callback named (not yet verified), if one came.
    hint: str | None
    # Past twice the wait: even a hinted one is given up on.
    expired: bool


def uncertain_runs(session: Session, *, older_than: timedelta, batch: int) -> list[UncertainRun]:
    """Jobs whose Run may have reached Wiro but never told us a taskid, for too long."""
    hint = (
        select(JobEvent.detail["taskid"].astext)
        .where(JobEvent.job_id == Job.id, JobEvent.kind == CALLBACK_HINT)
        .order_by(JobEvent.id.desc())
        .limit(1)
        .scalar_subquery()
    )
    rows = session.execute(
        select(Job.id, hint, Job.run_sent_at < func.now() - 2 * older_than)
        .where(
            Job.status == S.submitting,
            Job.wiro_taskid.is_(None),
            Job.run_sent_at.is_not(None),
            Job.run_sent_at < func.now() - older_than,
        )
        .limit(batch)
    )
    return [UncertainRun(job_id=r[0], hint=r[1], expired=bool(r[2])) for r in rows]


# -- deleting a task's files at Wiro (service/privacy.py) ------------------------------


def claim_wiro_delete(
    session: Session, job_id: uuid.UUID, *, lease: timedelta
) -> tuple[str | None, int] | None:
    """Claim the job's due delete at Wiro: one guarded UPDATE pushes the next try out by
    ``lease`` and counts the attempt, so a sweep racing a worker makes one call, not two.
    The job's socket token and this attempt's number; None when nothing is due."""
    row = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.wiro_delete_next_at.is_not(None),
            Job.wiro_delete_next_at <= func.now() + timedelta(seconds=1),
        )
        .values(
            wiro_delete_next_at=func.now() + lease,
            wiro_delete_attempts=Job.wiro_delete_attempts + 1,
        )
        .returning(Job.wiro_socket_token, Job.wiro_delete_attempts)
    ).one_or_none()
    return None if row is None else (row[0], row[1])


def settle_wiro_delete(
    session: Session, job_id: uuid.UUID, *, deleted: bool, retry_in: timedelta | None
) -> None:
    """After a try: done (``deleted``), tried again in ``retry_in``, or given up (neither)."""
    values: dict[str, Any] = {
        "wiro_delete_next_at": None if retry_in is None else func.now() + retry_in
    }
    if deleted:
        values["wiro_deleted_at"] = func.now()
    session.execute(update(Job).where(Job.id == job_id).values(**values))


def due_for_wiro_delete(session: Session, *, batch: int) -> list[uuid.UUID]:
    """Jobs whose delete at Wiro is due (ix_jobs_wiro_delete_due)."""
    rows = session.execute(
        select(Job.id)
        .where(Job.wiro_delete_next_at.is_not(None), Job.wiro_delete_next_at <= func.now())
        .order_by(Job.wiro_delete_next_at)
        .limit(batch)
    )
    return list(rows.scalars())


# -- live progress (service/progress.py) ------------------------------------------------


def running_with_socket(session: Session) -> dict[uuid.UUID, str]:
    """The running jobs whose task has a socket to follow, and its access token."""
    rows = session.execute(
        select(Job.id, Job.wiro_socket_token).where(
            Job.status == S.running.value, Job.wiro_socket_token.is_not(None)
        )
    )
    return {r.id: str(r.wiro_socket_token) for r in rows}


@dataclass(frozen=True)
class ProgressChange:
    """What a job's socket said since the last write (None: unchanged)."""

    job_id: uuid.UUID
    progress: dict[str, Any] | None
    status: str | None


def set_progress(session: Session, changes: Sequence[ProgressChange]) -> None:
    """One UPDATE for every job that changed, only while it is running (its end wins)."""
    if not changes:
        return
    session.connection().execute(
        update(Job)
        .where(Job.id == bindparam("b_id"), Job.status == S.running.value)
        .values(
            progress=func.coalesce(
                bindparam("b_progress", type_=JSONB(none_as_null=True)), Job.progress
            ),
            progress_at=func.now(),
            wiro_status=func.coalesce(bindparam("b_status"), Job.wiro_status),
        ),
        [{"b_id": c.job_id, "b_progress": c.progress, "b_status": c.status} for c in changes],
    )


def note_progress(session: Session, job_id: uuid.UUID, progress: dict[str, Any]) -> int | None:
    """A ``progress`` note in the timeline while the job is running; its event id (None:
    the job is no longer running)."""
    event_id: int | None = session.execute(
        insert(JobEvent)
        .from_select(
            ["job_id", "kind", "detail"],
            select(Job.id, literal("progress"), literal(progress, JobEvent.detail.type)).where(
                Job.id == job_id, Job.status == S.running.value
            ),
        )
        .returning(JobEvent.id)
    ).scalar_one_or_none()
    return event_id


def counts_by_status(session: Session) -> dict[str, int]:
    """How many jobs are in each state."""
    rows = session.execute(select(Job.status, func.count()).group_by(Job.status))
    return {status: count for status, count in rows.tuples()}


__all__ = ["ACTIVE", "TERMINAL"]
