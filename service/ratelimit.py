"""Per-key submit rate limits, counted in Redis so that every gateway process shares them.

The counting is the ``limits`` library's moving window (a Redis sorted set per key, updated
by a Lua script), so a burst at a window's edge cannot pass twice the rate.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import structlog
from limits import RateLimitItem, parse
from limits.errors import StorageError
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter

log = structlog.get_logger(__name__)


def parse_rate(rate: str) -> RateLimitItem:
    """A rate such as ``10/second`` or ``600 per minute``; ValueError for anything else."""
    try:
        item = parse(rate)
    except ValueError as exc:
        raise ValueError(f"not a rate: {rate!r} (write e.g. 10/second or 600/minute)") from exc
    if item.amount < 1:
        raise ValueError("a rate allows at least 1 request")
    return item


@dataclass(frozen=True)
class Decision:
    """Whether one more submit fits the key's rate, and when to come back if not."""

    allowed: bool
    limit: int
    remaining: int
    retry_after_s: int


class SubmitRateLimiter:
    """Counts submits per API key against the key's own rate."""

    def __init__(self, redis_url: str, *, timeout_s: float = 0.5) -> None:
        storage = RedisStorage(
            redis_url,
            key_prefix="dreamgate-rate",
            wrap_exceptions=True,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
        )
        self._limiter = MovingWindowRateLimiter(storage)

    def hit(self, key_id: str, rate: str) -> Decision:
        """Count one submit for ``key_id``; a Redis outage lets it through (jobs are safe in
        PostgreSQL, and refusing every app because Redis blinked helps no one)."""
        item = parse_rate(rate)
        try:
            allowed = self._limiter.hit(item, key_id)
            stats = self._limiter.get_window_stats(item, key_id)
        except StorageError as exc:
            log.warning("rate_limit_unavailable", error=str(exc))
            return Decision(allowed=True, limit=item.amount, remaining=item.amount, retry_after_s=0)
        retry = 0 if allowed else max(1, math.ceil(stats.reset_time - time.time()))
        return Decision(
            allowed=allowed, limit=item.amount, remaining=stats.remaining, retry_after_s=retry
        )
