"""Small JPEG previews of inputs and outputs, for the /ops console.

Made once, when the image passes through us anyway (intake for uploads, finalize for
outputs), and kept in S3 beside the originals: a page load fetches a few KiB per image
through the admin API, never the full-size object. A thumbnail is a convenience: any
failure to make one leaves ``thumb_key`` empty and changes nothing else.
"""

from __future__ import annotations

import io
from typing import IO

import structlog
from PIL import Image

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
