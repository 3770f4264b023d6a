"""The gateway's short cache of authenticated keys (AUTH_CACHE_TTL_S)."""

from __future__ import annotations

import time
import uuid

from service.auth import Principal, PrincipalCache

WHO = Principal(key_id=uuid.uuid4(), owner="app-a", role="client")


def test_a_cached_key_is_answered_without_the_database_until_it_expires() -> None:
    cache = PrincipalCache(ttl_s=0.2)
    cache.put("dg_key", WHO)

    assert cache.get("dg_key") is WHO
    time.sleep(0.25)
    assert cache.get("dg_key") is None


def test_another_key_is_not_answered_from_the_cache() -> None:
    cache = PrincipalCache(ttl_s=60)
    cache.put("dg_key", WHO)

    assert cache.get("dg_other") is None


def test_a_zero_ttl_caches_nothing() -> None:
    cache = PrincipalCache(ttl_s=0)
    cache.put("dg_key", WHO)

    assert cache.get("dg_key") is None


def test_the_cache_stays_within_its_size() -> None:
    cache = PrincipalCache(ttl_s=60, max_entries=3)
    for n in range(10):
        cache.put(f"dg_{n}", WHO)

    assert len(cache._entries) <= 3
    assert cache.get("dg_9") is WHO
