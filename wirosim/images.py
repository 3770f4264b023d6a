"""Deterministic output rendering with Pillow, and PNG padding."""

from __future__ import annotations

import hashlib
import io
import random
import struct
import textwrap
import zlib

from PIL import Image, ImageDraw, ImageFont

MAX_SIDE = 512
MIN_SIDE = 256
PAD_CHUNK_TYPE = b"wsPd"  # ancillary, private, safe-to-copy: decoders skip it


def decode_image(data: bytes) -> Image.Image:
    """Decode bytes into an RGB image; raise ValueError if they are not an image."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            return opened.convert("RGB")
    except Exception as exc:
        raise ValueError(f"not a valid image ({type(exc).__name__})") from exc


def _fit(image: Image.Image) -> Image.Image:
    """Scale so the longest side is between MIN_SIDE and MAX_SIDE."""
    longest = max(image.size)
    target = min(max(longest, MIN_SIDE), MAX_SIDE)
    if target == longest:
        return image.copy()
    ratio = target / longest
    size = (max(1, round(image.width * ratio)), max(1, round(image.height * ratio)))
    return image.resize(size, Image.Resampling.LANCZOS)


def _paste_references(canvas: Image.Image, refs: list[Image.Image]) -> None:
    """Paste thumbnails of the reference images along the bottom-right corner."""
    margin = 8
    right = canvas.width - margin
    for ref in refs[:3]:
        thumb = ref.copy()
        thumb.thumbnail((max(1, canvas.width // 3), max(1, canvas.height // 3)))
        framed = Image.new("RGB", (thumb.width + 4, thumb.height + 4), "white")
        framed.paste(thumb, (2, 2))
        left = right - framed.width
        if left < 0:
            break
        canvas.paste(framed, (left, canvas.height - margin - framed.height))
        right = left - margin


def _draw_prompt(canvas: Image.Image, prompt: str) -> Image.Image:
    """Draw the prompt on a dark translucent band across the top."""
    font = ImageFont.load_default(size=14)
    chars = max(10, canvas.width // 8)
    lines = textwrap.wrap(prompt, width=chars)[:6] or [""]
    band_height = 8 + 18 * len(lines)
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    draw.rectangle((0, 0, canvas.width, band_height), fill=(0, 0, 0, 160))
    for index, line in enumerate(lines):
        draw.text((6, 4 + 18 * index), line, font=font, fill=(255, 255, 255, 255))
    return Image.alpha_composite(canvas.convert("RGBA"), overlay).convert("RGB")


def render_output(images: list[Image.Image], prompt: str) -> bytes:
    """Render the 'edited' PNG: first image, reference thumbnails, prompt text."""
    if not images:
        raise ValueError("no input images")
    canvas = _fit(images[0])
    _paste_references(canvas, images[1:])
    result = _draw_prompt(canvas, prompt)
    buf = io.BytesIO()
    result.save(buf, format="PNG")
    return buf.getvalue()


def pad_png(data: bytes, size: int | None) -> bytes:
    """Insert a deterministic ancillary chunk before IEND so the PNG is at least ``size`` bytes."""
    if size is None or len(data) >= size:
        return data
    payload_len = max(0, size - len(data) - 12)
    seed = int.from_bytes(hashlib.sha256(data).digest()[:8], "big")
    rng = random.Random(seed)
    # randbytes() takes at most 2**31 bits at a time: build large paddings in pieces.
    piece = 64 * 1024 * 1024
    payload = b"".join(
        rng.randbytes(min(piece, payload_len - start)) for start in range(0, payload_len, piece)
    )
    crc = zlib.crc32(PAD_CHUNK_TYPE + payload) & 0xFFFFFFFF
    chunk = struct.pack(">I", payload_len) + PAD_CHUNK_TYPE + payload + struct.pack(">I", crc)
    iend = data.rfind(b"IEND") - 4
    if iend < 0:
        raise ValueError("not a PNG")
    return data[:iend] + chunk + data[iend:]
