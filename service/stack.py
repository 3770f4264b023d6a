"""The whole service on one machine: backing servers (embedded where none is configured),
the simulator, the gateway, a worker and beat, supervised together. Used by ``dreamgate
dev`` and by the end-to-end tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from service import devenv
from service.embedded import (
    EmbeddedPostgres,
    ManagedProcess,
    port_open,
    redis_server,
    s3_server,
)

SIM_KEY = "sim-key"
SIM_SECRET = "sim-secret"  # noqa: S105 - the simulator's own, public test secret


# The machine's PostgreSQL, as tests, benchmarks and the soak find it (trust auth).
MACHINE_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"


def machine_postgres() -> str | None:
    """The admin URL of a PostgreSQL on 127.0.0.1:5432 when one answers, else None."""
    return MACHINE_POSTGRES if port_open(5432) else None


@contextmanager
def own_database(admin_url: str, prefix: str) -> Iterator[str]:
    """A fresh database on the server ``admin_url`` reaches; its URL; dropped afterwards.

    Tests, benchmarks and the soak each run in one of these, so runs that overlap on one
    machine (and its one PostgreSQL) never see each other's rows.
    """
    import psycopg

    admin = admin_url.replace("postgresql+psycopg://", "postgresql://")
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = admin.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Ports:
    """Where each server listens on 127.0.0.1."""

    api: int = 8000
    sim: int = 8100
    postgres: int = 55432
    redis: int = 56379
    s3: int = 59000


class PortInUse(RuntimeError):
    """A port the stack would start a server on already answers: someone else's server."""


def _free_or_fail(name: str, port: int, setting: str | None) -> None:
    # Starting anyway would be worse than failing: a server that cannot bind exits, but
    # wait_for_port would see the other one answer, and the stack would use (and on its
    # way out stop) a server it does not own.
    if port_open(port):
        how = f"set {setting} to use it, or free the port" if setting else "free the port"
        raise PortInUse(f"{name}: 127.0.0.1:{port} is already in use ({how})")


@dataclass
class Stack:
    """Starts what ``env`` does not already point at, then the service's processes."""

    data_dir: Path
    ports: Ports = field(default_factory=Ports)
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    worker_concurrency: int = 4
    # Worker processes (threads pool each): one per core lets each consume and run tasks
    # on its own GIL; the first is named "worker", the others "worker-2", "worker-3"...
    worker_processes: int = 1
    postgres: EmbeddedPostgres | None = None
    redis: ManagedProcess | None = None
    s3: ManagedProcess | None = None
    processes: dict[str, ManagedProcess] = field(default_factory=dict)
    # The variables this stack chose itself (embedded servers' URLs, the simulator's key).
    chosen: dict[str, str] = field(default_factory=dict)

    @property
    def logs(self) -> Path:
        """Where each process writes its log."""
        return self.data_dir / "logs"

    def start_backing(self, *, database: str = "dreamgate") -> None:
        """Embedded PostgreSQL, Redis and S3 for whichever URL is not configured."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = self.env
        self.reset_metrics()
        # Each server is remembered only once it started: stop() must never stop a server
        # this stack did not start (such as another dev stack's, on the same data folder).
        if not env.get("DATABASE_URL"):
            _free_or_fail("postgres", self.ports.postgres, "DATABASE_URL")
            postgres = EmbeddedPostgres(self.data_dir / "postgres", self.ports.postgres)
            postgres.start()
            self.postgres = postgres
            self.choose("DATABASE_URL", postgres.create_database(database))
        if not env.get("REDIS_URL"):
            _free_or_fail("redis", self.ports.redis, "REDIS_URL")
            redis = redis_server(self.data_dir / "redis", self.ports.redis)
            redis.start()
            self.redis = redis
            self.choose("REDIS_URL", f"redis://127.0.0.1:{self.ports.redis}/0")
        if not env.get("S3_ENDPOINT_URL"):
            _free_or_fail("s3", self.ports.s3, "S3_ENDPOINT_URL")
            s3 = s3_server(self.ports.s3, log=self.logs / "s3.log")
            s3.start()
            self.s3 = s3
            self.choose("S3_ENDPOINT_URL", f"http://127.0.0.1:{self.ports.s3}")
            if "AWS_ACCESS_KEY_ID" not in env:
                self.choose("AWS_ACCESS_KEY_ID", "embedded")
            if "AWS_SECRET_ACCESS_KEY" not in env:
                self.choose("AWS_SECRET_ACCESS_KEY", "embedded")
        if "PUBLIC_URL" not in env:
            self.choose("PUBLIC_URL", f"http://127.0.0.1:{self.ports.api}")

    def choose(self, name: str, value: str) -> None:
        """Set a variable the stack decided on itself (what `.dreamgate/env` records)."""
        self.env[name] = value
        self.chosen[name] = value

    def write_env_file(self) -> Path:
        """Record the addresses this stack chose, for every other `dreamgate` command."""
        path = self.data_dir / devenv.ENV_FILE
        devenv.write_env(
            path, {**self.chosen, "DREAMGATE_URL": f"http://127.0.0.1:{self.ports.api}"}
        )
        return path

    def servers(self) -> dict[str, int | None]:
        """The pid of each server and process this stack started (None: not running)."""
        out: dict[str, int | None] = {}
        if self.postgres is not None:
            out["postgres"] = self.postgres.pid()
        for name, proc in (("redis", self.redis), ("s3", self.s3), *self.processes.items()):
            if proc is not None:
                out[name] = proc.proc.pid if proc.running and proc.proc else None
        return out

    def dead(self) -> list[str]:
        """The servers and processes this stack started that are no longer running."""
        return [name for name, pid in self.servers().items() if pid is None]

    def log_of(self, name: str) -> Path:
        """Where the server or process ``name`` writes its log."""
        if name == "postgres" and self.postgres is not None:
            return self.postgres.log
        if name == "redis" and self.redis is not None and self.redis.log is not None:
            return self.redis.log
        return self.logs / f"{name}.log"

    def reset_metrics(self) -> None:
        """A fresh folder for prometheus_client's multiprocess files, shared by the gateway
        and workers started here so that the gateway's /metrics adds them all up."""
        folder = self.data_dir / "metrics"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        self.env["PROMETHEUS_MULTIPROC_DIR"] = str(folder)

    def _proc(self, name: str, args: list[str], port: int | None) -> ManagedProcess:
        argv = [sys.executable, "-m", "service.cli", *args]
        return ManagedProcess(name, argv, port, log=self.logs / f"{name}.log", env=self.env)

    def start_simulator_if_needed(self) -> None:
        """The Wiro simulator, unless a real Wiro key is configured."""
        env = self.env
        if env.get("WIRO_API_KEY"):
            return
        sim_url = f"http://127.0.0.1:{self.ports.sim}"
        env.update(
            WIROSIM_API_KEY=SIM_KEY,
            WIROSIM_API_SECRET=SIM_SECRET,
            WIROSIM_PUBLIC_URL=sim_url,
        )
        self.choose("WIRO_BASE_URL", f"{sim_url}/v1")
        self.choose("WIRO_SOCKET_URL", f"ws://127.0.0.1:{self.ports.sim}/v1")
        self.choose("WIRO_API_KEY", SIM_KEY)
        self.choose("WIRO_API_SECRET", SIM_SECRET)
        # The simulator serves the outputs itself, from loopback: name it, and only it.
        if "WIRO_OUTPUT_HOSTS" not in env:
            self.choose("WIRO_OUTPUT_HOSTS", f"127.0.0.1:{self.ports.sim}")
        # Image URLs of the simulator's own files (an earlier task's inputs) are on loopback.
        if "IMAGE_URL_ALLOW_HOSTS" not in env:
            self.choose("IMAGE_URL_ALLOW_HOSTS", "127.0.0.1")
        self.start_process("sim", ["sim", "--port", str(self.ports.sim)], self.ports.sim)

    def start_process(self, name: str, args: list[str], port: int | None) -> ManagedProcess:
        """Start (or restart) one named child process of the stack."""
        old = self.processes.get(name)
        if old is not None:
            old.stop()
        elif port is not None:
            _free_or_fail(name, port, None)
        proc = self.processes[name] = self._proc(name, args, port)
        proc.start(timeout=60)
        return proc

    def prepare(self) -> None:
        """Schema up to date and bucket present (in a child, with the stack's environment)."""
        subprocess.run(
            [sys.executable, "-m", "service.cli", "migrate", "--ensure-bucket"],
            env=self.env,
            check=True,
        )

    def ensure_dev_key(self) -> str:
        """An admin key for trying the service, kept in the data folder between runs."""
        path = self.data_dir / "dev-key"
        if not path.exists():
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "service.cli",
                    "keys",
                    "create",
                    "--owner",
                    "dev",
                    "--admin",
                    "--quiet",
                ],
                env=self.env,
                check=True,
                capture_output=True,
                text=True,
            )
            devenv.write_secret(path, out.stdout.strip())
        return path.read_text().strip()

    def start_service(self) -> None:
        """The gateway, the workers and beat."""
        self.start_process("gateway", ["serve", "--port", str(self.ports.api)], self.ports.api)
        self.start_workers()
        self.start_process(
            "beat", ["beat", "--schedule", str(self.data_dir / "beat-schedule")], None
        )
        self.start_progress()

    def start_progress(self) -> ManagedProcess:
        """``dreamgate progress``: the websocket follower of running jobs (display only)."""
        return self.start_process("progress", ["progress"], None)

    def start_worker(self, name: str = "worker") -> ManagedProcess:
        """A Celery worker process (several may run)."""
        return self.start_process(
            name, ["worker", "--concurrency", str(self.worker_concurrency), "--name", name], None
        )

    @property
    def worker_names(self) -> list[str]:
        """The names of the stack's worker processes."""
        return ["worker", *(f"worker-{n}" for n in range(2, self.worker_processes + 1))]

    def start_workers(self) -> None:
        """Every worker process of the stack."""
        for name in self.worker_names:
            self.start_worker(name)

    def stop_workers(self) -> None:
        """Stop every worker process of the stack (their unacked messages wait in Redis)."""
        for name in self.worker_names:
            proc = self.processes.get(name)
            if proc is not None:
                proc.stop()

    def start(self) -> None:
        """Everything, in dependency order."""
        self.start_backing()
        self.start_simulator_if_needed()
        self.prepare()
        self.start_service()

    def stop(self) -> None:
        """Stop the service's processes, then the embedded servers."""
        for proc in reversed(list(self.processes.values())):
            proc.stop()
        for server in (self.s3, self.redis):
            if server is not None:
                server.stop()
        if self.postgres is not None:
            self.postgres.stop()
