"""A heartbeat file: a worker's (or beat's) loop touches it, an exec probe reads its age.

The worker's event loop rewrites the file every HEARTBEAT_INTERVAL_S (a timer on that
loop, so a loop that hangs stops the heartbeat); once a shutdown has begun the file says
``stopping`` and the probe keeps answering yes, so that a worker finishing its tasks
within the pod's grace period is not restarted by its liveness probe meanwhile.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

RUNNING = "running"
STOPPING = "stopping"


def beat(path: Path, state: str = RUNNING, *, force: bool = False) -> None:
    """Record that the loop is alive now (the file's mtime) and what it is doing.

    A periodic ``running`` beat leaves a ``stopping`` file alone (the shutdown has begun);
    ``force`` writes anyway, as a process does when it starts.
    """
    if state == RUNNING and not force:
        try:
            if path.read_text().startswith(STOPPING):
                return
        except FileNotFoundError:
            pass
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{state} {time.time():.3f}\n")
    tmp.replace(path)  # atomic: a probe never reads half a file


@dataclass(frozen=True)
class Verdict:
    """What the probe concluded, and why (printed by `dreamgate worker-probe`)."""

    alive: bool
    reason: str


def check(path: Path, *, max_age_s: float, now: float | None = None) -> Verdict:
    """Alive when the file was touched within ``max_age_s``, or a shutdown is under way."""
    try:
        text = path.read_text()
        age = (time.time() if now is None else now) - path.stat().st_mtime
    except FileNotFoundError:
        return Verdict(False, f"no heartbeat file at {path}")
    if text.startswith(STOPPING):
        return Verdict(True, "shutting down")
    if age > max_age_s:
        return Verdict(False, f"heartbeat {age:.1f} s old (limit {max_age_s:g} s)")
    return Verdict(True, f"heartbeat {age:.1f} s old")
