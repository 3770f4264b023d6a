"""What the sync and async clients share: settings, request building, retry rules and the
Server-Sent Events parser. No I/O happens here."""

from __future__ import annotations

import email.utils
import json
import math
import mimetypes
import os
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

import httpx

from dreamgate_client._errors import DreamgateError, problem_error
from dreamgate_client._models import Event, Output

DEFAULT_URL = "http://127.0.0.1:8000"
# The longest hold the gateway grants a `Prefer: wait` (as Replicate's).
MAX_HOLD_S = 60
RETRY_STATUSES = frozenset({429, 503})

# An image: a path (str or os.PathLike), the bytes themselves, an open binary file, or an
# http(s) URL (a str) that Wiro fetches itself.
ImageInput = str | os.PathLike[str] | bytes | IO[bytes]
Duration = int | float | timedelta | str


def version() -> str:
    """This client's version (from the installed distribution's metadata)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _version

    for dist in ("dreamgate-client", "dreamgate"):  # the server's wheel ships it too
        try:
            return _version(dist)
        except PackageNotFoundError:
            continue
    return "0+unknown"


def is_url(value: object) -> bool:
    """Whether an image argument is an http(s) URL rather than a file path."""
    return isinstance(value, str) and value.lower().startswith(("http://", "https://"))


def cancel_after_header(value: Duration) -> str:
    """The ``Cancel-After`` header: whole seconds for numbers and timedeltas, a duration
    string (``30s``, ``5m``, ``1h30m``) passed as given."""
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TypeError("cancel_after: give seconds, a timedelta or a duration such as '5m'")
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise ValueError("cancel_after: empty duration")
        return text
    if value <= 0:
        raise ValueError("cancel_after must be positive")
    return str(math.ceil(value))


def retry_after_s(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds: delta-seconds or an HTTP date."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff_s(attempt: int) -> float:
    """Full-jitter exponential backoff: up to 0.5 s, 1 s, 2 s, ... capped at 8 s."""
    return random.uniform(0, min(8.0, 0.5 * 2**attempt))


@dataclass
class Settings:
    """What a client was built with."""

    base_url: str
    key: str | None
    timeout: float
    max_retries: int
    max_retry_wait: float

    @classmethod
    def make(
        cls,
        base_url: str | None,
        key: str | None,
        timeout: float,
        max_retries: int,
        max_retry_wait: float,
    ) -> Settings:
        url = base_url or os.environ.get("DREAMGATE_URL") or DEFAULT_URL
        return cls(
            base_url=url.rstrip("/"),
            key=key if key is not None else os.environ.get("DREAMGATE_KEY") or None,
            timeout=timeout,
            max_retries=max_retries,
            max_retry_wait=max_retry_wait,
        )

    def headers(self) -> dict[str, str]:
        headers = {"User-Agent": f"dreamgate-client/{version()} httpx/{httpx.__version__}"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        return headers

    def retry_delay(self, response: httpx.Response, attempt: int) -> float | None:
        """How long to wait before sending again after ``response``, or None to give up."""
        if response.status_code not in RETRY_STATUSES or attempt >= self.max_retries:
            return None
        wait = retry_after_s(response)
        if wait is None:
            return backoff_s(attempt)
        return wait if wait <= self.max_retry_wait else None


def raise_for(response: httpx.Response) -> None:
    """Raise the gateway's refusal as a DreamgateError."""
    if response.status_code >= 400:
        raise problem_error(response, retry_after_s(response))


def json_of(response: httpx.Response, what: str) -> Any:
    raise_for(response)
    try:
        return response.json()
    except ValueError as exc:
        raise DreamgateError("bad_response", f"{what}: the answer is not JSON") from exc


def prefer_wait(seconds: float) -> str:
    """A ``Prefer: wait=N`` value within what the gateway grants (1-60 s)."""
    return f"wait={max(1, min(MAX_HOLD_S, math.ceil(seconds)))}"


# -- submit --------------------------------------------------------------------------------


@dataclass
class Part:
    """One image as a multipart part (or a URL)."""

    url: str | None = None
    path: Path | None = None
    data: bytes | None = None
    file: IO[bytes] | None = None
    seekable: bool = True  # httpx sends a file object from its start (it seeks to 0)
    filename: str = "image"

    def rewind(self) -> bool:
        """Ready to be sent again: False for a file object that cannot seek back."""
        return self.file is None or self.seekable


def image_parts(images: Sequence[ImageInput]) -> list[Part]:
    """Sort each image argument into a URL, a path, bytes or a file object, in order."""
    if isinstance(images, str | bytes) or hasattr(images, "read"):
        raise TypeError("images: give a list (or tuple) of images, in order")
    parts: list[Part] = []
    for n, image in enumerate(images):
        if is_url(image):
            parts.append(Part(url=str(image)))
        elif isinstance(image, str | os.PathLike):
            path = Path(image)
            if not path.is_file():
                raise DreamgateError("bad_image", f"cannot read {path}: no such file")
            parts.append(Part(path=path, filename=path.name))
        elif isinstance(image, bytes | bytearray | memoryview):
            parts.append(Part(data=bytes(image), filename=f"image-{n}"))
        elif hasattr(image, "read"):
            name = Path(str(getattr(image, "name", "") or f"image-{n}")).name or f"image-{n}"
            seekable = bool(getattr(image, "seekable", lambda: False)())
            parts.append(Part(file=image, seekable=seekable, filename=name))
        else:
            raise TypeError(f"images[{n}]: a path, bytes, a binary file or an http(s) URL")
    return parts


def submit_fields(
    *,
    prompt: str,
    steps: int | None,
    scale: float | None,
    webhook_url: str | None,
    webhook_events: Iterable[str] | None,
    metadata: Mapping[str, Any] | None,
    priority: str | None,
) -> dict[str, Any]:
    """The job's fields, as JSON values (only those given: the gateway has the defaults)."""
    fields: dict[str, Any] = {"prompt": prompt}
    if steps is not None:
        fields["steps"] = steps
    if scale is not None:
        fields["scale"] = scale
    if webhook_url is not None:
        fields["webhook_url"] = webhook_url
    if webhook_events is not None:
        fields["webhook_events"] = list(webhook_events)
    if metadata is not None:
        fields["metadata"] = dict(metadata)
    if priority is not None:
        fields["priority"] = priority
    return fields


def submit_headers(
    *, idempotency_key: str | None, cancel_after: Duration | None, wait: float | None
) -> dict[str, str]:
    headers: dict[str, str] = {}
    if idempotency_key:
        headers["Idempotency-Key"] = idempotency_key
    if cancel_after is not None:
        headers["Cancel-After"] = cancel_after_header(cancel_after)
    if wait is not None and wait > 0:
        headers["Prefer"] = prefer_wait(wait)
    return headers


def multipart(
    parts: list[Part], fields: dict[str, Any], opened: list[IO[bytes]]
) -> tuple[dict[str, Any], list[tuple[str, Any]]]:
    """httpx's ``data`` and ``files`` for a form: images (files and URLs) keep their order.

    URLs travel as file-less parts among the files, since httpx writes ``data`` fields
    before every file. Paths are opened here and added to ``opened`` for closing.
    """
    data: dict[str, Any] = {}
    for name, value in fields.items():
        if name == "metadata":
            data[name] = json.dumps(value)
        elif name == "webhook_events":
            data[name] = list(value)
        else:
            data[name] = str(value)
    files: list[tuple[str, Any]] = []
    for part in parts:
        if part.url is not None:
            files.append(("image_urls", (None, part.url)))
            continue
        ctype = mimetypes.guess_type(part.filename)[0] or "application/octet-stream"
        content: Any
        if part.path is not None:
            try:
                fh = part.path.open("rb")
            except OSError as exc:
                raise DreamgateError(
                    "bad_image", f"cannot read {part.path}: {exc.strerror}"
                ) from exc
            opened.append(fh)
            content = fh
        elif part.data is not None:
            content = part.data
        else:
            content = part.file
        files.append(("images", (part.filename, content, ctype)))
    return data, files


# -- downloads -----------------------------------------------------------------------------


def output_path(dest: str | os.PathLike[str], output: Output) -> Path:
    """``dest`` itself, or ``dest/<filename>`` when it is a directory."""
    path = Path(dest)
    if path.is_dir():
        return path / (Path(output.filename).name or f"output-{output.position}")
    return path


def saved_name(job_id: str, output: Output) -> str:
    """The name ``download_all`` gives an output: ``<job_id>-<n>-<filename>``."""
    return f"{job_id}-{output.position}-{Path(output.filename).name or 'output'}"


def corrupt(output: Output, got: str) -> DreamgateError:
    return DreamgateError(
        "output_corrupt", f"output {output.filename}: sha256 {got} is not {output.sha256}"
    )


# -- Server-Sent Events --------------------------------------------------------------------


class SseParser:
    """Turns lines of a ``text/event-stream`` into events (the WHATWG rules we need)."""

    def __init__(self) -> None:
        self._data: list[str] = []
        self._id: str | None = None
        self._event = ""

    def feed(self, line: str) -> Event | None:
        """One line (without its end); returns an event when a blank line completes one."""
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment: the keep-alive
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "id":
            self._id = value
        elif name == "event":
            self._event = value
        return None

    def _dispatch(self) -> Event | None:
        data, event_id, kind = self._data, self._id, self._event
        self._data, self._event = [], ""
        if not data:
            return None
        try:
            body = json.loads("\n".join(data))
        except ValueError as exc:
            raise DreamgateError("bad_response", "an event's data is not JSON") from exc
        if event_id is not None and "id" not in body:
            body["id"] = event_id
        body.setdefault("kind", kind or "message")
        return Event.from_dict(body)
