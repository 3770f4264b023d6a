"""How `dreamgate` commands find the dev stack of the checkout they run in.

`dreamgate dev` chooses addresses (embedded PostgreSQL on 55432, Redis on 56379, …) that
no default setting names. It writes them to ``.dreamgate/env`` and every other command
reads that file, found from the working directory or any parent, for each variable the
environment does not set itself: `dreamgate keys create` then reaches the dev stack's
database from any subdirectory without an export. Pure file handling, no clients.

The same folder holds ``dev.lock`` (one dev stack per checkout; its JSON names the
running instance's pid, API and servers) and ``dev-key``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

DATA_DIR = ".dreamgate"
ENV_FILE = "env"
KEY_FILE = "dev-key"
LOCK_FILE = "dev.lock"

# Marks which values came from the file, so errors can say where an address came from.
FROM_FILE = "DREAMGATE_ENV_FILE"


def find_data_dir(start: Path | None = None) -> Path | None:
    """The nearest ``.dreamgate`` folder holding an env file or a dev key, from ``start``
    (the working directory) up to the filesystem's root."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / DATA_DIR
        if (candidate / ENV_FILE).is_file() or (candidate / KEY_FILE).is_file():
            return candidate
    return None


def read_env(path: Path) -> dict[str, str]:
    """``NAME=value`` lines (blank lines and ``#`` comments skipped; no quoting)."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, _, value = line.partition("=")
        out[name.strip()] = value.strip()
    return out


def write_env(path: Path, values: dict[str, str]) -> None:
    """Write ``values`` as an env file readable by its owner only (it may hold the
    simulator's secret), atomically: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    body = "# Written by `dreamgate dev`: the dev stack's addresses, read by every command.\n"
    body += "".join(f"{k}={v}\n" for k, v in sorted(values.items()))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(body)
    tmp.replace(path)


def write_secret(path: Path, value: str) -> None:
    """A one-line file only its owner can read, created complete (never seen empty)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    tmp.replace(path)


def apply(environ: MutableMapping[str, str], start: Path | None = None) -> Path | None:
    """Fill ``environ`` from the nearest dev env file, never overriding a variable it
    already has; return the file used (also put in ``DREAMGATE_ENV_FILE``)."""
    data_dir = find_data_dir(start)
    if data_dir is None or not (data_dir / ENV_FILE).is_file():
        return None
    path = data_dir / ENV_FILE
    taken = [k for k, v in read_env(path).items() if k not in environ]
    for name, value in read_env(path).items():
        environ.setdefault(name, value)
    environ.setdefault(FROM_FILE, f"{path}:{','.join(taken)}")
    return path


def from_env_file(name: str, environ: MutableMapping[str, str] | None = None) -> str | None:
    """The env file a variable's value came from, when it did."""
    env = os.environ if environ is None else environ
    where, _, names = env.get(FROM_FILE, "").rpartition(":")
    return where if where and name in names.split(",") else None


def dev_key(start: Path | None = None) -> str | None:
    """The dev stack's admin key, from the nearest ``.dreamgate/dev-key``."""
    data_dir = find_data_dir(start)
    if data_dir is None or not (data_dir / KEY_FILE).is_file():
        return None
    return (data_dir / KEY_FILE).read_text().strip() or None


@dataclass
class Held:
    """The lock of a running dev stack, and what it says about itself."""

    file: IO[str]

    def describe(self, info: dict[str, Any]) -> None:
        """Replace the lock file's JSON (pid, API, servers) for others to read."""
        self.file.seek(0)
        self.file.truncate()
        self.file.write(json.dumps(info))
        self.file.flush()


class AlreadyRunning(Exception):
    """Another process holds the checkout's dev lock; ``info`` is what it wrote."""

    def __init__(self, info: dict[str, Any]) -> None:
        super().__init__(info)
        self.info = info


@contextlib.contextmanager
def dev_lock(data_dir: Path) -> Iterator[Held]:
    """Hold ``data_dir/dev.lock`` (flock, released by the kernel even on a crash) for the
    life of a dev stack, or raise AlreadyRunning without touching anything else."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / LOCK_FILE
    f = path.open("a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        text = f.read()
        f.close()
        try:
            info = json.loads(text) if text else {}
        except ValueError:
            info = {}
        raise AlreadyRunning(info if isinstance(info, dict) else {}) from None
    try:
        held = Held(f)
        held.describe({"pid": os.getpid(), "state": "starting"})
        yield held
    finally:
        with contextlib.suppress(OSError):
            f.seek(0)
            f.truncate()
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()
