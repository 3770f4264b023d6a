"""``make smoke-wiro`` is for the real Wiro and never runs in CI; this proves it still runs,
against the simulator, with every check passing and the bodies saved as fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from service.auth import IssuedKey
from service.stack import SIM_KEY, SIM_SECRET, Stack
from tests import smoke_wiro

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean")]


def test_smoke_wiro_passes_against_the_simulator_and_saves_what_it_saw(
    stack: Stack,
    sim: httpx.Client,
    keys: dict[str, IssuedKey],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Long enough for the gateway to see the second task running before it cancels it.
    sim.put("/_sim/config", json={"task_duration_s": 8}).raise_for_status()
    monkeypatch.setenv("WIRO_API_KEY", SIM_KEY)
    monkeypatch.setenv("WIRO_API_SECRET", SIM_SECRET)

    code = smoke_wiro.main(
        [
            "--base-url",
            f"http://127.0.0.1:{stack.ports.sim}/v1",
            "--gateway",
            f"http://127.0.0.1:{stack.ports.api}",
            "--gateway-key",
            keys["app-a"].key,
            "--out",
            str(tmp_path),
            "--timeout",
            "60",
            "--yes",
        ]
    )

    assert code == 0
    listing = json.loads((tmp_path / "index.json").read_text())
    endpoints = {meta["endpoint"] for meta in listing.values()}
    assert {"Run", "Task/Detail", "Task/Kill", "Task/Cancel"} <= endpoints
    assert all((tmp_path / name).exists() for name in listing)
