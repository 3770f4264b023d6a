"""Wiro's HTTP API: signing, Run, Task/Detail, Task/Kill, Task/Cancel, and typed errors.

Retry policy (also in the README, "Wiro client policy"):

* Task/Detail, Kill and Cancel are safe to repeat; they are retried here on connection
  errors, timeouts, 408, 429, 5xx and Wiro error code 96, up to ``attempts`` times with
  jittered exponential backoff, honouring ``Retry-After`` (capped). An account refusal
  (below) is not retried here: it will not pass within seconds.
* Run is never retried here. Its failures are classified by what Wiro did, so the caller
  can decide: ``WiroRefused`` means Wiro certainly did not accept the task (the connection
  was never made, or Wiro answered 429/503 or code 96) and it is safe to send again later;
  ``WiroAccountRefused``, a kind of refusal, means Wiro refused our account (HTTP 401/403,
  an authentication message, code 97/98/99): no task was made, and every other Run would
  be refused the same way until someone fixes the key or the balance; ``WiroUncertain``
  means the request may have created a task (408, read timeout, 500/502/504, an
  unreadable answer) and it must not be sent again; ``WiroRejected`` means Wiro refused
  this request for good (validation, model not found).

Statuses (WIRO.md, "The task's life"): only ``task_postprocess_end`` and ``task_cancel``
end a task. ``task_error`` is Wiro's interim stderr event, and any status that no list
names yet means "still running" too (``WiroTask.known`` tells them apart for logging).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import IO, Any, Literal

import httpx
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from service import metrics

# Wiro's lifecycle in the order of its docs (tasks.md); order is not relied on.
LIFECYCLE = (
    "task_queue",
    "task_accept",
    "task_preprocess_start",
    "task_preprocess_end",
    "task_assign",
    "task_start",
    "task_output",
    "task_output_full",
    "task_end",
    "task_postprocess_start",
    "task_postprocess_end",
)
TERMINAL_STATUSES = frozenset({"task_postprocess_end", "task_cancel"})
# Interim events (stderr) and the realtime models' statuses: named, never terminal.
INTERIM_STATUSES = frozenset(
    {"task_error", "task_error_full", "task_stream_ready", "task_stream_end", "task_cost"}
)
KNOWN_STATUSES = frozenset(LIFECYCLE) | TERMINAL_STATUSES | INTERIM_STATUSES
RUNNING_STATUSES = KNOWN_STATUSES - TERMINAL_STATUSES
QUEUED_STATUSES = frozenset({"task_queue"})
# Accepted by a worker but not yet on a GPU: Cancel and Kill may both refuse (code 1).
PREPROCESSING_STATUSES = frozenset({"task_accept", "task_preprocess_start", "task_preprocess_end"})

CODE_VALIDATION = 0
CODE_NOT_FOUND = 1
CODE_CONCURRENCY = 96
CODE_BALANCE = 97
CODE_SIGN_IN = 98
CODE_TOKEN = 99
MAX_RETRY_AFTER_S = 60.0

# Words of Wiro's account errors (error-reference.md: "Project authorization is not
# founded.", "... requires signature authentication ...", "Requested ip ... is not
# allowed.", "Your account has been suspended ...", "You don't have any permission ..."):
# a code 0 with one of them is an account refusal, not a validation error.
_AUTH_WORDS = (
    "authoriz",
    "signature",
    "x-api-key",
    "api key",
    "not allowed",
    "sign in",
    "suspended",
    "permission",
)

StopCall = Literal["cancel", "kill"]


def stop_calls(status: str | None) -> tuple[StopCall, ...]:
    """Which calls may stop a task in ``status``, the likelier first.

    Cancel works only while Wiro queues the task, Kill only after ``task_assign``; between
    the two (preprocessing) both may refuse, and a status we have not seen (or a task
    Task/Detail cannot find yet) could be either side, so both are tried.
    """
    if status in QUEUED_STATUSES or status in PREPROCESSING_STATUSES or status is None:
        return ("cancel", "kill")
    return ("kill", "cancel")


class WiroError(Exception):
    """Any failure talking to Wiro."""

    def __init__(
        self,
        message: str,
        *,
        code: int | None = None,
        http_status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.http_status = http_status
        self.retry_after = retry_after

    def as_detail(self) -> dict[str, Any]:
        """A JSON-able description for the job's timeline."""
        return {
            "error": type(self).__name__,
            "message": self.message,
            "code": self.code,
            "http_status": self.http_status,
            "retry_after": self.retry_after,
        }


class WiroRefused(WiroError):
    """Wiro certainly did not act on the request; sending it again later is safe."""


class WiroAccountRefused(WiroRefused):
    """Wiro refused our account (credentials or balance): no task was made, and no Run
    will pass until someone fixes it. ``reason`` is ``credentials`` or ``balance``."""

    def __init__(self, message: str, *, reason: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.reason = reason

    def as_detail(self) -> dict[str, Any]:
        """The timeline's description, with the reason."""
        return {**super().as_detail(), "reason": self.reason}


class WiroUncertain(WiroError):
    """The request may or may not have taken effect at Wiro."""


class WiroRejected(WiroError):
    """Wiro refused the request for good (validation, balance, authentication, not found)."""


class Outcome(StrEnum):
    """What a Wiro task means for our job, per WIRO.md."""

    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"


@dataclass(frozen=True)
class WiroOutput:
    """One output file as Wiro lists it."""

    name: str
    url: str
    content_type: str
    size: int | None

    def as_json(self) -> dict[str, Any]:
        """The form kept in ``jobs.wiro_outputs``."""
        return {
            "name": self.name,
            "url": self.url,
            "content_type": self.content_type,
            "size": self.size,
        }


@dataclass(frozen=True)
class WiroTask:
    """The fields of a Task/Detail task object that the gateway acts on."""

    id: str
    status: str
    socket_token: str | None = None
    pexit: str | None = None
    debugerror: str = ""
    outputs: tuple[WiroOutput, ...] = ()
    totalcost: Decimal | None = None
    callbackurl: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def known(self) -> bool:
        """False for a status that none of Wiro's lists names (it still means running)."""
        return self.status in KNOWN_STATUSES

    @property
    def outcome(self) -> Outcome:
        """Classify the task as WIRO.md says: only task_postprocess_end (judged by pexit
        and outputs) and task_cancel end it; task_error and unknown statuses are running."""
        if self.status == "task_cancel":
            return Outcome.canceled
        if self.status == "task_postprocess_end":
            ok = self.pexit in (None, "", "0") and bool(self.outputs)
            return Outcome.succeeded if ok else Outcome.failed
        return Outcome.running

    @property
    def failure_message(self) -> str:
        """Wiro's reason for a failed task, never empty."""
        if self.debugerror.strip():
            return self.debugerror.strip()
        if self.status == "task_postprocess_end" and not self.outputs:
            return f"Wiro finished the task without outputs (pexit {self.pexit or '0'})"
        return f"Wiro task ended with status {self.status} (pexit {self.pexit or 'n/a'})"


@dataclass(frozen=True)
class RunAccepted:
    """Run's answer: the task Wiro created for us."""

    taskid: str
    socket_token: str | None


@dataclass(frozen=True)
class RunInput:
    """One ``inputImage`` part: an open file, or a URL passed as a plain value."""

    url: str | None = None
    file: IO[bytes] | None = None
    filename: str | None = None
    content_type: str | None = None


def sign(api_key: str, api_secret: str, nonce: str) -> str:
    """Wiro's signature: hex HMAC-SHA256 keyed with the API key over secret + nonce."""
    return hmac.new(api_key.encode(), (api_secret + nonce).encode(), hashlib.sha256).hexdigest()


def parse_task(obj: Mapping[str, Any]) -> WiroTask:
    """Read a task object; tolerant of Wiro's strings-for-numbers and missing fields."""
    outputs = tuple(
        WiroOutput(
            name=str(o.get("name") or f"{n}.bin"),
            url=str(o["url"]),
            content_type=str(o.get("contenttype") or "application/octet-stream"),
            size=_int_or_none(o.get("size")),
        )
        for n, o in enumerate(obj.get("outputs") or [])
        if isinstance(o, Mapping) and o.get("url")
    )
    pexit = obj.get("pexit")
    return WiroTask(
        id=str(obj.get("id", "")),
        status=str(obj.get("status", "")),
        socket_token=obj.get("socketaccesstoken"),
        pexit=None if pexit is None else str(pexit),
        debugerror=str(obj.get("debugerror") or ""),
        outputs=outputs,
        totalcost=_decimal_or_none(obj.get("totalcost")),
        callbackurl=obj.get("callbackurl") or None,
        raw=dict(obj),
    )


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _decimal_or_none(value: Any) -> Decimal | None:
    try:
        return None if value in (None, "") else Decimal(str(value))
    except InvalidOperation:
        return None


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER_S)
    except ValueError:
        return None


def _wait_honouring_retry_after(state: RetryCallState) -> float:
    exc = state.outcome.exception() if state.outcome else None
    if isinstance(exc, WiroError) and exc.retry_after is not None:
        return exc.retry_after
    return float(wait_random_exponential(multiplier=0.5, max=10)(state))


class WiroClient:
    """A synchronous client for Wiro's v1 API; one per process, shared by threads."""

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str,
        api_secret: str | None,
        model: str,
        timeout_s: float = 30.0,
        attempts: int = 4,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._api_key = api_key
        self._api_secret = api_secret or None
        self._model = model.strip("/")
        self._attempts = attempts
        self._http = httpx.Client(
            base_url=base_url.rstrip("/") + "/",
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
            follow_redirects=False,
            transport=transport,
            headers={"user-agent": "dreamgate/0.1"},
        )

    def close(self) -> None:
        """Release the connection pool."""
        self._http.close()

    def headers(self) -> dict[str, str]:
        """Authentication headers: key alone in API-key-only mode, else key, nonce, signature."""
        headers = {"x-api-key": self._api_key}
        if self._api_secret:
            nonce = str(time.time_ns() // 1000)
            headers["x-nonce"] = nonce
            headers["x-signature"] = sign(self._api_key, self._api_secret, nonce)
        return headers

    # -- Run ---------------------------------------------------------------------------

    def run(
        self,
        *,
        inputs: Sequence[RunInput],
        prompt: str,
        steps: int,
        scale: float | Decimal,
        callback_url: str | None,
    ) -> RunAccepted:
        """Start one task. Never retried here: see the module's policy."""
        parts: list[tuple[str, Any]] = []
        for item in inputs:
            if item.file is not None:
                filename = item.filename or "image"
                ctype = item.content_type or "application/octet-stream"
                parts.append(("inputImage", (filename, item.file, ctype)))
            else:
                parts.append(("inputImage", (None, item.url or "")))
        parts += [
            ("prompt", (None, prompt)),
            ("steps", (None, str(steps))),
            ("scale", (None, _format_scale(scale))),
        ]
        if callback_url:
            parts.append(("callbackUrl", (None, callback_url)))
        with metrics.timed_wiro("Run"):
            try:
                response = self._http.post(
                    f"Run/{self._model}", files=parts, headers=self.headers()
                )
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                # The connection never opened, so nothing reached Wiro.
                raise WiroRefused(f"could not connect to Wiro: {exc}") from exc
            except httpx.TransportError as exc:
                raise WiroUncertain(
                    f"Run failed after sending: {type(exc).__name__}: {exc}"
                ) from exc
            body = self._check(response, certain_statuses=frozenset({429, 503}))
            taskid = body.get("taskid")
            if not taskid:
                raise WiroUncertain(
                    "Run answered without a taskid", http_status=response.status_code
                )
        return RunAccepted(taskid=str(taskid), socket_token=body.get("socketaccesstoken"))

    # -- idempotent calls ----------------------------------------------------------------

    def task_detail(self, *, taskid: str | None = None, tasktoken: str | None = None) -> WiroTask:
        """The task as Wiro sees it now, by taskid or socket access token."""
        data = {"taskid": taskid} if taskid else {"tasktoken": tasktoken or ""}
        body = self._retrying("Task/Detail", data)
        return self._first_task(body)

    def kill(self, *, taskid: str) -> WiroTask:
        """Stop a running task; Wiro answers with the task, normally ``task_cancel``."""
        return self._first_task(self._retrying("Task/Kill", {"taskid": taskid}))

    def cancel(self, *, taskid: str) -> WiroTask:
        """Remove a task still in Wiro's queue."""
        return self._first_task(self._retrying("Task/Cancel", {"taskid": taskid}))

    def input_output_delete(self, *, socket_token: str) -> None:
        """Remove a finished task's inputs and outputs at Wiro (``Task/InputOutputDelete``,
        by the task's socket access token; seen in Wiro's clients, not in its docs)."""
        self._retrying("Task/InputOutputDelete", {"tasktoken": socket_token})

    def _first_task(self, body: Mapping[str, Any]) -> WiroTask:
        tasks = body.get("tasklist")
        if isinstance(tasks, Mapping):
            tasks = [tasks]
        if not isinstance(tasks, list) or not tasks or not isinstance(tasks[0], Mapping):
            raise WiroRejected("Wiro answered without a task", code=CODE_NOT_FOUND)
        return parse_task(tasks[0])

    def _retrying(self, path: str, data: Mapping[str, str]) -> Mapping[str, Any]:
        retrying = Retrying(
            retry=retry_if_exception(_transient),
            stop=stop_after_attempt(self._attempts),
            wait=_wait_honouring_retry_after,
            reraise=True,
        )
        for attempt in retrying:
            with attempt:
                return self._post_once(path, data)
        raise AssertionError("unreachable")  # pragma: no cover

    def _post_once(self, path: str, data: Mapping[str, str]) -> Mapping[str, Any]:
        # Wiro documents multipart/form-data for every call; send exactly that.
        files = [(k, (None, v)) for k, v in data.items()]
        with metrics.timed_wiro(path):
            try:
                response = self._http.post(path, files=files, headers=self.headers())
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                raise WiroRefused(f"could not connect to Wiro: {exc}") from exc
            except httpx.TransportError as exc:
                raise WiroUncertain(f"{path} failed: {type(exc).__name__}: {exc}") from exc
            return self._check(response, certain_statuses=frozenset({408, 429, 503}))

    # -- answers -------------------------------------------------------------------------

    def _check(
        self, response: httpx.Response, *, certain_statuses: frozenset[int]
    ) -> Mapping[str, Any]:
        """Check the HTTP status and Wiro's ``result`` flag; raise the matching error."""
        status = response.status_code
        retry_after = _retry_after(response)
        try:
            body = response.json()
        except ValueError:
            body = None
        if status == 200 and isinstance(body, Mapping) and body.get("result") is True:
            return body
        error = _first_error(body)
        code = error[0] if error else None
        message = error[1] if error else f"HTTP {status} from Wiro"
        kwargs: dict[str, Any] = {"code": code, "http_status": status, "retry_after": retry_after}
        account = _account_refusal(status, code, message)
        if account is not None:
            raise WiroAccountRefused(message, reason=account, **kwargs)
        if status in certain_statuses or code == CODE_CONCURRENCY:
            raise WiroRefused(message, **kwargs)
        # 408 (the server timed out reading or answering) and 5xx: it may have acted.
        if status >= 500 or status == 408 or (status == 200 and not isinstance(body, Mapping)):
            raise WiroUncertain(message, **kwargs)
        raise WiroRejected(message, **kwargs)


def _transient(exc: BaseException) -> bool:
    """Worth another try within seconds: a refusal (not of our account) or an uncertainty."""
    return isinstance(exc, WiroRefused | WiroUncertain) and not isinstance(exc, WiroAccountRefused)


def _account_refusal(status: int, code: int | None, message: str) -> str | None:
    """``credentials`` or ``balance`` when Wiro refused our account, else None.

    Wiro answers authentication failures with HTTP 401 and code 0 (a signature mismatch
    may be a 403); its sign-in and bearer-token errors are codes 98 and 99, and 97 is an
    insufficient balance. Code 0 alone is not enough (it covers validation and server
    errors too), so at HTTP 200 it counts only with an authentication message.
    """
    if code == CODE_BALANCE:
        return "balance"
    if status in (401, 403) or code in (CODE_SIGN_IN, CODE_TOKEN):
        return "credentials"
    if code == CODE_VALIDATION and any(w in message.lower() for w in _AUTH_WORDS):
        return "credentials"
    return None


def _first_error(body: Any) -> tuple[int | None, str] | None:
    """Wiro's first error as (code, message), whatever shape ``errors`` came in.

    The docs show a list of ``{code, message}`` objects; a list of strings, one object, a
    bare string or a missing field are read too rather than trusted to never happen.
    """
    if not isinstance(body, Mapping):
        return None
    errors = body.get("errors")
    if isinstance(errors, list | tuple):
        errors = errors[0] if errors else None
    if isinstance(errors, Mapping):
        message = errors.get("message", errors.get("error", ""))
        return _int_or_none(errors.get("code")), str(message or "")[:2000]
    if isinstance(errors, str | int | float) and str(errors).strip():
        return None, str(errors)[:2000]
    message = body.get("message")
    if isinstance(message, str) and message.strip() and body.get("result") is not True:
        return _int_or_none(body.get("code")), message[:2000]
    return None


def _format_scale(scale: float | Decimal) -> str:
    # Wiro takes scale as a string; "3.5", not "3.500".
    text = format(Decimal(str(scale)).normalize(), "f")
    return text
