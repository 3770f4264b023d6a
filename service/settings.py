"""Every knob of the service, read from the environment in one place."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """The service's configuration; each field is the env var of the same name, upper-cased.

    Also read from a ``.env`` file in the working directory (``.env.example`` lists every
    variable); a variable set in the environment wins over the file.
    """

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False
    )

    database_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/dreamgate"
    # Behind PgBouncer in transaction pooling: DATABASE_URL names PgBouncer, this the
    # PostgreSQL server itself (or a session-pooled PgBouncer) for the one LISTEN
    # connection per gateway process, which a transaction pooler cannot carry. Empty:
    # DATABASE_URL.
    database_listen_url: str = ""
    # True when DATABASE_URL is a transaction pooler (PgBouncer before 1.21 keeps no
    # prepared statements across transactions): psycopg then prepares none.
    database_transaction_pooling: bool = False
    redis_url: str = "redis://127.0.0.1:6379/0"
    # The Celery broker: empty means REDIS_URL. ``amqp://user:pass@host:5672/vhost`` runs
    # the queues on RabbitMQ (quorum queues, publisher confirms); Redis is still used for
    # the submit rate limit and beat's leader lease.
    broker_url: str = ""

    s3_endpoint_url: str | None = None
    # The S3 endpoint as clients outside (browsers, other hosts) reach it: presigned URLs
    # are signed for this host. Unset: the same as S3_ENDPOINT_URL. Compose needs it,
    # since http://minio:9000 resolves only inside the compose network.
    s3_public_endpoint_url: str | None = None
    s3_bucket: str = "dreamgate"
    s3_region: str = "us-east-1"
    presign_ttl_s: int = Field(3600, ge=60, le=7 * 24 * 3600)
    # Days that outputs (outputs/ in the bucket) and uploaded inputs (inputs/) are kept; 0
    # keeps them forever. Applied as S3 lifecycle rules of our own on those prefixes by
    # `dreamgate migrate --ensure-bucket` (other rules on the bucket are left alone).
    output_retention_days: int = Field(0, ge=0)
    input_retention_days: int = Field(0, ge=0)
    # Seconds between keep-alive comments on an idle SSE stream (GET /v1/jobs/{id}/events).
    sse_keepalive_s: float = Field(15.0, gt=0)

    wiro_base_url: str = "https://api.wiro.ai/v1"
    wiro_api_key: SecretStr = SecretStr("")
    wiro_api_secret: SecretStr | None = None
    wiro_model: str = "xiabs/dreamomni2"
    wiro_timeout_s: float = Field(30.0, gt=0)
    # Wiro's websocket of live task progress, followed by `dreamgate progress`.
    wiro_socket_url: str = "wss://socket.wiro.ai/v1"
    # How often the progress process looks for running jobs to follow (and drops ended ones).
    progress_scan_s: float = Field(1.0, gt=0)

    public_url: str = "http://127.0.0.1:8000"
    callback_grace_s: float = Field(60.0, gt=0)
    sweep_interval_s: float = Field(15.0, gt=0)
    stuck_after_s: float = Field(120.0, gt=0)
    sweep_batch: int = Field(200, ge=1)
    # How long a Run that may have reached Wiro waits for a callback to name its task
    # before the job fails rather than risk a second task.
    run_uncertain_wait_s: float = Field(900.0, gt=0)
    # How long a job may keep being refused by Wiro (busy, rate-limited) before it fails.
    submit_deadline_s: float = Field(3600.0, gt=0)
    # Admission to Wiro: at most this many jobs in submitting or running at once (the
    # limit in force halves on code 96/429 and climbs back by one per N accepted Runs;
    # back to the level Wiro last refused at only after PROBE_AFTER accepted Runs).
    wiro_max_in_flight: int = Field(8, ge=1)
    wiro_admission_increase_after: int = Field(10, ge=1)
    wiro_admission_probe_after: int = Field(500, ge=1)
    # The admission loop passes on every wake-up and at least this often (delayed re-queues,
    # account probes, a wake-up lost with a connection).
    admission_poll_s: float = Field(1.0, gt=0)
    # A freed slot waits this long for the slots freed with it, so one pass fills them all
    # (a newly queued job never waits for it).
    admission_coalesce_s: float = Field(0.05, ge=0)
    # -- Wiro's tasks: deadlines and stopping (docs/decisions/0014) --
    # A task at Wiro longer than this (from its Run) is stopped there and the job fails
    # ``wiro_task_timeout``; its admission slot is freed at once.
    wiro_task_timeout_s: float = Field(1800.0, gt=0)
    # Stopping a task at Wiro (a cancel, a deadline, a timeout) is tried again with backoff
    # up to this cap while Wiro refuses, at most WIRO_STOP_ATTEMPTS times (about a day).
    wiro_stop_backoff_cap_s: float = Field(300.0, gt=0)
    wiro_stop_attempts: int = Field(300, ge=1)
    # While Wiro refuses our account (credentials, balance), one probe Run at most this
    # far apart (backing off from 1 s): a fixed key is noticed within this long.
    wiro_account_probe_max_s: float = Field(30.0, gt=0)
    # Once a job's outputs are in S3, ask Wiro to delete the task's inputs and outputs
    # (Task/InputOutputDelete); a failure never fails the job and is tried again by the
    # sweep, at most WIRO_DELETE_ATTEMPTS times in all.
    wiro_delete_after_copy: bool = False
    wiro_delete_attempts: int = Field(5, ge=1)
    finalize_attempts: int = Field(5, ge=1)
    output_read_timeout_s: float = Field(60.0, gt=0)
    # -- hostile upstreams and inputs (issue 13; service/fetch.py) --
    # Where Wiro's outputs may be downloaded from, every redirect hop included: ``host`` or
    # ``host:port``, comma-separated. A ``host:port`` entry names one service and is
    # trusted although it may be internal (the dev stack's simulator, 127.0.0.1:8100); a
    # bare ``host`` must resolve to public addresses. Default: Wiro's CDN hosts (the seed
    # page's output URLs).
    wiro_output_hosts: str = "cdn1.wiro.ai,cdn.wiro.ai"
    # Total time one output's download may take (each read also times out at
    # OUTPUT_READ_TIMEOUT_S), and the most bytes it may have.
    output_read_deadline_s: float = Field(300.0, gt=0)
    max_output_bytes: int = Field(100 * 1024 * 1024, ge=1024)
    # The most pixels an image (upload, image URL or output) may claim: decompression bombs.
    max_image_pixels: int = Field(50_000_000, ge=1)
    # The largest application/json request body, refused while it streams in.
    max_json_bytes: int = Field(1024 * 1024, ge=1024)
    # A request body that stops coming for this long is answered 408 and its connection
    # closed (a client idle mid-body held a connection 180 s and more).
    body_read_timeout_s: float = Field(30.0, gt=0)
    # The request head (line and headers) must come within this long of a connection's
    # opening or of its previous response: past it, 408 and closed (a connection that sent
    # nothing is just closed). Idle connections were held for as long as clients liked.
    header_read_timeout_s: float = Field(15.0, gt=0)
    # Open SSE streams and Prefer: wait holds, together, per gateway process: in all and
    # per API key (past them: 429 with Retry-After; a submit's Prefer: wait is ignored).
    max_waiters: int = Field(2000, ge=1)
    max_waiters_per_key: int = Field(100, ge=1)
    # Image URLs are refused at submit (422 image_url_not_allowed) when their host resolves
    # to a loopback/private/link-local/metadata address, unless listed here (names, IPs or
    # CIDR networks, comma-separated), as WEBHOOK_ALLOW_HOSTS.
    image_url_allow_hosts: str = ""

    max_images: int = Field(4, ge=1)
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1024)

    @property
    def max_request_bytes(self) -> int:
        """The largest request body accepted: every image at its limit, plus 1 MiB."""
        return self.max_images * self.max_image_bytes + 1024 * 1024

    # Client webhooks. Hosts (names, IPs or CIDR networks, comma-separated) that may be
    # called although they resolve to loopback/private/link-local addresses.
    webhook_allow_hosts: str = ""
    webhook_timeout_s: float = Field(15.0, gt=0)
    # Seconds before each attempt, comma-separated: the first is the first attempt's delay;
    # one attempt per entry (Svix's schedule: about 27.6 h in all).
    webhook_retry_schedule_s: str = "0,5,300,1800,7200,18000,36000,36000"

    log_level: str = "INFO"
    # A worker serves its own /metrics on this port when set (0: off). Needed when workers
    # do not share PROMETHEUS_MULTIPROC_DIR with a gateway (e.g. separate containers).
    worker_metrics_port: int = Field(0, ge=0, le=65535)

    @field_validator("webhook_retry_schedule_s")
    @classmethod
    def _schedule_parses(cls, value: str) -> str:
        delays = [float(x) for x in value.split(",") if x.strip()]
        if not delays or any(d < 0 for d in delays):
            raise ValueError("give one or more non-negative delays in seconds, comma-separated")
        return value

    @property
    def webhook_schedule(self) -> tuple[float, ...]:
        """Delay before each webhook attempt, in seconds; its length is the attempt count."""
        return tuple(float(x) for x in self.webhook_retry_schedule_s.split(",") if x.strip())

    @property
    def webhook_allow_list(self) -> tuple[str, ...]:
        """The entries of WEBHOOK_ALLOW_HOSTS."""
        return tuple(h.strip() for h in self.webhook_allow_hosts.split(",") if h.strip())

    @field_validator("wiro_output_hosts")
    @classmethod
    def _hosts_parse(cls, value: str) -> str:
        from service.fetch import parse_hosts

        parse_hosts(value)
        return value

    @property
    def output_hosts(self) -> frozenset[tuple[str, int | None]]:
        """The entries of WIRO_OUTPUT_HOSTS as (host, port or None)."""
        from service.fetch import parse_hosts

        return parse_hosts(self.wiro_output_hosts)

    @property
    def image_url_allow_list(self) -> tuple[str, ...]:
        """The entries of IMAGE_URL_ALLOW_HOSTS."""
        return tuple(h.strip() for h in self.image_url_allow_hosts.split(",") if h.strip())

    @property
    def celery_broker_url(self) -> str:
        """The broker Celery connects to: BROKER_URL, else REDIS_URL."""
        return self.broker_url or self.redis_url

    def secret_values(self) -> list[str]:
        """Configured secrets, so the logs can scrub them wherever they appear."""
        values = [self.wiro_api_key.get_secret_value()]
        if self.wiro_api_secret:
            values.append(self.wiro_api_secret.get_secret_value())
        return [v for v in values if v]

    @property
    def wiro_signed(self) -> bool:
        """True when requests to Wiro carry a signature (a secret is configured)."""
        return bool(self.wiro_api_secret and self.wiro_api_secret.get_secret_value())

    # -- performance (docs/PERFORMANCE.md) --
    # Seconds a gateway process trusts a key it authenticated; a revoked key keeps working
    # that long in each process. 0 asks PostgreSQL on every request.
    auth_cache_ttl_s: float = Field(5.0, ge=0)

    # -- deployment: beat leader, probes, graceful shutdown, tracing (issue 18) --
    # Beat sends the sweep only while it holds a Redis lease of this many seconds, renewed
    # every third of it: a second beat (a rolling update, a stray replica) sends nothing.
    beat_leader_ttl_s: float = Field(30.0, ge=3)
    # A worker (and beat) touches this file every HEARTBEAT_INTERVAL_S while its loop runs;
    # `dreamgate worker-probe` checks its age (a Kubernetes exec probe). Empty: off.
    heartbeat_file: str = ""
    heartbeat_interval_s: float = Field(5.0, gt=0)
    # On SIGTERM the gateway stops accepting, ends SSE streams and Prefer: wait holds with
    # the job as it is, and gives in-flight requests this long before cutting them.
    shutdown_grace_s: float = Field(20.0, gt=0)
    # OpenTelemetry traces over OTLP/HTTP to this base URL (…/v1/traces is appended), as the
    # OTel variable of the same name. Empty: no tracing at all (nothing is installed).
    otel_exporter_otlp_endpoint: str = ""
    # service.name is this plus the process type: dreamgate-gateway, dreamgate-worker, ...
    otel_service_name: str = "dreamgate"

    @property
    def tracing_enabled(self) -> bool:
        """True when spans are exported (OTEL_EXPORTER_OTLP_ENDPOINT is set)."""
        return bool(self.otel_exporter_otlp_endpoint.strip())


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return Settings()
