"""OpenTelemetry tracing, set up in one place from settings, per process.

With ``OTEL_EXPORTER_OTLP_ENDPOINT`` unset nothing is imported or installed beyond OTel's
API (which the logs ask for the current span): no provider, no instrumentation, no
per-request cost. With it set, each process (gateway, worker, beat) gets a tracer provider
exporting over OTLP/HTTP in batches, and the official instrumentations:

- FastAPI (ASGI) for the gateway's requests (probes and /metrics left out);
- httpx for every outgoing request: Wiro's API, Wiro's output URLs, client webhooks.
  It sends W3C ``traceparent`` with each of them;
- botocore for S3;
- Celery for tasks: the producer span and the W3C context in the message headers, the
  consumer span from them. Its publish hooks are replaced (``_CeleryInstrumentor``): they
  only handle tasks registered in the publishing process, and the gateway publishes by
  name (``send_task``), for which they leak the span and the context.

Wiro calls back without trace headers, so the callbackUrl given to Wiro carries the
submit's ``traceparent`` in its query (``callback_query``) and the gateway reads it back
as the callback request's parent (``_TraceparentFromQuery``): one job's trace is one tree
from ``POST /v1/jobs`` to the webhook POST. The callback's ``token`` never reaches a span
(``_redact_token``).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

if TYPE_CHECKING:
    from fastapi import FastAPI
    from opentelemetry.sdk.trace import TracerProvider

    from service.settings import Settings

# Requests that would only add noise (probes every few seconds, scrapes).
EXCLUDED_URLS = "/healthz,/readyz,/metrics"


def configure(settings: Settings, process: str) -> TracerProvider | None:
    """Export this process's spans when OTEL_EXPORTER_OTLP_ENDPOINT is set; else nothing."""
    if not settings.tracing_enabled:
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.botocore import BotocoreInstrumentor
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    endpoint = settings.otel_exporter_otlp_endpoint.strip().rstrip("/") + "/v1/traces"
    resource = Resource.create({"service.name": f"{settings.otel_service_name}-{process}"})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    trace.set_tracer_provider(provider)
    HTTPXClientInstrumentor().instrument(tracer_provider=provider)
    BotocoreInstrumentor().instrument(tracer_provider=provider)  # type: ignore[no-untyped-call] # untyped __init__
    _celery_instrumentor()().instrument(tracer_provider=provider)
    return provider


def instrument_app(app: FastAPI, provider: TracerProvider, *, callbacks_prefix: str) -> None:
    """Server spans for the gateway's requests; a callback (a path under
    ``callbacks_prefix``) continues its job's trace."""
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=provider,
        excluded_urls=EXCLUDED_URLS,
        server_request_hook=_redact_token,
        exclude_spans=["receive", "send"],  # one span per request, not one per body chunk
    )
    inner = app.build_middleware_stack  # FastAPIInstrumentor's stack, outermost
    app.build_middleware_stack = lambda: _TraceparentFromQuery(  # type: ignore[method-assign]
        inner(), callbacks_prefix
    )


def callback_query() -> str:
    """``&traceparent=…`` for the callbackUrl while a span records, else nothing."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    value = carrier.get("traceparent")
    return f"&traceparent={value}" if value else ""


def carrier() -> dict[str, str]:
    """The current trace context as W3C headers (empty when nothing records)."""
    headers: dict[str, str] = {}
    propagate.inject(headers)
    return headers


@contextmanager
def continued(headers: Mapping[str, str] | None) -> Iterator[None]:
    """Run the block in the trace context ``headers`` carry (from ``carrier``), if any:
    work done later for a request (an admission pass's submit) joins its trace."""
    if not headers:
        yield
        return
    token = otel_context.attach(propagate.extract(dict(headers)))
    try:
        yield
    finally:
        otel_context.detach(token)


def current_ids() -> dict[str, str]:
    """The current trace and span ids, for log lines (empty outside a recorded span)."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return {}
    return {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}


def _redact_token(span: Any, scope: MutableMapping[str, Any]) -> None:
    """Wiro's callback URL carries the job's secret token: keep it out of the span."""
    query = scope.get("query_string") or b""
    if b"token=" not in query or not span.is_recording():
        return
    path = scope.get("path", "")
    span.set_attribute("http.target", path)
    span.set_attribute("http.url", path)
    span.set_attribute("url.query", "token=REDACTED")


Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]


class _TraceparentFromQuery:
    """Pure ASGI: a Wiro callback's ``traceparent`` query parameter (which we put in the
    callbackUrl) becomes the request's header, so its server span joins the job's trace."""

    def __init__(self, app: ASGIApp, prefix: str) -> None:
        self.app = app
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        query = scope.get("query_string") or b""
        if (
            scope["type"] == "http"
            and b"traceparent=" in query
            and scope["path"].startswith(self.prefix)
            and not any(name == b"traceparent" for name, _ in scope["headers"])
        ):
            value = parse_qs(query.decode("latin-1")).get("traceparent", [""])[0]
            if value:
                headers = [*scope["headers"], (b"traceparent", value.encode("latin-1"))]
                scope = {**scope, "headers": headers}
        await self.app(scope, receive, send)


@functools.cache  # one class: OTel instrumentors are singletons per class
def _celery_instrumentor() -> Any:
    """The official Celery instrumentation with publish hooks that work for ``send_task``."""
    from opentelemetry.instrumentation.celery import CeleryInstrumentor, utils

    class _CeleryInstrumentor(CeleryInstrumentor):
        """Its ``_trace_before_publish`` looks the task up in the publishing process's
        registry; for a task sent by name that is not there (the gateway registers none)
        it enters the producer span as the current context and never leaves or ends it.
        These hooks key the span by the message's task id instead, and only inject the
        context into the message's headers (the current context is left alone)."""

        _publishing: dict[str, Any]

        def _instrument(self, **kwargs: Any) -> None:
            self._publishing = {}
            super()._instrument(**kwargs)  # type: ignore[no-untyped-call] # untyped package

        def _trace_before_publish(self, *args: Any, **kwargs: Any) -> None:
            task_id = utils.retrieve_task_id_from_message(kwargs)
            headers = kwargs.get("headers")
            if task_id is None or headers is None:
                return
            sender = kwargs.get("sender")
            name = sender if isinstance(sender, str) else getattr(sender, "name", "unknown")
            span = self._tracer.start_span(
                f"apply_async/{name}",
                kind=trace.SpanKind.PRODUCER,
                attributes={
                    "celery.action": "apply_async",
                    "celery.task_name": name,
                    "messaging.message.id": task_id,
                },
            )
            propagate.inject(headers, context=trace.set_span_in_context(span))
            if len(self._publishing) > 10_000:  # publishes that raised never end
                self._publishing.clear()
            self._publishing[task_id] = span

        def _trace_after_publish(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override] # a method: it needs the dict
            task_id = utils.retrieve_task_id_from_message(kwargs)
            span = self._publishing.pop(task_id, None) if task_id else None
            if span is not None:
                span.end()

    return _CeleryInstrumentor
