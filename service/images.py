"""What an image is, judged by its bytes: the formats we accept and a pixel limit.

Pure code, shared by the uploads' check (``intake``) and by the fetcher (``fetch``), so
that an image read from a URL passes exactly the checks an upload does.
"""

from __future__ import annotations

import io
from typing import IO

from PIL import Image, UnidentifiedImageError

ALLOWED_FORMATS = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
}


class NotAnImage(ValueError):
    """Bytes we refuse as an image; ``code`` is stable, ``message`` safe to show."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def sniff(file: IO[bytes], *, max_pixels: int) -> str:
    """The content type of the image in ``file`` (read from its start), or NotAnImage.

    Only the header is parsed (Pillow opens lazily), so a 68-byte PNG that claims
    60000 x 60000 pixels costs nothing here: its size is compared with ``max_pixels``
    before anything could decode it. Pillow's own bomb guard raises
    ``DecompressionBombError`` (not an OSError) past twice its limit; it is caught too.
    """
    file.seek(0)
    try:
        with Image.open(file) as img:
            fmt = img.format or ""
            width, height = img.size
    except Image.DecompressionBombError as exc:
        raise NotAnImage(
            "image_too_many_pixels", f"the image has more than {max_pixels} pixels"
        ) from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise NotAnImage("invalid_image", "the file is not an image") from exc
    finally:
        file.seek(0)
    if fmt not in ALLOWED_FORMATS:
        raise NotAnImage(
            "unsupported_image",
            f"{fmt or 'this'} images are not accepted; use one of {', '.join(ALLOWED_FORMATS)}",
        )
    if width * height > max_pixels:
        raise NotAnImage(
            "image_too_many_pixels",
            f"the image is {width} x {height}: more than {max_pixels} pixels",
        )
    return ALLOWED_FORMATS[fmt]


def sniff_bytes(head: bytes, *, max_pixels: int) -> str:
    """``sniff`` for the first bytes of a stream (enough for every accepted header)."""
    return sniff(io.BytesIO(head), max_pixels=max_pixels)
