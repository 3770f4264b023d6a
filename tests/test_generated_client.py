"""A client generated from the committed openapi/openapi.json (openapi-python-client) has
every operation and model, with no warning, and drives the live stack: a JSON submit,
reads of the job, a listing."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from uuid import UUID

import pytest

from service.auth import IssuedKey
from service.stack import Stack
from tests.conftest import ROOT, TERMINAL

OPENAPI = ROOT / "openapi" / "openapi.json"
PACKAGE = "dreamgate_api"
PROMPT = "Replace the suit in the first image with the clothes in the second image."


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(the generator's output, the generated package's folder) — on sys.path meanwhile."""
    where = tmp_path_factory.mktemp("generated")
    config = where / "config.json"
    # No post hooks: they would run ruff from PATH on the generated code.
    # The generator reads bodies only as JSON, text or octet-stream: a JPEG is bytes.
    overrides = {"image/jpeg": "application/octet-stream"}
    config.write_text(
        json.dumps(
            {
                "post_hooks": [],
                "package_name_override": PACKAGE,
                "content_type_overrides": overrides,
            }
        )
    )
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("openapi-python-client")),
            "generate",
            "--path",
            str(OPENAPI),
            "--output-path",
            str(where / PACKAGE),
            "--meta",
            "none",
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    sys.path.insert(0, str(where))
    try:
        yield output, where / PACKAGE
    finally:
        sys.path.remove(str(where))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]


def module(name: str) -> ModuleType:
    return importlib.import_module(f"{PACKAGE}.{name}")


def test_the_generator_has_nothing_to_warn_about(generated: tuple[str, Path]) -> None:
    output, package = generated
    assert "warning" not in output.lower(), output
    assert "could not" not in output.lower(), output
    operations = {p.stem for p in package.glob("api/*/*.py") if p.stem != "__init__"}
    assert {"create_job", "get_job", "list_jobs", "cancel_job", "stream_job_events"} <= operations
    assert {"admin_create_key", "admin_list_keys", "admin_revoke_key"} <= operations
    for model in ("job_create", "job_out", "job_page", "job_metrics", "job_urls", "problem"):
        assert (package / "models" / f"{model}.py").exists(), model


@pytest.mark.e2e
@pytest.mark.usefixtures("clean")
def test_the_generated_client_submits_json_reads_and_lists(
    generated: tuple[str, Path],
    stack: Stack,
    keys: dict[str, IssuedKey],
    sample_urls: list[str],
) -> None:
    client_mod = module("client")
    models = module("models")
    create_job, get_job, list_jobs = (
        module(f"api.jobs.{name}") for name in ("create_job", "get_job", "list_jobs")
    )
    client = client_mod.AuthenticatedClient(
        base_url=f"http://127.0.0.1:{stack.ports.api}", token=keys["app-a"].key, timeout=90
    )
    with client:
        body = models.JobCreate(
            image_urls=sample_urls, prompt=PROMPT, steps=20, metadata=models.JobCreateMetadata()
        )
        submitted = create_job.sync_detailed(client=client, body=body, idempotency_key="gen-1")
        assert submitted.status_code == 202, submitted.content
        job: Any = submitted.parsed
        assert isinstance(job, models.JobOut)
        assert submitted.headers["location"] == f"/v1/jobs/{job.id}"
        assert isinstance(job.id, UUID) and job.steps == 20

        deadline = time.monotonic() + 60
        while str(job.status) not in TERMINAL and time.monotonic() < deadline:
            job = get_job.sync(job.id, client=client, prefer="wait=30")
            assert isinstance(job, models.JobOut)
        assert str(job.status) == "succeeded", job.error
        assert job.outputs and job.outputs[0].sha256
        assert job.metrics.total_s is not None and job.urls.get.endswith(f"/v1/jobs/{job.id}")
        assert [str(i.url) for i in job.inputs] == sample_urls

        page = list_jobs.sync(client=client, limit=5)
        assert isinstance(page, models.JobPage)
        assert [j.id for j in page.data] == [job.id]

        missing = get_job.sync_detailed(UUID(int=0), client=client)
        assert missing.status_code == 404
        assert missing.parsed is not None and missing.parsed.code == "job_not_found"
