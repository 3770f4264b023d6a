"""The committed OpenAPI document is the app's own: regenerate with `make openapi`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from service.api.app import create_app
from service.api.schemas import WEBHOOK_EVENTS

OPENAPI = Path(__file__).resolve().parents[1] / "openapi" / "openapi.json"


def test_committed_openapi_matches_the_app() -> None:
    committed = json.loads(OPENAPI.read_text())
    assert committed == create_app().openapi(), "openapi/openapi.json is stale: run make openapi"


def test_every_operation_has_a_summary_and_declares_its_errors() -> None:
    spec = create_app().openapi()
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            assert op.get("summary"), f"{method.upper()} {path} has no summary"
            assert op.get("description"), f"{method.upper()} {path} has no description"
            if path.startswith("/v1/"):
                assert any(code.startswith("4") for code in op["responses"]), (
                    f"{method.upper()} {path} declares no error response"
                )


def test_the_submit_operation_carries_the_seeds_defaults_as_examples() -> None:
    spec = create_app().openapi()
    body = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
    form = body["multipart/form-data"]["schema"]["properties"]
    assert form["steps"]["default"] == 25
    assert form["scale"]["default"] == 3.5
    assert form["prompt"]["example"].startswith("Replace the suit in the first image")


# What a client generator needs (openapi-python-client: tests/test_generated_client.py).


def _refs(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _resolve(spec: dict[str, Any], ref: str) -> object:
    node: Any = spec
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def test_every_reference_resolves_the_json_submit_body_included() -> None:
    spec = create_app().openapi()
    refs = _refs(spec)
    assert "#/components/schemas/JobCreate" in refs
    for ref in refs:
        assert ref.startswith("#/"), ref
        _resolve(spec, ref)  # KeyError names the missing one
    body = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]
    assert _resolve(spec, body["schema"]["$ref"])["required"] == ["prompt", "image_urls"]  # type: ignore[index]


def test_operation_ids_are_the_route_names_and_unique() -> None:
    spec = create_app().openapi()
    ids = [op["operationId"] for methods in spec["paths"].values() for op in methods.values()]
    ids += [op["operationId"] for hook in spec["webhooks"].values() for op in hook.values()]
    assert len(ids) == len(set(ids))
    jobs = spec["paths"]["/v1/jobs"]
    assert (jobs["post"]["operationId"], jobs["get"]["operationId"]) == ("create_job", "list_jobs")
    assert spec["paths"]["/v1/jobs/{job_id}"]["get"]["operationId"] == "get_job"
    assert spec["paths"]["/v1/jobs/{job_id}/cancel"]["post"]["operationId"] == "cancel_job"
    assert spec["paths"]["/v1/jobs/{job_id}/events"]["get"]["operationId"] == "stream_job_events"
    assert spec["paths"]["/v1/admin/jobs"]["get"]["operationId"] == "admin_list_jobs"
    assert spec["paths"]["/v1/admin/keys"]["post"]["operationId"] == "admin_create_key"


def test_internal_routes_are_left_out_of_the_published_document() -> None:
    paths = create_app().openapi()["paths"]
    for internal in ("/healthz", "/readyz", "/metrics", "/v1/wiro/callbacks/{job_id}", "/ops"):
        assert internal not in paths
    assert "wiro" not in {
        t for methods in paths.values() for op in methods.values() for t in op["tags"]
    }


def test_response_headers_are_declared() -> None:
    spec = create_app().openapi()
    submit = spec["paths"]["/v1/jobs"]["post"]["responses"]
    assert set(submit["202"]["headers"]) == {
        "Location",
        "Idempotent-Replayed",
        "Preference-Applied",
    }
    assert set(submit["429"]["headers"]) == {
        "Retry-After",
        "RateLimit-Limit",
        "RateLimit-Remaining",
        "RateLimit-Reset",
    }
    assert set(submit["503"]["headers"]) == {"Retry-After"}
    get = spec["paths"]["/v1/jobs/{job_id}"]["get"]["responses"]
    assert set(get["200"]["headers"]) == {"Preference-Applied"}
    for name, header in spec["components"]["headers"].items():
        assert header["description"] and header["schema"], name


def test_webhooks_describe_each_event_with_the_standard_webhooks_headers() -> None:
    spec = create_app().openapi()
    assert spec["openapi"].startswith("3.1")
    assert set(spec["webhooks"]) == set(WEBHOOK_EVENTS)
    for event, hook in spec["webhooks"].items():
        op = hook["post"]
        headers = {p["name"] for p in op["parameters"] if p["in"] == "header" and p["required"]}
        assert headers == {"webhook-id", "webhook-timestamp", "webhook-signature"}
        body = _resolve(spec, op["requestBody"]["content"]["application/json"]["schema"]["$ref"])
        assert body["properties"]["type"]["const"] == event  # type: ignore[index]
        data = {"key.budget_warning": "BudgetWarning"}.get(event, "JobOut")
        assert body["properties"]["data"]["$ref"] == f"#/components/schemas/{data}"  # type: ignore[index]


def test_the_job_and_page_schemas_carry_examples_and_servers_are_named() -> None:
    spec = create_app().openapi()
    schemas = spec["components"]["schemas"]
    job = schemas["JobOut"]["examples"][0]
    # (FastAPI drops null values from the document, examples included.)
    assert set(job) <= set(schemas["JobOut"]["properties"])
    assert {"id", "status", "outputs", "urls", "metrics", "started_at", "completed_at"} <= set(job)
    assert schemas["JobPage"]["examples"][0]["data"][0]["id"] == job["id"]
    assert [s["url"] for s in spec["servers"]] == ["/", "http://127.0.0.1:8000"]
