"""Every knob of the service, read from the environment in one place."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """The service's configuration; each field is the env var of the same name, upper-cased."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    database_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/dreamgate"
    redis_url: str = "redis://127.0.0.1:6379/0"

    s3_endpoint_url: str | None = None
    s3_bucket: str = "dreamgate"
    s3_region: str = "us-east-1"
    presign_ttl_s: int = Field(3600, ge=60, le=7 * 24 * 3600)

    wiro_base_url: str = "https://api.wiro.ai/v1"
    wiro_api_key: SecretStr = SecretStr("")
    wiro_api_secret: SecretStr | None = None
    wiro_model: str = "xiabs/dreamomni2"
    wiro_timeout_s: float = Field(30.0, gt=0)

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
    finalize_attempts: int = Field(5, ge=1)
    output_read_timeout_s: float = Field(60.0, gt=0)

    max_images: int = Field(4, ge=1)
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_prompt_chars: int = Field(2000, ge=1)

    log_level: str = "INFO"

    @property
    def wiro_signed(self) -> bool:
        """True when requests to Wiro carry a signature (a secret is configured)."""
        return bool(self.wiro_api_secret and self.wiro_api_secret.get_secret_value())


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return Settings()
