"""A small typed HTTP client of the gateway's public API (used by ``dreamgate`` commands).

Every failure, whether the gateway refused (a problem+json document) or could not be
reached at all, raises :class:`GatewayError` with a stable ``code`` and a readable
``detail``; nothing else escapes from here for the usual network troubles.
"""

from __future__ import annotations

import builtins
import hashlib
import mimetypes
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import httpx

TERMINAL = frozenset({"succeeded", "failed", "canceled"})
DEFAULT_URL = "http://127.0.0.1:8000"

Job = dict[str, Any]


class GatewayError(Exception):
    """A refusal of the gateway (its problem ``code`` and ``detail``) or a network failure."""

    def __init__(self, code: str, detail: str, *, status: int | None = None) -> None:
        super().__init__(f"{detail} ({code})")
        self.code = code
        self.detail = detail
        self.status = status


def is_url(value: str) -> bool:
    """Whether a command-line image argument is an http(s) URL rather than a file."""
    return value.lower().startswith(("http://", "https://"))


def _problem(response: httpx.Response) -> GatewayError:
    """The GatewayError for a refused request, from its problem document when it has one."""
    code, detail = f"http_{response.status_code}", response.reason_phrase or "request refused"
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()
        if text:
            detail = text.splitlines()[0][:200]
    else:
        if isinstance(body, dict):
            code = str(body.get("code") or code)
            raw = body.get("detail")
            detail = raw if isinstance(raw, str) else str(raw) if raw is not None else detail
    return GatewayError(code, detail, status=response.status_code)


@contextmanager
def _network(where: str) -> Iterator[None]:
    """Turn httpx's transport errors into one readable GatewayError."""
    try:
        yield
    except httpx.ConnectError as exc:
        raise GatewayError("unreachable", f"cannot reach {where}") from exc
    except httpx.TimeoutException as exc:
        raise GatewayError("timeout", f"{where} did not answer in time") from exc
    except httpx.HTTPError as exc:
        raise GatewayError("network_error", f"{type(exc).__name__}: {exc}") from exc


class Client:
    """The gateway's /v1/jobs API, as one API key sees it."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        key: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._timeout = timeout
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )
        # Presigned output URLs point at S3: never send them the API key.
        self._plain = httpx.Client(timeout=timeout, transport=transport, follow_redirects=True)

    def close(self) -> None:
        self._http.close()
        self._plain.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _request(
        self, method: str, path: str, *, timeout: float | None = None, **kwargs: Any
    ) -> Any:
        with _network(f"the gateway at {self.base_url}"):
            r = self._http.request(
                method, path, timeout=timeout if timeout is not None else self._timeout, **kwargs
            )
        if r.status_code >= 400:
            raise _problem(r)
        try:
            return r.json()
        except ValueError as exc:
            raise GatewayError("bad_response", f"{method} {path}: the answer is not JSON") from exc

    def submit(
        self,
        images: Sequence[str | Path],
        prompt: str,
        *,
        steps: int | None = None,
        scale: float | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """Submit an edit: files are uploaded and URLs passed on, in the order given."""
        data: dict[str, str] = {"prompt": prompt}
        if steps is not None:
            data["steps"] = str(steps)
        if scale is not None:
            data["scale"] = str(scale)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        with ExitStack() as files_open:
            parts: list[tuple[str, tuple[str | None, BinaryIO | str, str | None]]] = []
            for image in images:
                if isinstance(image, str) and is_url(image):
                    parts.append(("image_urls", (None, image, None)))
                    continue
                path = Path(image)
                try:
                    fh: BinaryIO = files_open.enter_context(path.open("rb"))
                except OSError as exc:
                    raise GatewayError("bad_image", f"cannot read {path}: {exc.strerror}") from exc
                ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
                parts.append(("images", (path.name, fh, ctype)))
            job: Job = self._request(
                "POST", "/v1/jobs", data=data, files=parts or None, headers=headers
            )
        return job

    def get(self, job_id: str, *, wait: float | None = None) -> Job:
        """One job; with ``wait`` the gateway may hold the answer up to that many seconds
        (``Prefer: wait=N``) until the job changes."""
        headers, timeout = {}, None
        if wait is not None and wait > 0:
            headers["Prefer"] = f"wait={int(wait)}"
            timeout = self._timeout + wait
        job: Job = self._request("GET", f"/v1/jobs/{job_id}", headers=headers, timeout=timeout)
        return job

    def list(
        self, *, status: str | None = None, limit: int = 20, cursor: str | None = None
    ) -> dict[str, Any]:
        """A page of jobs, newest first: ``{"data": [...], "next_cursor": ...}``."""
        params: dict[str, str | int] = {"limit": limit}
        if status:
            params["status"] = status
        if cursor:
            params["cursor"] = cursor
        page: dict[str, Any] = self._request("GET", "/v1/jobs", params=params)
        return page

    def cancel(self, job_id: str) -> Job:
        """Cancel a job (at once, or asked of Wiro; see the API's docs)."""
        job: Job = self._request("POST", f"/v1/jobs/{job_id}/cancel")
        return job

    def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        on_update: Callable[[Job], None] | None = None,
        poll_interval: float = 1.0,
        hold: float = 10.0,
    ) -> Job:
        """Follow a job until it is terminal; ``on_update`` sees every version fetched.

        Each request asks the gateway to hold it (``Prefer: wait``); a gateway that
        answers at once anyway is simply polled every ``poll_interval`` seconds.
        Raises GatewayError ``wait_timeout`` when ``timeout`` runs out first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        job = self.get(job_id)
        while True:
            if on_update is not None:
                on_update(job)
            if job["status"] in TERMINAL:
                return job
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise GatewayError(
                    "wait_timeout", f"job {job_id} still {job['status']} after {timeout:g} s"
                )
            left = hold if deadline is None else min(hold, deadline - now)
            started = time.monotonic()
            seen = _fingerprint(job)
            job = self.get(job_id, wait=max(1, int(left)))
            spent = time.monotonic() - started
            if _fingerprint(job) == seen and spent < poll_interval:
                pause = poll_interval - spent
                if deadline is not None:
                    pause = min(pause, max(0.0, deadline - time.monotonic()))
                time.sleep(pause)

    def download(self, output: dict[str, Any], dest: Path) -> Path:
        """Stream one output (its presigned ``url``) to ``dest``, checking its sha256."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        digest = hashlib.sha256()
        try:
            with _network("the output's storage"), self._plain.stream("GET", output["url"]) as r:
                if r.status_code >= 400:
                    r.read()
                    raise GatewayError(
                        "download_failed",
                        f"output {output.get('filename')}: HTTP {r.status_code} from storage",
                        status=r.status_code,
                    )
                with part.open("wb") as fh:
                    for chunk in r.iter_bytes(64 * 1024):
                        digest.update(chunk)
                        fh.write(chunk)
            want = output.get("sha256")
            if want and digest.hexdigest() != want:
                raise GatewayError(
                    "output_corrupt",
                    f"output {output.get('filename')}: sha256 {digest.hexdigest()} != {want}",
                )
            part.replace(dest)
        finally:
            part.unlink(missing_ok=True)
        return dest

    def save_outputs(self, job: Job, out_dir: Path) -> builtins.list[Path]:
        """Download every output of a job into ``out_dir`` as ``<job_id>-<n>-<name>``."""
        saved: builtins.list[Path] = []
        for o in job.get("outputs") or []:
            name = Path(str(o.get("filename") or "output")).name or "output"
            saved.append(self.download(o, out_dir / f"{job['id']}-{o['position']}-{name}"))
        return saved


def _fingerprint(job: Job) -> tuple[Any, ...]:
    wiro = job.get("wiro") or {}
    return (job.get("status"), wiro.get("status"), job.get("updated_at"))
