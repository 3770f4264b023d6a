"""A small soak in CI (`make soak` runs the long one): faults at Wiro lose and double
nothing."""

from __future__ import annotations

import httpx
import pytest

from bench.soak import print_table, run_soak

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean")]


def test_small_soak_loses_no_job_and_makes_no_extra_wiro_task(
    api: httpx.Client, sim: httpx.Client
) -> None:
    result = run_soak(api, sim, jobs=60, concurrency=10, timeout=240)
    print_table(result)

    assert result["accepted"] == 60
    assert result["lost"] == 0
    assert result["extra_wiro_tasks"] == 0
    assert result["succeeded"] + result["failed"] + result["canceled"] == 60
    assert result["callbacks_dropped"] > 0  # the faults really happened
    assert result["webhooks_delivered"] == result["webhooks_expected"] > 0
