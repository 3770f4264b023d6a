"""The one exception type: a refusal of the gateway, or a failure to reach it."""

from __future__ import annotations

from typing import Any

import httpx


class DreamgateError(Exception):
    """The gateway refused (its problem document's ``code`` and ``detail``), could not be
    reached, or answered something unreadable.

    ``code`` is stable and meant for machines: the gateway's own (``job_not_found``,
    ``rate_limited``, ...) or one of the client's (``unreachable``, ``timeout``,
    ``network_error``, ``bad_response``, ``wait_timeout``, ``download_failed``,
    ``output_corrupt``, ``invalid_webhook``).
    """

    def __init__(
        self,
        code: str,
        detail: str,
        *,
        status: int | None = None,
        problem: dict[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{detail} ({code})")
        self.code = code
        self.detail = detail
        self.status = status
        self.problem = problem
        self.retry_after = retry_after


class WaitTimeout(DreamgateError):
    """``wait()`` ran out of time before the job ended; ``job`` is the job as last seen."""

    def __init__(self, detail: str, job: Any) -> None:
        super().__init__("wait_timeout", detail)
        self.job = job


class InvalidWebhook(DreamgateError):
    """A webhook whose signature, timestamp or body does not check out."""

    def __init__(self, detail: str) -> None:
        super().__init__("invalid_webhook", detail)


def problem_error(response: httpx.Response, retry_after: float | None = None) -> DreamgateError:
    """The error for a refused request, from its problem+json document when it has one."""
    code = f"http_{response.status_code}"
    detail = response.reason_phrase or "request refused"
    problem: dict[str, Any] | None = None
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()
        if text:
            detail = text.splitlines()[0][:200]
    else:
        if isinstance(body, dict):
            problem = body
            code = str(body.get("code") or code)
            raw = body.get("detail")
            detail = raw if isinstance(raw, str) else str(raw) if raw is not None else detail
    return DreamgateError(
        code, detail, status=response.status_code, problem=problem, retry_after=retry_after
    )


def transport_error(exc: httpx.HTTPError, where: str) -> DreamgateError:
    """One readable error for httpx's transport failures."""
    if isinstance(exc, httpx.ConnectError):
        return DreamgateError("unreachable", f"cannot reach {where}")
    if isinstance(exc, httpx.TimeoutException):
        return DreamgateError("timeout", f"{where} did not answer in time")
    return DreamgateError("network_error", f"{type(exc).__name__}: {exc}")
