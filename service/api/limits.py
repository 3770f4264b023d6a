"""Refuse oversized request bodies while they stream in, before anything buffers them.

Written as a raw ASGI middleware because Starlette has no body-size limit of its own and
a BaseHTTPMiddleware would buffer the body first. Headers are bounded by the server
(uvicorn's ``h11_max_incomplete_event_size``, set by ``dreamgate serve``).
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import PROBLEM_TYPE, mib, title


class TooLargeBody(BaseException):
    """The body went past the limit while streaming.

    A BaseException, so that no ``except Exception`` on the way (the multipart parser's
    callers, error handlers) turns it into another answer before this middleware sees it.
    """


def _problem(limit: int, path: str) -> bytes:
    return json.dumps(
        {
            "type": PROBLEM_TYPE + "payload_too_large",
            "title": title(413),
            "status": 413,
            "detail": f"the request body is larger than {mib(limit)}",
            "code": "payload_too_large",
            "instance": path,
        }
    ).encode()


class BodyLimit:
    """Answer 413 (problem+json) to bodies over ``limit`` bytes, declared or streamed."""

    def __init__(self, app: ASGIApp, *, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, send)
            return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise TooLargeBody
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except TooLargeBody:
            if not started:
                await self._refuse(scope, send)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        body = _problem(self.limit, scope.get("path", ""))
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/problem+json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
