"""Small JPEG previews of inputs and outputs, for the /ops console.

Made the first time someone looks (from the original in S3), then kept in S3 beside it:
a page load fetches a few KiB per image through the admin API, never the full-size
object. Not at intake or finalize: most jobs are never opened in the console, and making
two previews per job there was ~20 % of the gateway's CPU for an upload and ~10 % of the
workers' (docs/PERFORMANCE.md, round 7). A thumbnail is a convenience: failing to make
one leaves ``thumb_key`` empty and changes nothing else.
"""

from __future__ import annotations

import io
import uuid
from typing import IO, Literal

import structlog
from PIL import Image

from service import jobs, storage
from service.container import Services
from service.db import transaction

log = structlog.get_logger()

SIZE_PX = 256  # the longer side
QUALITY = 80


def make(file: IO[bytes]) -> bytes | None:
    """A JPEG at most SIZE_PX on its longer side, or None if the bytes are no image we
    can read. Leaves ``file`` at its start."""
    file.seek(0)
    try:
        with Image.open(file) as img:
            img.draft("RGB", (SIZE_PX * 2, SIZE_PX * 2))  # JPEG: decode at a fraction
            img.thumbnail((SIZE_PX, SIZE_PX))
            out = io.BytesIO()
            img.convert("RGB").save(out, "JPEG", quality=QUALITY, optimize=True)
            return out.getvalue()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        log.info("thumbnail_skipped", error=f"{type(exc).__name__}: {exc}")
        return None
    finally:
        file.seek(0)


def get(
    svc: Services, job_id: uuid.UUID, kind: Literal["inputs", "outputs"], position: int
) -> bytes | None:
    """The thumbnail of input or output ``position``, made and stored on the first call;
    None when there is no such stored image or it cannot be read as one."""
    with transaction(svc.sessions) as s:
        keys = jobs.image_keys_of(s, job_id, kind, position)
    if keys is None:
        return None
    original, thumb = keys
    if thumb is not None:
        return svc.storage.read(thumb)
    if original is None:
        return None  # an image URL: Wiro fetched it, we never held its bytes
    with svc.storage.download_spooled(original) as spool:
        data = make(spool)
    if data is None:
        return None
    # Two first looks at once both make it: the same bytes under the same key.
    key = storage.thumbnail_key(job_id, kind, position)
    svc.storage.put_stream(key, iter([data]), content_type="image/jpeg")
    with transaction(svc.sessions) as s:
        jobs.set_thumb_key(s, job_id, kind, position, key)
    return data
