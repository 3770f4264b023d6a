"""The gateway's HTTP/1.1 protocol: uvicorn's h11 protocol with a deadline on the request
head, and its own refusals in the problem+json shape.

uvicorn bounds the head's size (``h11_max_incomplete_event_size``) but not the time it takes
to come: its keep-alive timer runs only between requests and any byte cancels it, so a
connection that sends nothing, or its headers a byte at a time, is held for as long as the
client likes (3,000 idle connections all stayed open). uvicorn has no option for it and a
proxy with ``client_header_timeout`` is not always in front, hence this subclass. It is
named by import string (``dreamgate serve``) so that each of ``--workers`` loads it itself.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
import structlog
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.api.limits import problem_body
from service.settings import get_settings

log = structlog.get_logger(__name__)


class GatewayH11Protocol(H11Protocol):
    """h11 with ``HEADER_READ_TIMEOUT_S`` from a connection's first byte (or its opening) to
    the end of each request head: past it, a partial head is answered 408 and the
    connection closed; a connection that sent nothing is closed without an answer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_timeout_s = get_settings().header_read_timeout_s
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        # A new head starts with the first byte after the last response (keep-alive).
        if self.conn.their_state is h11.IDLE:
            self._arm()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm()  # the head is in: the body has BodyLimit's clock

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        self._disarm()
        super().shutdown()

    def send_400_response(self, msg: str) -> None:
        # h11 refused the head (malformed, or past the size bound): uvicorn's answer is text.
        self._refuse(400, "bad_request", msg)

    def _arm(self) -> None:
        if self._head_deadline is None:
            self._head_deadline = self.loop.call_later(self.head_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _timed_out(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        partial, _ = self.conn.trailing_data
        if not partial:
            self.transport.close()  # nothing asked: nothing to answer
            return
        log.info("request_head_timeout", client=self.client, received=len(partial))
        detail = f"the request headers did not all come within {self.head_timeout_s:g} s"
        self._refuse(408, "request_timeout", detail)

    def _refuse(self, status: int, code: str, detail: str) -> None:
        # Written raw: h11 will not send a response to a request it never parsed.
        body = problem_body(status, code, detail, None)
        reason = {400: b"Bad Request", 408: b"Request Timeout"}[status]
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/problem+json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n" % (status, reason, len(body)) + body
        )
        self.transport.close()
