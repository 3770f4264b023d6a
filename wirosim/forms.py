"""Request parsing (multipart, urlencoded or JSON bodies) and Wiro's request signature."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request

MAX_VALUE_BYTES = 10 * 1024 * 1024


class BodyError(Exception):
    """The request body could not be parsed."""


@dataclass
class FormField:
    """One received field, in order: a plain value or an uploaded file."""

    name: str
    value: str | None = None
    filename: str | None = None
    content_type: str | None = None
    data: bytes | None = None

    @property
    def is_file(self) -> bool:
        """True for an uploaded file part."""
        return self.data is not None

    def record(self) -> dict[str, Any]:
        """Describe the field for /_sim/runs."""
        return {
            "name": self.name,
            "kind": "file" if self.is_file else "value",
            "filename": self.filename,
            "content_type": self.content_type,
            "size": len(self.data) if self.data is not None else None,
            "sha256": hashlib.sha256(self.data).hexdigest() if self.data is not None else None,
            "value": self.value,
        }


def _json_fields(payload: Any) -> list[FormField]:
    """Flatten a JSON object into fields; lists become repeated fields."""
    if not isinstance(payload, dict):
        raise BodyError("JSON body must be an object")
    fields: list[FormField] = []
    for name, raw in payload.items():
        for item in raw if isinstance(raw, list) else [raw]:
            if item is None:
                continue
            value = item if isinstance(item, str) else json.dumps(item)
            fields.append(FormField(name=str(name), value=value))
    return fields


async def parse_body(request: Request) -> list[FormField]:
    """Read the body as multipart, urlencoded or JSON and return its fields in order."""
    content_type = request.headers.get("content-type", "").lower()
    is_form = content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded"))
    if is_form and not (content_type.startswith("multipart/") and "boundary=" not in content_type):
        fields: list[FormField] = []
        try:
            async with request.form(max_part_size=MAX_VALUE_BYTES) as form:
                for name, item in form.multi_items():
                    if isinstance(item, UploadFile):
                        data = await item.read()
                        fields.append(
                            FormField(
                                name=name,
                                filename=item.filename or "",
                                content_type=item.content_type,
                                data=data,
                            )
                        )
                    else:
                        fields.append(FormField(name=name, value=item))
        except Exception as exc:
            raise BodyError(f"could not parse form body: {exc}") from exc
        return fields
    # JSON, or the seed's curl style: "multipart/form-data" header with a JSON body.
    body = await request.body()
    if not body.strip():
        return []
    try:
        return _json_fields(json.loads(body))
    except ValueError as exc:
        raise BodyError(f"could not parse JSON body: {exc}") from exc


def first_value(fields: list[FormField], *names: str) -> str | None:
    """The first plain value among ``names`` (in the order of ``names``)."""
    for name in names:
        for item in fields:
            if item.name == name and item.value is not None:
                return item.value
    return None


def safe_filename(filename: str | None) -> str:
    """Reduce an uploaded filename to a URL-safe basename."""
    base = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base).strip("._")
    return base or f"inputImage-{secrets.randbelow(10**7)}.bin"


def expected_signature(api_key: str, api_secret: str, nonce: str) -> str:
    """hex HMAC-SHA256 keyed with the API key over ``secret + nonce``."""
    return hmac.new(api_key.encode(), (api_secret + nonce).encode(), hashlib.sha256).hexdigest()


def signature_ok(api_key: str, api_secret: str, nonce: str | None, signature: str | None) -> bool:
    """Check x-nonce/x-signature in constant time."""
    if not nonce or signature is None or not re.fullmatch(r"-?\d+", nonce.strip()):
        return False
    expected = expected_signature(api_key, api_secret, nonce.strip())
    return hmac.compare_digest(signature.strip().lower().encode(), expected.encode())
