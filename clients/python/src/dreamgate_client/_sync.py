"""The synchronous client."""

from __future__ import annotations

import builtins
import hashlib
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import httpx

from dreamgate_client import _base as b
from dreamgate_client._errors import DreamgateError, WaitTimeout, transport_error
from dreamgate_client._models import Event, Job, Output, Page, Priority, Status

# Reads of an event stream: the gateway sends a keep-alive every SSE_KEEPALIVE_S (15 s).
STREAM_READ_TIMEOUT_S = 60.0
Builder = Callable[[int], "dict[str, Any] | None"]


def _job_id(job: Job | str) -> str:
    return job.id if isinstance(job, Job) else str(job)


class Client:
    """The gateway's /v1 API as one API key sees it.

    ``base_url`` defaults to ``$DREAMGATE_URL`` (else ``http://127.0.0.1:8000``), ``key``
    to ``$DREAMGATE_KEY``. A 429 or 503 is sent again after its ``Retry-After`` (up to
    ``max_retries`` times, when the wait is at most ``max_retry_wait`` seconds); every
    failure raises :class:`DreamgateError`.
    """

    def __init__(
        self,
        base_url: str | None = None,
        key: str | None = None,
        *,
        timeout: float = 30.0,
        max_retries: int = 3,
        max_retry_wait: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._s = b.Settings.make(base_url, key, timeout, max_retries, max_retry_wait)
        self._http = httpx.Client(
            base_url=self._s.base_url,
            headers=self._s.headers(),
            timeout=timeout,
            transport=transport,
        )
        # Presigned output URLs point at S3: never send them the API key.
        self._plain = httpx.Client(timeout=timeout, transport=transport, follow_redirects=True)

    @property
    def base_url(self) -> str:
        return self._s.base_url

    def close(self) -> None:
        self._http.close()
        self._plain.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- transport ---------------------------------------------------------------------

    def _send(
        self,
        method: str,
        path: str,
        build: Builder,
        *,
        safe: bool,
        request_timeout: float | httpx.Timeout | None = None,
    ) -> httpx.Response:
        """Send, and send again after a 429/503 (its Retry-After) or, when ``safe``, a
        transport failure. ``build(attempt)`` gives the request's arguments, or None when
        the request cannot be sent again."""
        attempt = 0
        while True:
            kwargs = build(attempt)
            if kwargs is None:
                raise DreamgateError("not_resendable", f"{method} {path}: cannot send it again")
            try:
                r = self._http.request(
                    method,
                    path,
                    timeout=self._s.timeout if request_timeout is None else request_timeout,
                    **kwargs,
                )
            except httpx.HTTPError as exc:
                resend = safe or isinstance(exc, httpx.ConnectError)
                if not resend or attempt >= self._s.max_retries:
                    raise transport_error(exc, f"the gateway at {self.base_url}") from exc
                time.sleep(b.backoff_s(attempt))
                attempt += 1
                continue
            delay = self._s.retry_delay(r, attempt)
            if delay is None:
                return r
            time.sleep(delay)
            attempt += 1

    def _json(self, method: str, path: str, *, safe: bool = True, **kwargs: Any) -> Any:
        timeout = kwargs.pop("timeout", None)
        r = self._send(method, path, lambda _: kwargs, safe=safe, request_timeout=timeout)
        return b.json_of(r, f"{method} {path}")

    # -- usage -------------------------------------------------------------------------

    def usage(
        self,
        *,
        start: str | None = None,
        end: str | None = None,
        group_by: str = "day",
        owner: str | None = None,
    ) -> dict[str, Any]:
        """``GET /v1/usage``: jobs by status, seconds at Wiro, cost and output bytes of the
        jobs created in ``[start, end)`` (ISO dates or times), per ``day`` or ``key``."""
        params: dict[str, Any] = {"group_by": group_by}
        if start:
            params["from"] = start
        if end:
            params["to"] = end
        if owner:
            params["owner"] = owner
        result: dict[str, Any] = self._json("GET", "/v1/usage", params=params)
        return result

    # -- jobs --------------------------------------------------------------------------

    def submit(
        self,
        images: Sequence[b.ImageInput],
        prompt: str,
        *,
        steps: int | None = None,
        scale: float | None = None,
        webhook_url: str | None = None,
        webhook_events: Iterable[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        priority: Priority | None = None,
        idempotency_key: str | None = None,
        cancel_after: b.Duration | None = None,
        wait: float | None = None,
    ) -> Job:
        """Submit an edit. ``images`` in order (the first is edited, the others are
        references): paths, bytes, binary file objects or http(s) URLs. ``cancel_after``
        (seconds, a timedelta or ``"5m"``) is sent as ``Cancel-After``; ``wait`` holds the
        answer up to that many seconds (≤ 60) for the job to end."""
        parts = b.image_parts(images)
        if not parts:
            raise DreamgateError("no_images", "give at least one image")
        fields = b.submit_fields(
            prompt=prompt,
            steps=steps,
            scale=scale,
            webhook_url=webhook_url,
            webhook_events=webhook_events,
            metadata=metadata,
            priority=priority,
        )
        headers = b.submit_headers(
            idempotency_key=idempotency_key, cancel_after=cancel_after, wait=wait
        )
        timeout = self._s.timeout + (wait or 0)
        safe = bool(idempotency_key)
        if all(p.url is not None for p in parts):
            body = {**fields, "image_urls": [p.url for p in parts]}
            r = self._send(
                "POST",
                "/v1/jobs",
                lambda _: {"json": body, "headers": headers},
                safe=safe,
                request_timeout=timeout,
            )
            return Job.from_dict(b.json_of(r, "submit"))
        opened: list[IO[bytes]] = []

        def build(attempt: int) -> dict[str, Any] | None:
            for fh in opened:
                fh.close()
            opened.clear()
            if attempt and not all(p.rewind() for p in parts):
                return None
            data, files = b.multipart(parts, fields, opened)
            return {"data": data, "files": files, "headers": headers}

        try:
            r = self._send("POST", "/v1/jobs", build, safe=safe, request_timeout=timeout)
        finally:
            for fh in opened:
                fh.close()
        return Job.from_dict(b.json_of(r, "submit"))

    def get(self, job: Job | str, *, wait: float | None = None) -> Job:
        """One job. With ``wait`` the gateway holds the answer up to that many seconds
        (``Prefer: wait``, at most 60) until the job ends."""
        headers: dict[str, str] = {}
        timeout = None
        if wait is not None and wait > 0:
            headers["Prefer"] = b.prefer_wait(wait)
            timeout = self._s.timeout + min(wait, b.MAX_HOLD_S)
        path = f"/v1/jobs/{_job_id(job)}"
        return Job.from_dict(self._json("GET", path, headers=headers, timeout=timeout))

    def wait(
        self,
        job: Job | str,
        *,
        timeout: float | None = None,
        hold: float = b.MAX_HOLD_S,
        on_update: Callable[[Job], None] | None = None,
        poll_interval: float = 1.0,
    ) -> Job:
        """The job once it has ended, asking the gateway to hold each read (``Prefer:
        wait``, ``hold`` seconds at most). ``on_update`` sees every version read. Raises
        :class:`WaitTimeout` when ``timeout`` seconds pass first."""
        job_id = _job_id(job)
        deadline = None if timeout is None else time.monotonic() + timeout
        current = self.get(job_id)
        while True:
            if on_update is not None:
                on_update(current)
            if current.terminal:
                return current
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise WaitTimeout(
                    f"job {job_id} still {current.status} after {timeout:g} s", current
                )
            left = hold if deadline is None else min(hold, deadline - now)
            seen = (current.status, current.wiro.status, current.updated_at)
            current = self.get(job_id, wait=max(1.0, left))
            spent = time.monotonic() - now
            # A gateway that answers at once anyway is polled, not hammered.
            if (current.status, current.wiro.status, current.updated_at) == seen:
                pause = poll_interval - spent
                if deadline is not None:
                    pause = min(pause, deadline - time.monotonic())
                if pause > 0:
                    time.sleep(pause)

    def list(
        self, *, status: Status | None = None, limit: int = 20, cursor: str | None = None
    ) -> Page:
        """One page of the key's jobs, newest first."""
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        if cursor:
            params["cursor"] = cursor
        return Page.from_dict(self._json("GET", "/v1/jobs", params=params))

    def pages(self, *, status: Status | None = None, page_size: int = 100) -> Iterator[Page]:
        """Every page of the key's jobs, newest first, following ``next_cursor``."""
        cursor: str | None = None
        while True:
            page = self.list(status=status, limit=page_size, cursor=cursor)
            yield page
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def iter_jobs(self, *, status: Status | None = None, page_size: int = 100) -> Iterator[Job]:
        """Every job of the key, newest first, page after page."""
        for page in self.pages(status=status, page_size=page_size):
            yield from page.data

    def cancel(self, job: Job | str) -> Job:
        """Cancel a job: at once while Wiro does not have it, else asked of Wiro (the job
        turns ``canceled`` when Wiro confirms)."""
        return Job.from_dict(self._json("POST", f"/v1/jobs/{_job_id(job)}/cancel", safe=False))

    def stream(
        self, job: Job | str, *, last_event_id: int | None = None, max_reconnects: int = 5
    ) -> Iterator[Event]:
        """The job's timeline as it happens (Server-Sent Events), from the start or after
        ``last_event_id``; ends after the event that ended the job. A dropped connection is
        resumed where it stopped (``Last-Event-ID``)."""
        job_id = _job_id(job)
        last = last_event_id
        failures = 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if last is not None:
                headers["Last-Event-ID"] = str(last)
            ended = False
            try:
                with self._http.stream(
                    "GET",
                    f"/v1/jobs/{job_id}/events",
                    headers=headers,
                    timeout=httpx.Timeout(self._s.timeout, read=STREAM_READ_TIMEOUT_S),
                ) as r:
                    if r.status_code >= 400:
                        r.read()
                        delay = self._s.retry_delay(r, failures)
                        if delay is None:
                            b.raise_for(r)
                        failures += 1
                        time.sleep(delay or 0)
                        continue
                    parser = b.SseParser()
                    for line in r.iter_lines():
                        event = parser.feed(line)
                        if event is None:
                            continue
                        failures = 0
                        last = event.id
                        yield event
                        if event.terminal:
                            return
                ended = True
            except httpx.TransportError as exc:
                if failures >= max_reconnects:
                    raise transport_error(exc, f"the gateway at {self.base_url}") from exc
            # The gateway ends a stream once the job is over, or when it shuts down.
            if ended and self.get(job_id).terminal:
                return
            if failures >= max_reconnects:
                raise DreamgateError("stream_ended", f"the event stream of job {job_id} ended")
            failures += 1
            time.sleep(b.backoff_s(failures))

    # -- outputs -----------------------------------------------------------------------

    def _save(self, url: str, tmp: Path) -> tuple[str | None, int]:
        """Stream ``url`` into ``tmp``: (its sha256, or None when refused; the status)."""
        try:
            with self._plain.stream("GET", url) as r:
                if r.status_code >= 400:
                    r.read()
                    return None, r.status_code
                digest = hashlib.sha256()
                with tmp.open("wb") as fh:
                    for chunk in r.iter_bytes(64 * 1024):
                        digest.update(chunk)
                        fh.write(chunk)
                return digest.hexdigest(), r.status_code
        except httpx.HTTPError as exc:
            raise transport_error(exc, "the output's storage") from exc

    def download(self, output: Output, dest: str | os.PathLike[str]) -> Path:
        """Save one output to ``dest`` (a file, or a directory to put it in), checking its
        sha256. An expired presigned URL is renewed through the gateway (``href``)."""
        path = b.output_path(dest, output)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        try:
            digest, status = self._save(output.url, tmp)
            if digest is None and output.href:
                r = self._send("GET", output.href, lambda _: {"follow_redirects": False}, safe=True)
                if r.status_code != 307 or "location" not in r.headers:
                    b.raise_for(r)
                    raise DreamgateError("bad_response", f"{output.href}: no redirect")
                digest, status = self._save(r.headers["location"], tmp)
            if digest is None:
                raise DreamgateError(
                    "download_failed",
                    f"output {output.filename}: HTTP {status} from storage",
                    status=status,
                )
            if output.sha256 and digest != output.sha256:
                raise b.corrupt(output, digest)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def download_all(self, job: Job, out_dir: str | os.PathLike[str]) -> builtins.list[Path]:
        """Every output of ``job`` into ``out_dir``, as ``<job_id>-<n>-<filename>``."""
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        return [self.download(o, folder / b.saved_name(job.id, o)) for o in job.outputs]
