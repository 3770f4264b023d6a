"""GET /metrics on the real stack: every named family, added up over the gateway's and the
worker's processes (prometheus_client's multiprocess mode), with plausible values."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.queue import QUEUES
from tests.conftest import sample, upload_files, wait_for, wait_status
from tests.test_webhooks import Receiver

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean")]

PROMPT = "Replace the suit in the first image with the clothes in the second image."
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(anon: httpx.Client) -> tuple[set[str], Samples, str]:
    """Family names, every sample by (name, sorted labels), and the raw text."""
    r = anon.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    families: set[str] = set()
    samples: Samples = {}
    for family in text_string_to_metric_families(r.text):
        families.add(family.name)
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return families, samples, r.text


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum over every sample of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def test_metrics_cover_a_job_end_to_end(
    anon: httpx.Client, api: httpx.Client, sim: httpx.Client
) -> None:
    _, before, _ = scrape(anon)
    receiver = Receiver()
    try:
        r = api.post(
            "/v1/jobs",
            files=upload_files(sample(1), sample(2)),
            data={
                "prompt": PROMPT,
                "webhook_url": receiver.url(),
                "webhook_events": "job.succeeded",
            },
        )
        assert r.status_code == 202, r.text
        job = wait_status(api, r.json()["id"])
        assert job["status"] == "succeeded"
        wait_for(lambda: receiver.received(), what="the webhook")

        def delivered() -> Samples | None:
            found = scrape(anon)[1]
            d = value(found, "dreamgate_webhook_deliveries_total", outcome="delivered")
            return (
                found
                if d > value(before, "dreamgate_webhook_deliveries_total", outcome="delivered")
                else None
            )

        after = wait_for(delivered, what="the delivery to be counted")
    finally:
        receiver.close()
    families, after, text = scrape(anon)

    for name in (
        "dreamgate_jobs",
        "dreamgate_job_transitions",
        "dreamgate_wiro_requests",
        "dreamgate_wiro_request_seconds",
        "dreamgate_wiro_callbacks_received",
        "dreamgate_wiro_completions",
        "dreamgate_s3_bytes",
        "dreamgate_s3_request_seconds",
        "dreamgate_webhook_deliveries",
        "dreamgate_celery_queue_depth",
        "dreamgate_sweeps",
    ):
        assert name in families, name

    def grew(name: str, by: float = 1, **labels: str) -> None:
        delta = total(after, name, **labels) - total(before, name, **labels)
        assert delta >= by, (name, labels, delta)

    # Jobs by status is read from PostgreSQL at scrape time: exactly this one job.
    assert value(after, "dreamgate_jobs", status="succeeded") == 1
    assert value(after, "dreamgate_jobs", status="running") == 0
    # The depth of every queue is read from the broker at scrape time, one sample each.
    depths = {ls: v for (n, ls), v in after.items() if n == "dreamgate_celery_queue_depth"}
    assert set(depths) == {(("queue", q),) for q in QUEUES}
    assert all(v >= 0 for v in depths.values())
    for left, entered in [
        ("queued", "submitting"),
        ("submitting", "running"),
        ("running", "finalizing"),
        ("finalizing", "succeeded"),
    ]:
        grew("dreamgate_job_transitions_total", from_status=left, to_status=entered)
    grew("dreamgate_wiro_requests_total", endpoint="Run", outcome="ok")
    grew("dreamgate_wiro_requests_total", endpoint="Task/Detail", outcome="ok")
    grew("dreamgate_wiro_request_seconds_count", endpoint="Run")
    assert total(after, "dreamgate_wiro_request_seconds_sum", endpoint="Run") > 0
    grew("dreamgate_wiro_callbacks_received_total")
    grew("dreamgate_wiro_completions_total", source="callback", outcome="succeeded")
    inputs = sample(1).stat().st_size + sample(2).stat().st_size
    grew("dreamgate_s3_bytes_total", by=inputs, direction="put")  # the uploads, then the output
    grew("dreamgate_s3_bytes_total", by=inputs, direction="get")  # the worker reads them back
    grew("dreamgate_s3_request_seconds_count", by=3, operation="put")
    grew("dreamgate_webhook_deliveries_total", outcome="delivered")
    assert total(after, "dreamgate_sweeps_total") >= 1  # beat runs one every 0.5 s
    # Aggregates only: no job id, owner or URL on the page.
    assert job["id"] not in text and "app-a" not in text
    assert not re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-", text)


def test_completions_found_by_the_sweep_are_counted_apart_from_callbacks(
    anon: httpx.Client, api: httpx.Client, sim: httpx.Client
) -> None:
    _, before, _ = scrape(anon)
    sim.put("/_sim/config", json={"drop_callbacks": 1.0, "fail_mode": "pexit"}).raise_for_status()
    r = api.post("/v1/jobs", files=upload_files(sample(1)), data={"prompt": PROMPT})
    job = wait_status(api, r.json()["id"], timeout=40)
    assert job["status"] == "failed"
    _, after, _ = scrape(anon)

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert delta("dreamgate_wiro_completions_total", source="sweep", outcome="failed") == 1
    assert delta("dreamgate_wiro_completions_total", source="callback") == 0
    assert delta("dreamgate_wiro_callbacks_received_total") == 0
    assert delta("dreamgate_job_transitions_total", from_status="running", to_status="failed") == 1
    assert value(after, "dreamgate_jobs", status="failed") == 1


def test_metrics_need_no_key_and_say_nothing_about_a_key(anon: httpx.Client) -> None:
    r: Any = anon.get("/metrics")
    assert r.status_code == 200
    assert "Bearer" not in r.text and "dg_" not in r.text


def test_a_worker_can_serve_its_own_metrics() -> None:
    """WORKER_METRICS_PORT: what a worker in a container of its own exposes (here in-process)."""
    from service import metrics
    from service.embedded import free_port

    port = free_port()
    metrics.serve(port, "127.0.0.1")
    metrics.SWEEPS.inc()
    r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert r.status_code == 200
    names = {f.name for f in text_string_to_metric_families(r.text)}
    assert {"dreamgate_sweeps", "dreamgate_wiro_requests", "dreamgate_s3_bytes"} <= names
