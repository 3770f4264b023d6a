"""Accepting a job: check and store its uploads, record it, and queue it after commit."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import IO, Annotated, Any

import structlog
from psycopg_pool import AsyncConnectionPool
from pydantic import AnyHttpUrl, BaseModel, Field
from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from service import images, jobs, ssrf, storage
from service.container import Services
from service.db import transaction
from service.models import IdempotencyKey, Job
from service.storage import TooLarge
from service.uow import unit_of_work
from service.views import JobOut, job_out

ALLOWED_FORMATS = images.ALLOWED_FORMATS
log = structlog.get_logger(__name__)

# Image URLs as a submit gives them: at least one, each an absolute http(s) URL. It is the
# type of JSON's ``JobCreate.image_urls``; a form's ``image_urls`` fields are checked
# against it by ``check_url_syntax``.
ImageUrls = Annotated[list[AnyHttpUrl], Field(min_length=1)]


class _ImageUrlFields(BaseModel):
    image_urls: ImageUrls


def check_url_syntax(urls: list[str]) -> None:
    """Raise pydantic's ``ValidationError`` (located at ``image_urls``, n) unless each URL
    is one ``ImageUrls`` takes; no URLs is nothing to check (the images may be files)."""
    if urls:
        _ImageUrlFields.model_validate({"image_urls": urls})


class InputError(ValueError):
    """An input the API must refuse, with a stable machine code."""

    def __init__(
        self, code: str, message: str, *, field: str | None = None, position: int | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        # ``reason`` is about the value alone; ``message`` also says which one it was.
        self.reason = message
        self.message = message
        self.field = field
        self.position = position

    def at(self, position: int, filename: str) -> InputError:
        """The same refusal, naming the upload it is about (images[1] (notes.txt): …)."""
        named = InputError(self.code, self.reason, field=self.field, position=position)
        named.message = f"images[{position}] ({filename}): {self.reason}"
        return named


@dataclass
class Upload:
    """One uploaded file as the API received it (already spooled by the server)."""

    filename: str
    file: IO[bytes]
    size: int | None = None  # when the server knows it already


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


def _mib(n: int) -> str:
    value = n / (1024 * 1024)
    return f"{value:.0f} MiB" if value == int(value) else f"{value:.1f} MiB"


def sniff_image(file: IO[bytes], *, max_pixels: int) -> str:
    """The content type of an image judged by its bytes, never its name; InputError if none
    (decompression bombs included: ``image_too_many_pixels``)."""
    try:
        return images.sniff(file, max_pixels=max_pixels)
    except images.NotAnImage as exc:
        raise InputError(exc.code, exc.message, field="images") from exc


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
    check_images(svc, sub.images)
    job_id = uuid.uuid4()
    limit = svc.settings.max_image_bytes
    inputs: list[jobs.NewInput] = []
    try:
        for n, image in enumerate(sub.images):
            if isinstance(image, str):
                inputs.append(jobs.NewInput(kind="url", url=image))
                continue
            try:
                ctype = sniff_image(image.file, max_pixels=svc.settings.max_image_pixels)
            except InputError as exc:
                raise exc.at(n, image.filename) from exc
            key = storage.input_key(job_id, n, image.filename)
            try:
                stored = svc.storage.put_stream(key, image.file, content_type=ctype, limit=limit)
            except TooLarge as exc:
                raise _too_large(n, image.filename, limit) from exc
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
        fields = _new_job(job_id, sub, caller, inputs)
        if caller.idempotency_key:
            # The key's row in the job's own transaction: of two racing requests exactly
            # one commits a job.
            # The first answer is kept with it, so that a replay gives back the same body.
            with unit_of_work(svc) as s:
                job, _ = jobs.create(s, **fields)
                view = _render(svc, job)
                first = view.model_dump(mode="json")
                if not _claim_key(s, caller, request_hash, job_id, first):
                    raise _LostRace
        else:
            # One statement: its own transaction, one round trip (service/jobs.py: create).
            with svc.autocommit_sessions() as s:
                job, _ = jobs.create(s, **fields)
            view = _render(svc, job)
    except BaseException as exc:
        if any(i.kind == "file" for i in inputs):
            try:
                svc.storage.delete_prefix(f"inputs/{job_id}/")
                svc.storage.delete_prefix(f"thumbs/{job_id}/")
            except Exception as cleanup:  # S3 may be the thing that failed; keep the cause
                log.warning("input_cleanup_failed", job_id=str(job_id), error=str(cleanup))
        if isinstance(exc, _LostRace):
            with transaction(svc.sessions) as s:
                earlier = _earlier(s, caller, request_hash)
            if earlier is not None:
                return earlier
        raise
    return Accepted(job_id=job_id, replayed=False, job=view)


def _new_job(
    job_id: uuid.UUID, sub: Submission, caller: Caller, inputs: list[jobs.NewInput]
) -> jobs.NewJob:
    return jobs.NewJob(
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


def fits_the_loop(svc: Services, sub: Submission, caller: Caller) -> bool:
    """Whether ``accept_urls`` can take this submission on the event loop: image URLs only,
    no Idempotency-Key, and every host to check already in the submit resolver's cache
    (a lookup would block the loop; the thread-pool path makes it, and fills the cache)."""
    if caller.idempotency_key or not sub.images:
        return False
    urls = [u for u in sub.images if isinstance(u, str)]
    if len(urls) < len(sub.images):
        return False  # files to sniff and store
    return svc.submit_resolver.knows([*urls, *([sub.webhook_url] if sub.webhook_url else [])])


async def accept_urls(
    svc: Services, pool: AsyncConnectionPool, sub: Submission, caller: Caller
) -> Accepted:
    """``accept`` for a submission that ``fits_the_loop``, without leaving the event loop:
    the same checks, then the one statement on the loop's autocommit pool. Nothing to
    store first and nothing to undo (no file, no key)."""
    if sub.webhook_url:
        check_webhook_url(svc, sub.webhook_url)
    check_images(svc, sub.images)
    urls = [jobs.NewInput(kind="url", url=u) for u in sub.images if isinstance(u, str)]
    job_id = uuid.uuid4()
    async with pool.connection() as conn:
        job, _ = await jobs.create_async(conn, **_new_job(job_id, sub, caller, urls))
    return Accepted(job_id=job_id, replayed=False, job=_render(svc, job))


def _render(svc: Services, job: Job) -> JobOut:
    """The job just created, as the API shows it (from what the insert returned)."""
    return job_out(
        job, svc.storage, svc.settings.presign_ttl_s, full=True, base_url=svc.settings.public_url
    )


def check_webhook_url(svc: Services, url: str) -> None:
    """Refuse a webhook URL into loopback/private/link-local/metadata ranges (SSRF guard).

    A host that does not resolve now is let through: that may be temporary, and every
    delivery attempt checks the URL again before connecting.
    """
    try:
        ssrf.check_url(url, svc.settings.webhook_allow_list, resolve=svc.submit_resolver)
    except ssrf.UrlRefused as exc:
        raise InputError(
            "webhook_url_not_allowed",
            f"webhook_url is not allowed: {exc.reason}",
            field="webhook_url",
        ) from exc
    except OSError as exc:
        log.info("webhook_url_unresolved", error=str(exc))


def _too_large(position: int, filename: str, limit: int) -> InputError:
    too_large = InputError(
        "image_too_large", f"larger than {_mib(limit)}", field="images", position=position
    )
    too_large.message = f"images[{position}] ({filename}) is larger than {_mib(limit)}"
    return too_large


def check_images(svc: Services, images: Sequence[Upload | str]) -> None:
    """How many images, each upload's size when known, and where each URL points."""
    cfg = svc.settings
    if not images:
        raise InputError("no_images", "give at least one image (images or image_urls)")
    if len(images) > cfg.max_images:
        raise InputError("too_many_images", f"at most {cfg.max_images} images per job")
    for n, image in enumerate(images):
        if isinstance(image, Upload) and (image.size or 0) > cfg.max_image_bytes:
            raise _too_large(n, image.filename, cfg.max_image_bytes)
    check_image_urls(svc, [i for i in images if isinstance(i, str)])


def check_image_urls(svc: Services, urls: list[str]) -> None:
    """Refuse image URLs into loopback/private/link-local/metadata ranges.

    Wiro could not fetch them anyway, and the error it would report back tells what lies
    behind it. A host that does not resolve here is let through (Wiro resolves it again);
    IMAGE_URL_ALLOW_HOSTS exempts names, addresses and networks.
    """
    allow = svc.image_url_policy.allow
    for n, url in enumerate(urls):
        try:
            ssrf.check_url(url, allow, resolve=svc.submit_resolver)
        except ssrf.UrlRefused as exc:
            refused = InputError(
                "image_url_not_allowed",
                f"not allowed: {exc.reason}",
                field="image_urls",
                position=n,
            )
            refused.message = f"image_urls[{n}] is not allowed: {exc.reason}"
            raise refused from exc
        except OSError as exc:
            log.info("image_url_unresolved", position=n, error=str(exc))


def _claim_key(
    s: Session, caller: Caller, request_hash: str, job_id: uuid.UUID, response: dict[str, Any]
) -> bool:
    """Insert the key's row with the first answer; False if a live one exists (it waits for
    a racing insert)."""
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
            owner=caller.owner,
            key=caller.idempotency_key,
            request_hash=request_hash,
            job_id=job_id,
            response=response,
        )
        .on_conflict_do_nothing()
        .returning(IdempotencyKey.job_id)
    ).scalar_one_or_none()
    return inserted is not None


def forget_expired_keys(s: Session) -> int:
    """Delete Idempotency-Keys older than 24 h; returns how many."""
    result = s.execute(
        delete(IdempotencyKey).where(IdempotencyKey.created_at <= func.now() - IDEMPOTENCY_TTL)
    )
    return int(getattr(result, "rowcount", 0) or 0)
