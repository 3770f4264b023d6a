"""Builds every client from settings, in one place, and hands them out together."""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service import __version__
from service.db import make_engine, make_sessionmaker
from service.queue import TaskQueue, make_celery
from service.ratelimit import SubmitRateLimiter
from service.settings import Settings
from service.storage import Storage
from service.wiro import WiroClient


@dataclass
class Services:
    """The clients one process needs; built once per process, closed at exit."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    storage: Storage
    queue: TaskQueue
    rate_limiter: SubmitRateLimiter
    wiro: WiroClient = field(repr=False)
    # For Wiro's output URLs (public CDN files), not for Wiro's API.
    http: httpx.Client = field(repr=False)

    def close(self) -> None:
        """Release pools and connections."""
        self.wiro.close()
        self.http.close()
        self.engine.dispose()


def build_services(settings: Settings, *, pool_size: int = 5) -> Services:
    """Every client the service uses, configured from ``settings``."""
    engine = make_engine(settings.database_url, pool_size=pool_size)
    secret = settings.wiro_api_secret.get_secret_value() if settings.wiro_api_secret else None
    return Services(
        settings=settings,
        engine=engine,
        sessions=make_sessionmaker(engine),
        storage=Storage.from_settings(
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            bucket=settings.s3_bucket,
        ),
        queue=TaskQueue(make_celery(settings.redis_url)),
        rate_limiter=SubmitRateLimiter(settings.redis_url),
        wiro=WiroClient(
            base_url=settings.wiro_base_url,
            api_key=settings.wiro_api_key.get_secret_value(),
            api_secret=secret,
            model=settings.wiro_model,
            timeout_s=settings.wiro_timeout_s,
        ),
        http=httpx.Client(
            timeout=httpx.Timeout(settings.output_read_timeout_s, connect=10.0),
            follow_redirects=True,
            headers={"user-agent": f"dreamgate/{__version__}"},
        ),
    )
