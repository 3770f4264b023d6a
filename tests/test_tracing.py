"""One job's trace is one tree: from `POST /v1/jobs` through Celery, Wiro and its callback,
S3, to the client's webhook POST, across the gateway and worker processes.

The stack's gateway and worker are restarted with OTEL_EXPORTER_OTLP_ENDPOINT pointing at
an OTLP receiver in the test (tests/otlp_sink.py); beat is stopped meanwhile, so that the
job is admitted by its own request's admission pass rather than by a sweep's.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from service.stack import Stack
from tests.conftest import broker_of, sample, upload_files, wait_for, wait_status
from tests.otlp_sink import OtlpSink, Span
from tests.test_webhooks import Receiver

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean")]

SERVER, CLIENT, PRODUCER, CONSUMER = 2, 3, 4, 5  # OTLP SpanKind values


@pytest.fixture
def traced(stack: Stack) -> Iterator[OtlpSink]:
    """The stack's gateway and worker, exporting spans to a receiver of the test's."""
    saved = dict(stack.env)
    with OtlpSink() as sink:
        stack.processes["beat"].stop()
        stack.env.update(OTEL_EXPORTER_OTLP_ENDPOINT=sink.endpoint, OTEL_BSP_SCHEDULE_DELAY="200")
        try:
            restart(stack)
            yield sink
        finally:
            stack.env.clear()
            stack.env.update(saved)
            restart(stack)
            stack.processes["beat"].start()


def restart(stack: Stack) -> None:
    """New gateway and worker processes; the worker starts on an empty queue (a message left
    by an earlier test, an admission pass, could otherwise claim the test's job in its own
    trace) and is consuming before the test submits."""
    stack.start_process("gateway", ["serve", "--port", str(stack.ports.api)], stack.ports.api)
    stack.processes["worker"].stop()
    broker_of(stack).purge()
    log = stack.logs / "worker.log"
    offset = log.stat().st_size
    stack.start_worker()
    wait_for(lambda: " ready." in log.read_text()[offset:], timeout=60, what="worker ready")


def tree(spans: list[Span], trace_id: str) -> dict[str, Span]:
    return {s.span_id: s for s in spans if s.trace_id == trace_id}


def test_one_jobs_trace_is_one_tree_from_submit_to_webhook(
    traced: OtlpSink, api: httpx.Client, stack: Stack
) -> None:
    receiver = Receiver()
    try:
        request_id = uuid.uuid4().hex
        r = api.post(
            "/v1/jobs",
            files=upload_files(sample(1), sample(2)),
            data={
                "prompt": "swap the suit",
                "webhook_url": receiver.url(),
                "webhook_events": "job.succeeded",
            },
            headers={"X-Request-ID": request_id},
        )
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        assert wait_status(api, job_id)["status"] == "succeeded"
        [hook] = wait_for(receiver.received, timeout=30, what="the webhook")
    finally:
        receiver.close()

    # The submit request's span is the root; the webhook's traceparent names its trace.
    trace_id, parent = hook.headers["traceparent"].split("-")[1:3]

    def complete() -> dict[str, Span] | None:
        spans = tree(list(traced.spans), trace_id)
        return spans if parent in spans else None

    spans = wait_for(complete, timeout=30, what="every span exported")
    roots = [s for s in spans.values() if s.parent_id not in spans]
    assert [(r.name, r.kind, r.parent_id) for r in roots] == [("POST /v1/jobs", SERVER, "")]
    names = {(s.service, s.kind, s.name) for s in spans.values()}
    for expected in [
        ("dreamgate-gateway", SERVER, "POST /v1/jobs"),
        # The admission loop sends the submit in the context the submit request left.
        ("dreamgate-worker", PRODUCER, "apply_async/dreamgate.submit"),
        ("dreamgate-worker", CONSUMER, "run/dreamgate.submit"),
        ("dreamgate-gateway", SERVER, "POST /v1/wiro/callbacks/{job_id}"),
        ("dreamgate-gateway", PRODUCER, "apply_async/dreamgate.reconcile"),
        ("dreamgate-worker", CONSUMER, "run/dreamgate.reconcile"),
        ("dreamgate-worker", CONSUMER, "run/dreamgate.webhook_deliver"),
    ]:
        assert expected in names, (expected, sorted(names))
    clients = [s for s in spans.values() if s.kind == CLIENT]
    urls = [str(s.attributes.get("http.url") or s.attributes.get("url.full")) for s in clients]
    assert any("/Run/" in u for u in urls), urls  # Wiro's Run
    assert any("/Task/Detail" in u for u in urls), urls
    assert any(s.name.startswith("S3.") for s in clients), [s.name for s in clients]
    print(
        f"\none job's trace: {len(spans)} spans, "
        + ", ".join(sorted({s.name for s in spans.values()}))
    )
    webhook = spans[parent]
    assert webhook.kind == CLIENT and webhook.service == "dreamgate-worker"
    # The callback's secret token is in no span.
    assert not any(
        "token=" in str(v) and "REDACTED" not in str(v)
        for s in spans.values()
        for v in s.attributes.values()
    )

    # Log lines carry the trace id: the submit's (with its request id) and the job's tasks'.
    def lines(name: str) -> list[dict[str, Any]]:
        out = []
        for line in (stack.logs / f"{name}.log").read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    submit_lines = [e for e in lines("gateway") if e.get("request_id") == request_id]
    assert submit_lines and all(e.get("trace_id") == trace_id for e in submit_lines)
    job_lines = [e for e in lines("worker") if e.get("job_id") == job_id]
    assert job_lines and all(e.get("trace_id") == trace_id for e in job_lines), job_lines
