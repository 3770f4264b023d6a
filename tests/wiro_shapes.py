"""Wiro's documented bodies (tests/fixtures/wiro/) and a check that a body has their shape.

Shared by the contract test (the simulator against the fixtures) and ``make smoke-wiro``
(the real Wiro against the same fixtures).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "wiro"


def index() -> dict[str, dict[str, Any]]:
    """Every fixture's source, endpoint and HTTP status."""
    data: dict[str, dict[str, Any]] = json.loads((FIXTURES / "index.json").read_text())
    return data


def fixture(name: str) -> Any:
    """One fixture's body."""
    return json.loads((FIXTURES / name).read_text())


def shape(value: Any) -> Any:
    """The JSON type tree of a value: objects by key, lists by their first item."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__


def differences(actual: Any, documented: Any, path: str = "") -> list[str]:
    """Where ``actual`` lacks a documented field or has it with another JSON type.

    A null in one example says nothing about the field's type, and ``parameters`` echoes
    the model's own inputs, so neither is compared.
    """
    if isinstance(documented, dict):
        if not isinstance(actual, dict):
            return [f"{path or 'body'}: an object was documented, got {shape(actual)}"]
        found: list[str] = []
        for key, value in documented.items():
            where = f"{path}.{key}" if path else key
            if key not in actual:
                found.append(f"{where}: missing")
            elif value is not None and actual[key] is not None and key != "parameters":
                found += differences(actual[key], value, where)
        return found
    if isinstance(documented, list):
        if not isinstance(actual, list):
            return [f"{path}: a list was documented, got {shape(actual)}"]
        if documented and actual:
            return differences(actual[0], documented[0], f"{path}[0]")
        return []
    if shape(actual) != shape(documented):
        return [f"{path}: {shape(documented)} documented, got {shape(actual)} ({actual!r})"]
    return []


def assert_like(actual: Any, documented: Any) -> None:
    """Every field the documented body has is there, with the same JSON type."""
    found = differences(actual, documented)
    assert not found, found
