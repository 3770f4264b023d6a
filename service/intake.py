"""Accepting a job: check and store its uploads, record it, and queue it after commit."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import IO, Any

import structlog
from PIL import Image, UnidentifiedImageError
from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from service import admission, jobs, ssrf
from service.container import Services
from service.db import transaction
from service.models import IdempotencyKey, Job, JobEvent, JobInput
from service.storage import TooLarge
from service.views import JobOut, job_out

ALLOWED_FORMATS = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
log = structlog.get_logger(__name__)


class InputError(ValueError):
    """An input the API must refuse, with a stable machine code."""

    def __init__(self, code: str, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


@dataclass
class Upload:
    """One uploaded file as the API received it (already spooled by the server)."""

    filename: str
    file: IO[bytes]


@dataclass
class Submission:
    """A validated request: inputs in order (uploads and URLs), and the edit's parameters."""

    prompt: str
    steps: int
    scale: float
    images: Sequence[Upload | str]
    webhook_url: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    webhook_events: list[str] | None = None
    priority: str = "normal"
    # Cancel-After: the job is canceled wherever it is once this much time has passed.
    cancel_after: timedelta | None = None

    def fingerprint(self) -> str:
        """A hash of everything the request asks for; uploads count by their bytes."""
        images = []
        for image in self.images:
            if isinstance(image, str):
                images.append(["url", image])
            else:
                image.file.seek(0)
                digest = hashlib.file_digest(image.file, "sha256")  # type: ignore[arg-type]  # SpooledTemporaryFile is a binary file
                image.file.seek(0)
                images.append(["file", digest.hexdigest()])
        canonical = json.dumps(
            [
                self.prompt,
                self.steps,
                self.scale,
                self.webhook_url,
                self.metadata,
                self.webhook_events,
                images,
            ]
            # Only when set, so keys stored before these existed still match.
            + ([self.priority] if self.priority != "normal" else [])
            + ([self.cancel_after.total_seconds()] if self.cancel_after else []),
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Caller:
    """Who submits, and under which Idempotency-Key (if any)."""

    owner: str
    api_key_id: uuid.UUID | None
    idempotency_key: str | None = None


@dataclass(frozen=True)
class Accepted:
    """The job a request produced, and whether it is a replay of an earlier request."""

    job_id: uuid.UUID
    replayed: bool
    response: dict[str, Any] | None = None
    # The new job as GET shows it right after the commit (None for a replay).
    job: JobOut | None = None


class IdempotencyMismatch(Exception):
    """The Idempotency-Key was used before with a different request."""


class _LostRace(Exception):
    """Another request with the same Idempotency-Key committed first."""


MAX_CANCEL_AFTER = timedelta(hours=24)
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")


def parse_cancel_after(value: str) -> timedelta:
    """Replicate's ``Cancel-After``: ``30s``, ``5m``, ``1h30m`` or plain seconds; ≤ 24 h.

    Go-style durations (what Replicate documents), hours, minutes and seconds in that
    order; InputError ``invalid_cancel_after`` otherwise.
    """
    text = value.strip().lower()
    seconds: float | None = None
    try:
        seconds = float(text)
    except ValueError:
        match = _DURATION.fullmatch(text)
        if match and text and any(match.groups()):
            h, m, sec = (float(g) if g else 0.0 for g in match.groups())
            seconds = h * 3600 + m * 60 + sec
    if seconds is None or not seconds == seconds:  # not a number, or NaN
        raise InputError(
            "invalid_cancel_after",
            "Cancel-After must be a duration such as 30s, 5m, 1h30m, or a number of seconds",
            field="Cancel-After",
        )
    if not 0 < seconds <= MAX_CANCEL_AFTER.total_seconds():
        raise InputError(
            "invalid_cancel_after",
            "Cancel-After must be more than 0 s and at most 24 h",
            field="Cancel-After",
        )
    return timedelta(seconds=seconds)


def sniff_image(file: IO[bytes]) -> str:
    """The content type of an image judged by its bytes, never its name; InputError if none."""
    file.seek(0)
    try:
        with Image.open(file) as img:
            fmt = img.format or ""
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError("invalid_image", "the file is not an image", field="images") from exc
    finally:
        file.seek(0)
    if fmt not in ALLOWED_FORMATS:
        raise InputError(
            "unsupported_image",
            f"{fmt or 'this'} images are not accepted; use one of {', '.join(ALLOWED_FORMATS)}",
            field="images",
        )
    return ALLOWED_FORMATS[fmt]


def input_key(job_id: uuid.UUID, position: int, filename: str) -> str:
    """Where an uploaded input lives in S3."""
    safe = _UNSAFE.sub("_", filename).strip("._") or "image"
    return f"inputs/{job_id}/{position}-{safe[:100]}"


IDEMPOTENCY_TTL = timedelta(hours=24)


def _earlier(s: Session, caller: Caller, request_hash: str) -> Accepted | None:
    """The job an earlier request with this Idempotency-Key made, if it is still kept."""
    row = s.execute(
        select(IdempotencyKey).where(
            IdempotencyKey.owner == caller.owner,
            IdempotencyKey.key == caller.idempotency_key,
            IdempotencyKey.created_at > func.now() - IDEMPOTENCY_TTL,
        )
    ).scalar_one_or_none()
    if row is None:
        return None
    if row.request_hash != request_hash:
        raise IdempotencyMismatch
    return Accepted(job_id=row.job_id, replayed=True, response=row.response)


def accept(svc: Services, sub: Submission, caller: Caller) -> Accepted:
    """Store the uploads, commit the queued job, then queue it. Nothing stays on failure.

    With an Idempotency-Key, the key's row is inserted in the job's own transaction, so of
    two racing requests exactly one commits a job; the other finds it and replays it.
    """
    request_hash = sub.fingerprint() if caller.idempotency_key else ""
    if caller.idempotency_key:
        with transaction(svc.sessions) as s:
            earlier = _earlier(s, caller, request_hash)
        if earlier is not None:
            return earlier
    if sub.webhook_url:
        check_webhook_url(svc, sub.webhook_url)
    job_id = uuid.uuid4()
    limit = svc.settings.max_image_bytes
    inputs: list[jobs.NewInput] = []
    try:
        for n, image in enumerate(sub.images):
            if isinstance(image, str):
                inputs.append(jobs.NewInput(kind="url", url=image))
                continue
            ctype = sniff_image(image.file)
            key = input_key(job_id, n, image.filename)
            try:
                stored = svc.storage.put_stream(key, image.file, content_type=ctype, limit=limit)
            except TooLarge as exc:
                raise InputError(
                    "image_too_large", f"image {n} is larger than {limit} bytes", field="images"
                ) from exc
            inputs.append(
                jobs.NewInput(
                    kind="file",
                    s3_key=key,
                    filename=image.filename,
                    content_type=ctype,
                    size=stored.size,
                    sha256=stored.sha256,
                )
            )
        with transaction(svc.sessions) as s:
            jobs.create(
                s,
                job_id=job_id,
                owner=caller.owner,
                api_key_id=caller.api_key_id,
                prompt=sub.prompt,
                steps=sub.steps,
                scale=sub.scale,
                webhook_url=sub.webhook_url,
                webhook_events=sub.webhook_events,
                metadata=sub.metadata,
                inputs=inputs,
                priority=sub.priority,
                cancel_after=sub.cancel_after,
            )
            if caller.idempotency_key and not _claim_key(s, caller, request_hash, job_id):
                raise _LostRace
            view = _as_committed(svc, s, job_id, inputs)
    except BaseException as exc:
        if any(i.kind == "file" for i in inputs):
            try:
                svc.storage.delete_prefix(f"inputs/{job_id}/")
            except Exception as cleanup:  # S3 may be the thing that failed; keep the cause
                log.warning("input_cleanup_failed", job_id=str(job_id), error=str(cleanup))
        if isinstance(exc, _LostRace):
            with transaction(svc.sessions) as s:
                earlier = _earlier(s, caller, request_hash)
            if earlier is not None:
                return earlier
        raise
    # After the commit: a send lost here is re-sent by the sweep.
    admission.request(svc)
    return Accepted(job_id=job_id, replayed=False, job=view)


def _as_committed(
    svc: Services, s: Session, job_id: uuid.UUID, inputs: Sequence[jobs.NewInput]
) -> JobOut:
    """The job just inserted, rendered from one read in its own transaction.

    The row and its first event come back in one round trip (server-side values: times,
    event id, scale as stored); the inputs are what was just inserted, and there are no
    outputs yet, so the answer need not re-read the job in a transaction of its own.
    """
    job, event = s.execute(
        select(Job, JobEvent).join(JobEvent, JobEvent.job_id == Job.id).where(Job.id == job_id)
    ).one()
    rows = [
        JobInput(
            job_id=job_id,
            position=n,
            kind=i.kind,
            url=i.url,
            s3_key=i.s3_key,
            filename=i.filename,
            content_type=i.content_type,
            size=i.size,
            sha256=i.sha256,
        )
        for n, i in enumerate(inputs)
    ]
    # Loaded as if read from the database: nothing becomes pending in the session.
    set_committed_value(job, "inputs", rows)
    set_committed_value(job, "outputs", [])
    set_committed_value(job, "events", [event])
    return job_out(
        job, svc.storage, svc.settings.presign_ttl_s, full=True, base_url=svc.settings.public_url
    )


def check_webhook_url(svc: Services, url: str) -> None:
    """Refuse a webhook URL into loopback/private/link-local/metadata ranges (SSRF guard).

    A host that does not resolve now is let through: that may be temporary, and every
    delivery attempt checks the URL again before connecting.
    """
    try:
        ssrf.check_url(url, svc.settings.webhook_allow_list)
    except ssrf.UrlRefused as exc:
        raise InputError(
            "webhook_url_not_allowed",
            f"webhook_url is not allowed: {exc.reason}",
            field="webhook_url",
        ) from exc
    except OSError as exc:
        log.info("webhook_url_unresolved", error=str(exc))


def _claim_key(s: Session, caller: Caller, request_hash: str, job_id: uuid.UUID) -> bool:
    """Insert the key's row; False if a live one exists (it waits for a racing insert)."""
    s.execute(
        delete(IdempotencyKey).where(
            IdempotencyKey.owner == caller.owner,
            IdempotencyKey.key == caller.idempotency_key,
            IdempotencyKey.created_at <= func.now() - IDEMPOTENCY_TTL,
        )
    )
    inserted = s.execute(
        pg_insert(IdempotencyKey)
        .values(
            owner=caller.owner, key=caller.idempotency_key, request_hash=request_hash, job_id=job_id
        )
        .on_conflict_do_nothing()
        .returning(IdempotencyKey.job_id)
    ).scalar_one_or_none()
    return inserted is not None


def remember_response(
    svc: Services, caller: Caller, job_id: uuid.UUID, body: dict[str, Any]
) -> None:
    """Keep the first answer, so a replay gives back the same body."""
    if not caller.idempotency_key:
        return
    with transaction(svc.sessions) as s:
        s.execute(
            update(IdempotencyKey)
            .where(
                IdempotencyKey.owner == caller.owner,
                IdempotencyKey.key == caller.idempotency_key,
                IdempotencyKey.job_id == job_id,
                IdempotencyKey.response.is_(None),
            )
            .values(response=body)
        )


def forget_expired_keys(s: Session) -> int:
    """Delete Idempotency-Keys older than 24 h; returns how many."""
    result = s.execute(
        delete(IdempotencyKey).where(IdempotencyKey.created_at <= func.now() - IDEMPOTENCY_TTL)
    )
    return int(getattr(result, "rowcount", 0) or 0)
