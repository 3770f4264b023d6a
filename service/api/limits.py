"""Refuse oversized or idle request bodies while they stream in, before anything buffers
them.

Written as a raw ASGI middleware because Starlette has neither a body-size limit nor a body
read timeout of its own, and a BaseHTTPMiddleware would buffer the body first. The request head
is bounded by the server: in size by uvicorn's ``h11_max_incomplete_event_size``, in time by
``service/api/protocol.py`` (both set by ``dreamgate serve``).
"""

from __future__ import annotations

import asyncio
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import PROBLEM_TYPE, mib, title


class SlowBody(BaseException):
    """No part of the body came for ``read_timeout_s`` (a BaseException, as TooLargeBody)."""


class TooLargeBody(BaseException):
    """The body went past the limit while streaming.

    A BaseException, so that no ``except Exception`` on the way (the multipart parser's
    callers, error handlers) turns it into another answer before this middleware sees it.
    """


def problem_body(status: int, code: str, detail: str, path: str | None) -> bytes:
    """A problem+json document, for answers written below FastAPI's handlers."""
    doc = {
        "type": PROBLEM_TYPE + code,
        "title": title(status),
        "status": status,
        "detail": detail,
        "code": code,
    }
    if path is not None:
        doc["instance"] = path
    return json.dumps(doc).encode()


class BodyLimit:
    """Answer 413 (problem+json) to bodies over ``limit`` bytes, declared or streamed, and
    408 to a body that stops coming for ``read_timeout_s`` (a client idle mid-body would
    otherwise hold its connection and a worker thread for as long as it likes)."""

    def __init__(self, app: ASGIApp, *, limit: int, read_timeout_s: float = 30.0) -> None:
        self.app = app
        self.limit = limit
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send, 413, "payload_too_large", self._too_large(), path)
            return
        seen = 0
        started = False
        complete = False

        async def counting_receive() -> Message:
            nonlocal seen, complete
            if complete:
                # Past the body, receive() waits for the disconnect (SSE listens for it):
                # no clock then.
                return await receive()
            try:
                # asyncio.timeout, not wait_for: no task made per chunk on the hot path.
                async with asyncio.timeout(self.read_timeout_s):
                    message = await receive()
            except TimeoutError:
                raise SlowBody from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise TooLargeBody
                complete = not message.get("more_body", False)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except TooLargeBody:
            if not started:
                await self._refuse(send, 413, "payload_too_large", self._too_large(), path)
        except SlowBody:
            if not started:
                detail = f"no part of the request body came for {self.read_timeout_s:g} s"
                await self._refuse(send, 408, "request_timeout", detail, path)

    def _too_large(self) -> str:
        return f"the request body is larger than {mib(self.limit)}"

    async def _refuse(self, send: Send, status: int, code: str, detail: str, path: str) -> None:
        body = problem_body(status, code, detail, path)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/problem+json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
