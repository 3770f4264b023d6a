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

    @property
    def logs(self) -> Path:
        """Where each process writes its log."""
        return self.data_dir / "logs"

    def start_backing(self, *, database: str = "dreamgate") -> None:
        """Embedded PostgreSQL, Redis and S3 for whichever URL is not configured."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = self.env
        self.reset_metrics()
        if not env.get("DATABASE_URL"):
            self.postgres = EmbeddedPostgres(self.data_dir / "postgres", self.ports.postgres)
            self.postgres.start()
            env["DATABASE_URL"] = self.postgres.create_database(database)
        if not env.get("REDIS_URL"):
            self.redis = redis_server(self.data_dir / "redis", self.ports.redis)
            self.redis.start()
            env["REDIS_URL"] = f"redis://127.0.0.1:{self.ports.redis}/0"
        if not env.get("S3_ENDPOINT_URL"):
            self.s3 = s3_server(self.ports.s3, log=self.logs / "s3.log")
            self.s3.start()
            env["S3_ENDPOINT_URL"] = f"http://127.0.0.1:{self.ports.s3}"
            env.setdefault("AWS_ACCESS_KEY_ID", "embedded")
            env.setdefault("AWS_SECRET_ACCESS_KEY", "embedded")
        env.setdefault("PUBLIC_URL", f"http://127.0.0.1:{self.ports.api}")

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
            WIRO_BASE_URL=f"{sim_url}/v1",
            WIRO_API_KEY=SIM_KEY,
            WIRO_API_SECRET=SIM_SECRET,
        )
        self.start_process("sim", ["sim", "--port", str(self.ports.sim)], self.ports.sim)

    def start_process(self, name: str, args: list[str], port: int | None) -> ManagedProcess:
        """Start (or restart) one named child process of the stack."""
        old = self.processes.get(name)
        if old is not None:
            old.stop()
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
            path.write_text(out.stdout.strip() + "\n")
            path.chmod(0o600)
        return path.read_text().strip()

    def start_service(self) -> None:
        """The gateway, the workers and beat."""
        self.start_process("gateway", ["serve", "--port", str(self.ports.api)], self.ports.api)
        self.start_workers()
        self.start_process(
            "beat", ["beat", "--schedule", str(self.data_dir / "beat-schedule")], None
        )

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
