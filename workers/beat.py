"""Beat's scheduler: sends the schedule only while it leads, and says it is alive.

Two beats must never both send the sweep (a rolling update briefly runs two; an operator
may scale beat up by mistake). ``LeaderScheduler`` holds a Redis lease (``SET NX PX``,
renewed by compare-and-set) and sends due entries only while it holds it; a standby
beat keeps ticking through the schedule without sending, and takes over within
``BEAT_LEADER_TTL_S`` when the leader stops renewing (it died) or at once when it
released the lease (it stopped cleanly). Redis is the broker the sweep travels on, so a
beat that cannot reach Redis could not send anyway: it leads nothing until it can.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import redis
import structlog
from celery.beat import PersistentScheduler, ScheduleEntry

from service import heartbeat
from service.settings import get_settings

log = structlog.get_logger(__name__)

LEASE_KEY = "dreamgate:beat-leader"

# Renew ours, or take a free one; 1 when we hold it afterwards.
_HOLD = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    redis.call('pexpire', KEYS[1], ARGV[2])
    return 1
end
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return 1
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""


class Lease:
    """A named lease in Redis, held by one holder at a time until it lapses or is released."""

    def __init__(self, client: redis.Redis[bytes], key: str, ttl_s: float) -> None:
        self._client = client
        self.key = key
        self.ttl_ms = int(ttl_s * 1000)
        self.token = uuid.uuid4().hex
        self._hold = client.register_script(_HOLD)
        self._release = client.register_script(_RELEASE)

    def hold(self) -> bool:
        """Take or renew the lease; False when another holds it or Redis does not answer."""
        try:
            return bool(self._hold(keys=[self.key], args=[self.token, self.ttl_ms]))
        except redis.RedisError as exc:
            log.warning("beat_lease_unreachable", error=type(exc).__name__)
            return False

    def release(self) -> None:
        """Give the lease up if we hold it, so a standby takes over at its next tick."""
        try:
            self._release(keys=[self.key], args=[self.token])
        except redis.RedisError as exc:
            log.warning("beat_lease_release_failed", error=type(exc).__name__)


class LeaderScheduler(PersistentScheduler):
    """Celery's file-backed scheduler, sending only while this beat holds the lease."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        settings = get_settings()
        self._redis = redis.Redis.from_url(
            settings.redis_url, socket_timeout=5, socket_connect_timeout=5
        )
        self.lease = Lease(self._redis, LEASE_KEY, settings.beat_leader_ttl_s)
        self._renew_every_s = settings.beat_leader_ttl_s / 3
        self._heartbeat = Path(settings.heartbeat_file) if settings.heartbeat_file else None
        self.leading = False
        super().__init__(*args, **kwargs)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """One pass: renew or take the lease, then Celery's tick; never sleep past a renewal."""
        leading = self.lease.hold()
        if leading != self.leading:
            log.info("beat_leader" if leading else "beat_standby", token=self.lease.token)
            self.leading = leading
        if self._heartbeat is not None:
            heartbeat.beat(self._heartbeat, force=True)
        delay: float = super().tick(*args, **kwargs)
        return min(delay, self._renew_every_s)

    def apply_entry(self, entry: ScheduleEntry, producer: Any = None) -> None:
        """Send a due entry only as the leader (a standby just lets its turn pass)."""
        if self.leading:
            super().apply_entry(entry, producer=producer)

    def close(self) -> None:
        """Release the lease on a clean stop, then close the schedule file."""
        if self.leading:
            self.lease.release()
            self.leading = False
        self._redis.close()
        super().close()
