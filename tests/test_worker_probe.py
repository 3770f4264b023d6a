"""`dreamgate worker-probe`: a real worker's heartbeat file, fresh while its event loop
runs, stale once the process is frozen, and "stopping" (still alive) during a warm
shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service import heartbeat
from service.embedded import ManagedProcess
from service.stack import Stack
from tests.conftest import ROOT, wait_for

CLI = [sys.executable, "-m", "service.cli"]


def probe(path: Path, max_age: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "worker-probe", "--file", str(path), "--max-age", str(max_age)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_probe_reads_the_files_age_and_state(tmp_path: Path) -> None:
    path = tmp_path / "hb"
    assert not heartbeat.check(path, max_age_s=5).alive  # never started
    heartbeat.beat(path)
    assert heartbeat.check(path, max_age_s=5).alive
    assert not heartbeat.check(path, max_age_s=5, now=time.time() + 10).alive
    heartbeat.beat(path, heartbeat.STOPPING)
    heartbeat.beat(path)  # a late periodic beat does not undo the shutdown's mark
    assert heartbeat.check(path, max_age_s=5, now=time.time() + 10).alive
    heartbeat.beat(path, force=True)  # a new process starts afresh
    assert not heartbeat.check(path, max_age_s=5, now=time.time() + 10).alive


@pytest.mark.e2e
def test_worker_heartbeat_goes_stale_when_its_loop_stops(stack: Stack, tmp_path: Path) -> None:
    path = tmp_path / "worker-heartbeat"
    env = {**stack.env, "HEARTBEAT_FILE": str(path), "HEARTBEAT_INTERVAL_S": "0.2"}
    argv = [sys.executable, "-m", "service.cli", "worker", "--concurrency", "1"]
    argv += ["--name", "probed"]
    worker = ManagedProcess("probed", argv, None, log=tmp_path / "worker.log", env=env)
    worker.start()
    try:
        wait_for(path.exists, timeout=60, what="the first heartbeat")
        first = path.stat().st_mtime
        wait_for(lambda: path.stat().st_mtime > first, timeout=10, what="a second heartbeat")
        result = probe(path, max_age=3)
        assert result.returncode == 0, result.stderr
        assert worker.proc is not None
        os.killpg(worker.proc.pid, signal.SIGSTOP)  # a hung process: no more heartbeats
        try:
            wait_for(lambda: probe(path, max_age=1).returncode == 1, timeout=30, what="stale probe")
        finally:
            os.killpg(worker.proc.pid, signal.SIGCONT)
        wait_for(lambda: probe(path, max_age=1).returncode == 0, timeout=30, what="fresh again")
        worker.proc.send_signal(signal.SIGTERM)  # warm shutdown: alive until it exits
        wait_for(lambda: path.read_text().startswith("stopping"), timeout=30, what="stopping")
        worker.proc.wait(60)
        assert worker.proc.returncode == 0
        assert probe(path, max_age=3).returncode == 0
    finally:
        worker.stop()
