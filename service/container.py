"""Builds every client from settings, in one place, and hands them out together."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service import __version__
from service.db import make_engine, make_sessionmaker
from service.fetch import Policy
from service.queue import TaskQueue, make_celery
from service.ratelimit import SubmitRateLimiter
from service.settings import Settings
from service.ssrf import AllowList, CachingResolver
from service.storage import Storage
from service.wiro import WiroClient


@dataclass
class Services:
    """The clients one process needs; built once per process, closed at exit."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    # Sessions in autocommit: for a unit of work that is one statement (a submit without
    # an Idempotency-Key), which then needs no BEGIN and COMMIT round trips.
    autocommit_sessions: sessionmaker[Session]
    storage: Storage
    queue: TaskQueue
    rate_limiter: SubmitRateLimiter
    wiro: WiroClient = field(repr=False)
    # How Wiro's output URLs are read (service/fetch.py): a guarded GET per output, pinned
    # to the address each hop was checked against, so there is no shared client to keep.
    output_policy: Policy = field(repr=False)
    # Clients' image URLs, when a worker fetches them itself (a job mixing files and URLs).
    image_url_policy: Policy = field(repr=False)
    # Resolves image and webhook URLs' hosts for the checks at submit (cached: it is on the
    # hot path; every fetch and delivery resolves again and pins what it checked).
    submit_resolver: CachingResolver = field(repr=False)

    def close(self) -> None:
        """Release pools and connections."""
        self.wiro.close()
        self.engine.dispose()


def build_services(
    settings: Settings, *, pool_size: int = 5, process: str | None = None
) -> Services:
    """Every client the service uses, configured from ``settings``; ``process`` (gateway,
    worker, …) names its database connections (``dreamgate-<process>``)."""
    engine = make_engine(
        settings.database_url,
        pool_size=pool_size,
        transaction_pooling=settings.database_transaction_pooling,
        application_name=f"dreamgate-{process}" if process else None,
    )
    secret = settings.wiro_api_secret.get_secret_value() if settings.wiro_api_secret else None
    return Services(
        settings=settings,
        engine=engine,
        sessions=make_sessionmaker(engine),
        autocommit_sessions=make_sessionmaker(
            engine.execution_options(isolation_level="AUTOCOMMIT")
        ),
        storage=Storage.from_settings(
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            bucket=settings.s3_bucket,
            public_endpoint_url=settings.s3_public_endpoint_url,
        ),
        queue=TaskQueue(make_celery(settings.celery_broker_url)),
        rate_limiter=SubmitRateLimiter(settings.redis_url),
        wiro=WiroClient(
            base_url=settings.wiro_base_url,
            api_key=settings.wiro_api_key.get_secret_value(),
            api_secret=secret,
            model=settings.wiro_model,
            timeout_s=settings.wiro_timeout_s,
        ),
        output_policy=output_policy(settings),
        image_url_policy=image_url_policy(settings),
        submit_resolver=CachingResolver(),
    )


def output_policy(settings: Settings) -> Policy:
    """Where Wiro's outputs may come from, and how much time and bytes they may take."""
    return Policy(
        max_bytes=settings.max_output_bytes,
        deadline_s=settings.output_read_deadline_s,
        read_timeout_s=settings.output_read_timeout_s,
        max_pixels=settings.max_image_pixels,
        hosts=settings.output_hosts,
        user_agent=f"dreamgate/{__version__}",
    )


def image_url_policy(settings: Settings) -> Policy:
    """Clients' image URLs fetched by a worker: any public host, or one allow-listed."""
    return Policy(
        max_bytes=settings.max_image_bytes,
        deadline_s=settings.output_read_deadline_s,
        read_timeout_s=settings.output_read_timeout_s,
        max_pixels=settings.max_image_pixels,
        allow=AllowList.parse(settings.image_url_allow_list),
        user_agent=f"dreamgate/{__version__}",
    )
