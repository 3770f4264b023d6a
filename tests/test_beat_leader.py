"""Two real beat processes on the session stack: only the one holding the lease sends the
sweep; the other takes over when the leader stops (at once) or dies (within the lease)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from service.embedded import ManagedProcess
from service.stack import Stack
from tests.conftest import wait_for

pytestmark = pytest.mark.e2e

LEASE_TTL_S = "3"  # a killed leader's lease lapses within the test


def sends(log: Path) -> list[datetime]:
    """When this beat sent the sweep, from its log (Celery's own line per send)."""
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if "Sending due task sweep" in str(entry.get("event", "")):
            out.append(datetime.fromisoformat(entry["timestamp"]))
    return out


class Beats:
    """Beat processes of the test's own, beside the stack's (stopped meanwhile)."""

    def __init__(self, stack: Stack, root: Path) -> None:
        self.stack, self.root = stack, root
        self.procs: dict[str, ManagedProcess] = {}

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def start(self, name: str) -> ManagedProcess:
        argv = [sys.executable, "-m", "service.cli", "beat", "--schedule", str(self.root / name)]
        env = {**self.stack.env, "BEAT_LEADER_TTL_S": LEASE_TTL_S}
        proc = self.procs[name] = ManagedProcess(name, argv, None, log=self.log(name), env=env)
        proc.start()
        return proc

    def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.stop()


@pytest.fixture
def beats(stack: Stack, tmp_path: Path) -> Iterator[Beats]:
    stack.processes["beat"].stop()  # releases the lease: the test's beats compete alone
    group = Beats(stack, tmp_path)
    try:
        yield group
    finally:
        group.stop_all()
        stack.processes["beat"].start()


def test_two_beats_send_each_sweep_once_and_the_standby_takes_over(beats: Beats) -> None:
    beats.start("beat-a")
    wait_for(lambda: len(sends(beats.log("beat-a"))) >= 2, timeout=30, what="beat-a leading")
    beats.start("beat-b")
    # SWEEP_INTERVAL_S is 0.5 in tests: a dozen more turns of the schedule with both up.
    start = len(sends(beats.log("beat-a")))
    wait_for(lambda: len(sends(beats.log("beat-a"))) >= start + 12, timeout=60, what="sweeps")
    assert sends(beats.log("beat-b")) == [], "the standby sent the sweep while a leader held"

    # A clean stop releases the lease: the standby leads from its next tick.
    beats.procs["beat-a"].stop()
    a_sent = sends(beats.log("beat-a"))
    wait_for(lambda: len(sends(beats.log("beat-b"))) >= 4, timeout=30, what="beat-b leading")
    assert sends(beats.log("beat-b"))[0] > a_sent[-1]

    # A leader that dies keeps its lease until it lapses; then the standby leads.
    beats.start("beat-c")
    before = len(sends(beats.log("beat-b")))
    wait_for(lambda: len(sends(beats.log("beat-b"))) >= before + 4, timeout=30, what="sweeps")
    assert sends(beats.log("beat-c")) == []
    beats.procs["beat-b"].kill()
    b_sent = sends(beats.log("beat-b"))
    wait_for(lambda: len(sends(beats.log("beat-c"))) >= 4, timeout=30, what="beat-c leading")
    c_sent = sends(beats.log("beat-c"))
    assert c_sent[0] > b_sent[-1]

    # At no time did two beats send: the three runs of sends follow each other.
    assert sends(beats.log("beat-a")) == a_sent
    assert sends(beats.log("beat-b")) == b_sent
