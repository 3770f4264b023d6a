"""Schemathesis against the committed openapi/openapi.json, on the running gateway:
bounded and deterministic; no 5xx, and every answer as the document declares it."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi import checks as oc

from service.auth import IssuedKey
from service.stack import Stack

pytestmark = [pytest.mark.e2e]
OPENAPI = Path(__file__).resolve().parents[1] / "openapi" / "openapi.json"


schema = schemathesis.openapi.from_path(OPENAPI)
# What the issue asks: no 5xx, and statuses, content types, bodies and headers as declared.
# (Schemathesis's data-acceptance checks are left out: a schema cannot say "an image".)
CHECKS = [
    not_a_server_error,
    oc.status_code_conformance,
    oc.content_type_conformance,
    oc.response_schema_conformance,
    oc.response_headers_conformance,
]


@schema.parametrize()
@settings(max_examples=20, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_answers_as_documented(
    case: schemathesis.Case, stack: Stack, keys: dict[str, IssuedKey]
) -> None:
    case.call_and_validate(
        base_url=f"http://127.0.0.1:{stack.ports.api}",
        headers={"Authorization": f"Bearer {keys['app-a'].key}"},
        checks=CHECKS,
        timeout=30,
    )
