"""Accepting a job: check and store its uploads, record it, and queue it after commit."""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import structlog
from PIL import Image, UnidentifiedImageError

from service import jobs
from service.container import Services
from service.db import transaction
from service.storage import TooLarge

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


def accept(svc: Services, sub: Submission) -> uuid.UUID:
    """Store the uploads, commit the queued job, then queue it. Nothing stays on failure."""
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
                prompt=sub.prompt,
                steps=sub.steps,
                scale=sub.scale,
                webhook_url=sub.webhook_url,
                metadata=sub.metadata,
                inputs=inputs,
            )
    except BaseException:
        if any(i.kind == "file" for i in inputs):
            svc.storage.delete_prefix(f"inputs/{job_id}/")
        raise
    # After the commit: a send lost here is re-sent by the sweep.
    try:
        svc.queue.submit(job_id)
    except Exception as exc:  # the job is safe in PostgreSQL; the sweep re-sends it
        log.warning("enqueue_failed", job_id=str(job_id), error=str(exc))
    return job_id
