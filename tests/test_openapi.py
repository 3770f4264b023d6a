"""The committed OpenAPI document is the app's own: regenerate with `make openapi`."""

from __future__ import annotations

import json
from pathlib import Path

from service.api.app import create_app

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
