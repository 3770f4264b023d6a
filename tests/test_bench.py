"""`python -m bench --quick` runs every benchmark and writes its JSON. Nothing about times:
benchmarks report figures, tests only check that they run and say what they measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

EXPECTED = {
    "submit": {"rows", "goal", "goal_ratio_met", "goal_p99_c16_met"},
    "pipeline": {
        "rows",
        "goal",
        "service_added_p50_ms",
        "service_added_p99_ms",
        "measured_jobs",
        "ours_cpu_ms_per_job",
        "goal_issue14_met",
    },
    "callback": {"rows", "goal", "p50_ms", "p99_ms", "floor_p50_ms", "webhooks_received"},
    "output_copy": {"rows", "goal", "peak_rss_growth_mib", "throughput_ratio", "status"},
    "growth": {"rows", "goal", "sweep_explain", "sweep_ms_at_running"},
    "waiting": {"rows", "goal", "clients", "goal_slots_met", "goal_clients_met"},
    "fanout": {"rows", "goal", "streams", "reached", "fanout_p50_ms", "fanout_max_ms"},
}
ROW_KEYS = {
    "submit": {"body", "conc", "floor_rps", "svc_rps", "svc_p50_ms", "svc_p99_ms", "rps_ratio"},
    "pipeline": {"stage", "svc_p50_ms", "svc_p99_ms", "floor_p50_ms"},
    "growth": {"rows", "submit_rps", "list_p50_ms", "deep_p50_ms", "sweep_ms"},
    "waiting": {"worker_slots_held", "gateway_rss_mib", "worker_rss_mib", "db_connections"},
}

pytestmark = pytest.mark.e2e


def run_quick(module: str, tmp_path: Path) -> Path:
    """Run ``python -m <module> --quick``; the folder its JSON went to."""
    results = tmp_path / "results"  # not bench/results: that holds the full run's figures
    proc = subprocess.run(
        [sys.executable, "-m", module, "--quick"],
        cwd=ROOT,
        env={**os.environ, "BENCH_RESULTS": str(results)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return results


def test_quick_bench_runs_every_benchmark_and_writes_its_json(tmp_path: Path) -> None:
    results = run_quick("bench", tmp_path)
    for name, keys in EXPECTED.items():
        data = json.loads((results / f"{name}.json").read_text())
        assert "error" not in data, data.get("error")
        assert data["quick"] is True
        assert keys <= set(data), f"{name}: missing {keys - set(data)}"
        assert data["rows"], f"{name}: no rows"
        for row in data["rows"]:
            assert ROW_KEYS.get(name, set()) <= set(row), f"{name}: row {row}"
    summary = json.loads((results / "summary.json").read_text())
    assert summary["failed"] == []


def test_quick_admission_bench_runs_and_reports_its_four_parts(tmp_path: Path) -> None:
    results = run_quick("bench.admission", tmp_path)
    data = json.loads((results / "admission.json").read_text())
    parts = {row["part"]: row for row in data["rows"]}
    assert set(parts) == {"peak", "burst", "refused", "passes"}
    assert parts["peak"]["wiro_peak"] <= parts["peak"]["limit"]
    assert parts["refused"]["failed"] == 0
    # A burst committed at once is admitted in passes that each fill many slots: at the
    # default coalescing and with freed slots held up to a second.
    bursts = [row for row in data["rows"] if row["part"] == "passes"]
    assert [row["coalesce_s"] for row in bursts] == [0.05, 1.0]
    for passes in bursts:
        assert passes["succeeded"] == passes["jobs"]
        assert 0 < passes["passes"] < passes["jobs"]
    assert {"b_wait_s", "a_admitted_between"} <= set(parts["burst"])
