"""kombu's Redis transport, with one redis client per channel instead of one per command.

kombu's Redis channel builds a new ``redis.Redis`` for every publish, ack and QoS update
(``Channel.conn_or_acquire``), and redis-py's constructor fills an 80-entry
case-insensitive callbacks table each time: about 60 µs a command, as much as the LPUSH
itself (docs/PERFORMANCE.md, round 9). A ``redis.Redis`` holds no connection of its own
(each command takes one from the pool and gives it back), so one per channel serves
every thread. kombu replaces the pool on a disconnect or a fork (``_disconnect_pools``);
the client is kept with the pool it was built on, so a new pool gets a new client.

Used for ``redis://`` brokers only (``service.queue.make_celery``): ``rediss://`` and
Sentinel keep kombu's own transport, whose URL handling sets their TLS and discovery up.
"""

from __future__ import annotations

from typing import Any

import redis
from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    """A Redis channel whose synchronous client is built once per connection pool."""

    _pooled: tuple[Any, Any] | None = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            # The BRPOP/LISTEN client: built once per channel by kombu already.
            return super()._create_client(asynchronous=True)  # type: ignore[misc]  # stubs lack it
        if (
            getattr(self, "_pool", None) is None
            and getattr(self.connection, "client", None) is None
        ):
            # kombu closed this channel's connection (the broker went away): an ack or a
            # publish still made on it gets the connection error that kombu's and Celery's
            # callers handle (the ack is logged as lost; the message comes back), not the
            # AttributeError of rebuilding a pool without connection info, which killed a
            # worker's consumer in the Redis-restart fault test.
            raise redis.exceptions.ConnectionError("this channel's broker connection is closed")
        pool = self.pool
        pooled = self._pooled
        if pooled is not None and pooled[0] is pool:
            return pooled[1]
        client = super()._create_client()  # type: ignore[misc]  # stubs lack it
        # Two threads racing here each build one; either serves, the other is dropped.
        self._pooled = (pool, client)
        return client


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with ``Channel`` above."""

    Channel = Channel
