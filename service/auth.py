"""API keys: created and shown once, stored as hashes, each with an owner and a role."""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service.models import ApiKey
from service.ratelimit import parse_rate

KEY_PREFIX = "dg_"
ROLES = ("client", "admin")


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's id, its owner and its role."""

    key_id: uuid.UUID
    owner: str
    role: str
    # The key's submit rate ("10/second"), None for no limit.
    submit_rate_limit: str | None = None
    # The key's monthly budget in USD, None for none (service/usage.py).
    budget_usd: Decimal | None = None

    @property
    def is_admin(self) -> bool:
        """Admins may use the ops routes and read any owner's jobs."""
        return self.role == "admin"


@dataclass(frozen=True)
class IssuedKey:
    """A new key as shown once to its owner: the key and its webhook secret."""

    id: uuid.UUID
    key: str
    owner: str
    role: str
    webhook_secret: str


@dataclass(frozen=True)
class KeyLimits:
    """A key's own admission limits; None means none beyond the service's."""

    max_in_flight: int | None = None
    submit_rate_limit: str | None = None
    budget_usd: Decimal | None = None

    def __post_init__(self) -> None:
        if self.max_in_flight is not None and self.max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        if self.budget_usd is not None and not (
            self.budget_usd.is_finite() and self.budget_usd >= 0
        ):
            raise ValueError("budget_usd must be a number of dollars, 0 or more")
        if self.submit_rate_limit is not None:
            parse_rate(self.submit_rate_limit)


def hash_key(key: str) -> str:
    """The stored form of an API key (keys are long random strings: no salt needed)."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_webhook_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` and base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def create_key(
    session: Session, *, owner: str, role: str = "client", limits: KeyLimits | None = None
) -> IssuedKey:
    """Create a key; the caller shows ``key`` and ``webhook_secret`` once."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}")
    owner = owner.strip()
    if not owner or len(owner) > 100:
        raise ValueError("owner must be 1-100 characters")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        id=uuid.uuid4(),
        owner=owner,
        role=role,
        key_hash=hash_key(key),
        prefix=key[:10],
        webhook_secret=new_webhook_secret(),
        max_in_flight=limits.max_in_flight if limits else None,
        submit_rate_limit=limits.submit_rate_limit if limits else None,
        budget_usd=limits.budget_usd if limits else None,
    )
    session.add(row)
    session.flush()
    return IssuedKey(id=row.id, key=key, owner=owner, role=role, webhook_secret=row.webhook_secret)


def authenticate(session: Session, key: str) -> Principal | None:
    """The principal of a live key, or None for an unknown or revoked one."""
    row = session.execute(
        select(
            ApiKey.id, ApiKey.owner, ApiKey.role, ApiKey.submit_rate_limit, ApiKey.budget_usd
        ).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
    ).one_or_none()
    if row is None:
        return None
    return Principal(
        key_id=row.id,
        owner=row.owner,
        role=row.role,
        submit_rate_limit=row.submit_rate_limit,
        budget_usd=row.budget_usd,
    )


class PrincipalCache:
    """Live keys' principals for ``ttl_s`` seconds, so a request skips the key lookup.

    A revoked key keeps working in a process for up to ``ttl_s`` after the revocation (the
    price of not asking PostgreSQL on every request). Unknown keys are never cached: a new
    key works at once. Entries are keyed by the key's hash, not the key.
    """

    def __init__(self, ttl_s: float, *, max_entries: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, Principal]] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> Principal | None:
        """The cached principal of ``key``, if cached less than ``ttl_s`` ago."""
        if self.ttl_s <= 0:
            return None
        entry = self._entries.get(hash_key(key))
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def put(self, key: str, who: Principal) -> None:
        """Remember a principal just authenticated from PostgreSQL."""
        if self.ttl_s <= 0:
            return
        now = time.monotonic()
        with self._lock:
            if len(self._entries) >= self.max_entries:  # bound memory: drop what expired
                self._entries = {k: v for k, v in self._entries.items() if v[0] >= now}
                if len(self._entries) >= self.max_entries:
                    self._entries.clear()
            self._entries[hash_key(key)] = (now + self.ttl_s, who)


def find(session: Session, ident: str) -> ApiKey | None:
    """A key by its id or by the prefix shown in ``keys list``."""
    try:
        return session.get(ApiKey, uuid.UUID(ident))
    except ValueError:
        rows = list(session.execute(select(ApiKey).where(ApiKey.prefix == ident)).scalars())
        return rows[0] if len(rows) == 1 else None


def revoke(session: Session, key_id: uuid.UUID) -> bool:
    """Revoke a key; True if it was live."""
    result = session.execute(
        update(ApiKey)
        .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=func.now())
        .returning(ApiKey.id)
    )
    return result.scalar_one_or_none() is not None


def set_limits(session: Session, key_id: uuid.UUID, limits: KeyLimits) -> bool:
    """Replace a key's own limits (None clears one); True if the key exists."""
    result = session.execute(
        update(ApiKey)
        .where(ApiKey.id == key_id)
        .values(
            max_in_flight=limits.max_in_flight,
            submit_rate_limit=limits.submit_rate_limit,
            budget_usd=limits.budget_usd,
        )
        .returning(ApiKey.id)
    )
    return result.scalar_one_or_none() is not None


def rotate_webhook_secret(session: Session, key_id: uuid.UUID) -> str | None:
    """Give a key a new webhook secret; returns it (shown once), or None if no such key."""
    secret = new_webhook_secret()
    result = session.execute(
        update(ApiKey).where(ApiKey.id == key_id).values(webhook_secret=secret).returning(ApiKey.id)
    )
    return secret if result.scalar_one_or_none() is not None else None


def list_keys(session: Session) -> list[ApiKey]:
    """Every key, newest first (hashes and secrets are not for display)."""
    return list(session.execute(select(ApiKey).order_by(ApiKey.created_at.desc())).scalars())


def webhook_secret_for(session: Session, key_id: uuid.UUID) -> str | None:
    """The current webhook secret of a key."""
    return session.execute(
        select(ApiKey.webhook_secret).where(ApiKey.id == key_id)
    ).scalar_one_or_none()
