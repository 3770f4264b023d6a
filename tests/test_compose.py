"""docker-compose.yml, read as data (there is no Docker engine here): what a fresh
`docker compose up` relies on."""

from __future__ import annotations

from typing import Any

import yaml

from tests.conftest import ROOT

COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
ONE_SHOT = {"migrate"}


def test_every_image_is_pinned_to_a_version() -> None:
    for name, svc in SERVICES.items():
        if "build" in svc:
            continue  # our own image, built from this checkout
        image = svc["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest", f"{name}: {image} is not pinned"


def test_every_long_running_service_has_a_healthcheck() -> None:
    for name, svc in SERVICES.items():
        if name in ONE_SHOT:
            assert svc["restart"] == "no"
            continue
        check = svc.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name} has no healthcheck"


def test_migrate_creates_the_bucket_and_everything_waits_for_it() -> None:
    assert SERVICES["migrate"]["command"] == ["dreamgate", "migrate", "--ensure-bucket"]
    for name in ("gateway", "worker", "beat"):
        assert SERVICES[name]["depends_on"]["migrate"] == {
            "condition": "service_completed_successfully"
        }


def test_presigned_urls_name_an_endpoint_the_host_can_reach() -> None:
    env = SERVICES["gateway"]["environment"]
    assert env["S3_PUBLIC_ENDPOINT_URL"].endswith("localhost:9000}")
    assert env["S3_ENDPOINT_URL"].startswith("${S3_ENDPOINT_URL")  # not hard-coded
    assert any(p.endswith(":9000") for p in SERVICES["minio"]["ports"])
