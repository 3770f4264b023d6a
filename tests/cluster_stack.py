"""The service on several hosts (network namespaces, ``tests/cluster.py``).

Hosts: ``data`` (PostgreSQL behind PgBouncer in transaction pooling, Redis, the broker
and the S3 server), ``wiro`` (the simulator), ``gw1``/``gw2`` (a gateway each), ``wk1``/
``wk2`` (a worker each), ``beat`` and ``client`` (the test's own threads and its webhook
receiver), ``lb`` (a TCP balancer in front of both gateways: ``PUBLIC_URL``, so Wiro's
callbacks reach a live one). Each gateway's LISTEN connection goes to PostgreSQL directly,
as the README says it must; everything else goes through PgBouncer.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg

from service.embedded import EmbeddedPostgres, redis_server, s3_server
from service.stack import SIM_KEY, SIM_SECRET
from tests.cluster import Balancer, Host, Network, Proc, port_answers, wait_until

PG_PORT, PGB_PORT, REDIS_PORT, AMQP_PORT, S3_PORT = 5432, 6432, 6379, 5672, 9000
API_PORT, SIM_PORT, HOOK_PORT = 8000, 8100, 9100
DB = "dreamgate"

# Short clocks, as the suite's (tests/conftest.py), so repairs happen within the run.
CLUSTER_SETTINGS = {
    "CALLBACK_GRACE_S": "3",
    "SWEEP_INTERVAL_S": "1",
    "STUCK_AFTER_S": "6",
    "RUN_UNCERTAIN_WAIT_S": "30",
    "WIRO_TIMEOUT_S": "5",
    "OUTPUT_READ_TIMEOUT_S": "5",
    "FINALIZE_ATTEMPTS": "5",
    "WEBHOOK_RETRY_SCHEDULE_S": "0,0.5,1,2,4,8,8,8",
    "WEBHOOK_TIMEOUT_S": "3",
    "WIRO_STOP_BACKOFF_CAP_S": "2",
    "WIRO_ACCOUNT_PROBE_MAX_S": "2",
    "AUTH_CACHE_TTL_S": "5",
    "LOG_LEVEL": "INFO",
    "S3_BUCKET": "dreamgate-cluster",
    "BEAT_LEADER_TTL_S": "6",
}


class RabbitMQ:
    """A RabbitMQ node of its own inside a host (Debian's rabbitmq-server)."""

    def __init__(self, host: Host, folder: Path, env: dict[str, str]) -> None:
        self.host, self.folder = host, folder
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "rabbitmq.conf").write_text(
            # guest may log in from other hosts: these are the test's own namespaces.
            f"loopback_users = none\nlisteners.tcp.1 = {host.address}:{AMQP_PORT}\n"
        )
        (folder / "enabled_plugins").write_text("[].\n")
        self.env = {
            **env,
            "HOME": str(folder),  # its Erlang cookie, shared with rabbitmqctl below
            "RABBITMQ_NODENAME": "rabbit@localhost",
            "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"),
            "RABBITMQ_LOG_BASE": str(folder / "log"),
            "RABBITMQ_CONFIG_FILE": str(folder / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(folder / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(folder / "rabbit.pid"),
        }
        exe = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
        self.exe = str(exe) if exe.exists() else (shutil.which("rabbitmq-server") or "")
        self.proc: Proc | None = None

    def start(self, client: Host) -> None:
        self.proc = Proc(
            "rabbitmq", self.host.argv([self.exe]), self.folder / "server.log", self.env
        ).start()
        wait_until(
            lambda: port_answers(client, self.host.address, AMQP_PORT),
            timeout=120,
            what="RabbitMQ",
        )

    def stop(self) -> None:
        ctl = str(Path(self.exe).with_name("rabbitmqctl"))
        subprocess.run(
            self.host.argv([ctl, "-n", "rabbit@localhost", "stop"]),
            env=self.env,
            capture_output=True,
            timeout=60,
            check=False,
        )
        if self.proc is not None:
            self.proc.stop(timeout=30)


class PgBouncer:
    """Debian's pgbouncer in transaction pooling in front of the data host's PostgreSQL."""

    def __init__(self, host: Host, folder: Path, user: str, pool_size: int) -> None:
        self.host, self.folder, self.user = host, folder, user
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "users.txt").write_text('"postgres" ""\n')
        (folder / "pgbouncer.ini").write_text(
            f"[databases]\n* = host=127.0.0.1 port={PG_PORT}\n\n[pgbouncer]\n"
            f"listen_addr = {host.address},127.0.0.1\nlisten_port = {PGB_PORT}\n"
            f"unix_socket_dir = {folder}\nauth_type = trust\n"
            f"auth_file = {folder / 'users.txt'}\npool_mode = transaction\n"
            f"max_client_conn = 1000\ndefault_pool_size = {pool_size}\n"
            "admin_users = postgres\nstats_users = postgres\n"
            f"logfile = {folder / 'pgbouncer.log'}\npidfile = {folder / 'pgbouncer.pid'}\n"
        )
        shutil.chown(folder, user, user)
        for f in folder.iterdir():
            shutil.chown(f, user, user)
        self.proc: Proc | None = None

    def start(self, client: Host) -> None:
        exe = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        drop = ["setpriv", "--reuid", self.user, "--regid", self.user, "--clear-groups"]
        argv = self.host.argv([*drop, exe, str(self.folder / "pgbouncer.ini")])
        self.proc = Proc("pgbouncer", argv, self.folder / "stdout.log", dict(os.environ)).start()
        wait_until(
            lambda: port_answers(client, self.host.address, PGB_PORT), timeout=30, what="PgBouncer"
        )

    def stop(self) -> None:
        # SIGTERM is PgBouncer's immediate shutdown: every client connection is cut.
        if self.proc is not None:
            self.proc.stop()

    def pools(self) -> dict[str, int]:
        """Client and server connections now (SHOW POOLS on the admin console)."""
        with psycopg.connect(
            host=str(self.folder),
            port=PGB_PORT,
            user="postgres",
            dbname="pgbouncer",
            autocommit=True,
            connect_timeout=3,
        ) as conn:
            res = conn.pgconn.exec_(b"SHOW POOLS")  # the console speaks simple queries only
            names = [res.fname(i).decode() for i in range(res.nfields)]
            totals = {"clients": 0, "servers": 0}
            for row in range(res.ntuples):
                values = {n: (res.get_value(row, i) or b"0").decode() for i, n in enumerate(names)}
                if values.get("database") != DB:
                    continue
                totals["clients"] += int(values["cl_active"]) + int(values["cl_waiting"])
                totals["servers"] += sum(
                    int(values.get(k, "0")) for k in ("sv_active", "sv_idle", "sv_used")
                )
            return totals


class Cluster:
    """Every host and server; ``start()`` brings them up in dependency order."""

    def __init__(
        self,
        root: Path,
        *,
        broker: str,
        max_in_flight: int,
        worker_concurrency: int = 4,
        task_duration_s: float = 0.5,
    ) -> None:
        self.root, self.broker = root, broker
        self.max_in_flight, self.worker_concurrency = max_in_flight, worker_concurrency
        self.task_duration_s = task_duration_s
        self.net = n = Network()
        try:
            self.data, self.wiro = n.add("data", 2), n.add("wiro", 3)
            self.gateways = [n.add("gw1", 11), n.add("gw2", 12)]
            self.workers = [n.add("wk1", 21), n.add("wk2", 22)]
            self.beat_host, self.client = n.add("beat", 31), n.add("client", 50)
            self.lb_host = n.add("lb", 10)
        except BaseException:
            n.close()  # no namespace outlives a failed set-up
            raise
        self.procs: dict[str, Proc] = {}
        self.key = ""
        self.postgres: EmbeddedPostgres | None = None
        self.pgbouncer: PgBouncer | None = None
        self.rabbitmq: RabbitMQ | None = None
        self.redis: Any = None
        self.s3: Any = None
        self.balancer: Balancer | None = None

    # -- addresses ------------------------------------------------------------------

    def gateway_url(self, i: int) -> str:
        return f"http://{self.gateways[i].address}:{API_PORT}"

    @property
    def public_url(self) -> str:
        """The balancer in front of both gateways: PUBLIC_URL, so Wiro's callbacks reach
        whichever gateway is alive."""
        return f"http://{self.lb_host.address}:{API_PORT}"

    @property
    def sim_url(self) -> str:
        return f"http://{self.wiro.address}:{SIM_PORT}"

    @property
    def hook_url(self) -> str:
        return f"http://{self.client.address}:{HOOK_PORT}/hook"

    def env(self, **extra: str) -> dict[str, str]:
        """The service's environment on every host."""
        a = self.data.address
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("WIRO", "S3_", "AWS_", "DATABASE_", "REDIS_", "BROKER_"))
            and k not in {"PROMETHEUS_MULTIPROC_DIR", "OTEL_EXPORTER_OTLP_ENDPOINT"}
        }
        broker = f"amqp://guest:guest@{a}:{AMQP_PORT}//" if self.broker == "rabbitmq" else ""
        base.update(
            CLUSTER_SETTINGS,
            DATABASE_URL=f"postgresql://postgres@{a}:{PGB_PORT}/{DB}",
            DATABASE_LISTEN_URL=f"postgresql://postgres@{a}:{PG_PORT}/{DB}",
            DATABASE_TRANSACTION_POOLING="true",
            REDIS_URL=f"redis://{a}:{REDIS_PORT}/0",
            BROKER_URL=broker,
            S3_ENDPOINT_URL=f"http://{a}:{S3_PORT}",
            AWS_ACCESS_KEY_ID="embedded",
            AWS_SECRET_ACCESS_KEY="embedded",
            WIRO_BASE_URL=f"{self.sim_url}/v1",
            WIRO_API_KEY=SIM_KEY,
            WIRO_API_SECRET=SIM_SECRET,
            WIRO_MAX_IN_FLIGHT=str(self.max_in_flight),
            WEBHOOK_ALLOW_HOSTS=self.net.cidr,
            # The simulator serves the outputs (an internal host:port, named to be trusted).
            WIRO_OUTPUT_HOSTS=f"{self.wiro.address}:{SIM_PORT}",
            PUBLIC_URL=self.public_url,
        )
        base.update(extra)
        return base

    def _service(self, name: str, host: Host, args: list[str], **extra: str) -> Proc:
        old = self.procs.get(name)
        if old is not None:
            old.stop()
        env = self.env(**extra)
        metrics = self.root / "metrics" / name
        shutil.rmtree(metrics, ignore_errors=True)
        metrics.mkdir(parents=True)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics)
        argv = host.argv([sys.executable, "-m", "service.cli", *args])
        proc = self.procs[name] = Proc(name, argv, self.root / "logs" / f"{name}.log", env)
        return proc.start()

    # -- the data host -------------------------------------------------------------------

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        """A query on the cluster's database, over PostgreSQL's Unix socket (no network)."""
        assert self.postgres is not None
        with psycopg.connect(
            host=str(self.postgres.data_dir),
            port=PG_PORT,
            user="postgres",
            dbname=DB,
            autocommit=True,
        ) as conn:
            return list(conn.execute(query, params or None).fetchall())

    def start_data(self) -> None:
        d = self.data
        pg = self.postgres = EmbeddedPostgres(
            self.root / "postgres" / "data",
            PG_PORT,
            listen=(d.address,),
            trust_networks=(self.net.cidr,),
            netns=d.netns,
        )
        pg.start()
        with psycopg.connect(
            host=str(pg.data_dir),
            port=PG_PORT,
            user="postgres",
            dbname="postgres",
            autocommit=True,
        ) as conn:
            conn.execute(f'CREATE DATABASE "{DB}"')
        assert pg.user is not None
        # Two gateways and two workers at up to 15 connections each share 20 servers.
        self.pgbouncer = PgBouncer(d, self.root / "postgres" / "bouncer", pg.user, 20)
        self.pgbouncer.start(self.client)
        self.redis = redis_server(self.root / "redis", REDIS_PORT, bind=d.address, netns=d.netns)
        self.redis.start()
        self.s3 = s3_server(S3_PORT, self.root / "logs" / "s3.log", host=d.address, netns=d.netns)
        self.s3.start()
        if self.broker == "rabbitmq":
            self.rabbitmq = RabbitMQ(d, self.root / "rabbitmq", dict(os.environ))
            self.rabbitmq.start(self.client)
        for what, port in (("Redis", REDIS_PORT), ("S3", S3_PORT)):
            wait_until(
                lambda p=port: port_answers(self.client, d.address, p), timeout=60, what=what
            )

    def restart_broker(self) -> None:
        """Stop the broker and start it again (its queues and messages are on disk)."""
        if self.rabbitmq is not None:
            self.rabbitmq.stop()
            self.rabbitmq.start(self.client)
        else:
            self.redis.stop()
            self.redis.start()
            wait_until(
                lambda: port_answers(self.client, self.data.address, REDIS_PORT),
                timeout=30,
                what="Redis",
            )

    def restart_pgbouncer(self) -> None:
        assert self.pgbouncer is not None
        self.pgbouncer.stop()
        self.pgbouncer.start(self.client)

    # -- the service ---------------------------------------------------------------------

    def start(self) -> None:
        self.start_data()
        sim_env = {
            "WIROSIM_API_KEY": SIM_KEY,
            "WIROSIM_API_SECRET": SIM_SECRET,
            "WIROSIM_PUBLIC_URL": self.sim_url,
            "WIROSIM_TASK_DURATION_S": str(self.task_duration_s),
        }
        self._service(
            "sim",
            self.wiro,
            ["sim", "--host", self.wiro.address, "--port", str(SIM_PORT)],
            **sim_env,
        )
        # Migrations and keys go to PostgreSQL directly (DDL has no business in a pooler).
        direct = {"DATABASE_URL": self.env()["DATABASE_LISTEN_URL"]}
        for args in (["migrate", "--ensure-bucket"],):
            subprocess.run(
                self.data.argv([sys.executable, "-m", "service.cli", *args]),
                env=self.env(**direct),
                check=True,
                capture_output=True,
                timeout=120,
            )
        out = subprocess.run(
            self.data.argv(
                [
                    sys.executable,
                    "-m",
                    "service.cli",
                    "keys",
                    "create",
                    "--owner",
                    "cluster",
                    "--quiet",
                ]
            ),
            env=self.env(**direct),
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.key = out.stdout.strip()
        for i in range(len(self.gateways)):
            self.start_gateway(i)
        self.balancer = Balancer(
            self.lb_host, API_PORT, [(g.address, API_PORT) for g in self.gateways]
        )
        for i in range(len(self.workers)):
            self.start_worker(i)
        self._service(
            "beat", self.beat_host, ["beat", "--schedule", str(self.root / "beat-schedule")]
        )
        wait_until(
            lambda: port_answers(self.client, self.wiro.address, SIM_PORT),
            timeout=60,
            what="the simulator",
        )

    def start_gateway(self, i: int) -> None:
        host = self.gateways[i]
        self._service(
            f"gateway-{i + 1}",
            host,
            ["serve", "--host", host.address, "--port", str(API_PORT)],
        )
        wait_until(
            lambda: port_answers(self.client, host.address, API_PORT),
            timeout=60,
            what=f"gateway {i + 1}",
        )

    def kill_gateway(self, i: int) -> None:
        self.procs[f"gateway-{i + 1}"].kill()

    def start_worker(self, i: int) -> None:
        name = f"worker-{i + 1}"
        log = self.root / "logs" / f"{name}.log"
        offset = log.stat().st_size if log.exists() else 0
        self._service(
            name,
            self.workers[i],
            ["worker", "--concurrency", str(self.worker_concurrency), "--name", name],
        )
        wait_until(
            lambda: " ready." in log.read_text(errors="replace")[offset:],
            timeout=90,
            what=f"{name} ready",
        )

    def sim(self, method: str, path: str, body: Any = None) -> Any:
        import httpx

        def go() -> Any:
            with httpx.Client(base_url=self.sim_url, timeout=30) as http:
                r = http.request(method, path, json=body)
                r.raise_for_status()
                return r.json()

        return self.client.call(go)

    def stop(self) -> None:
        if self.balancer is not None:
            self.balancer.close()
        for proc in reversed(list(self.procs.values())):
            with contextlib.suppress(Exception):
                proc.stop(timeout=10)
        for server in (self.rabbitmq, self.pgbouncer, self.redis, self.s3):
            if server is not None:
                with contextlib.suppress(Exception):
                    server.stop()
        if self.postgres is not None:
            with contextlib.suppress(Exception):
                self.postgres.stop(mode="immediate")
        self.net.close()


@contextlib.contextmanager
def cluster(root: Path, **kwargs: Any) -> Iterator[Cluster]:
    """A started cluster, torn down (namespaces removed) whatever happens."""
    c = Cluster(root, **kwargs)
    try:
        c.start()
        yield c
    finally:
        c.stop()


def dump_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, default=str))


__all__ = ["Cluster", "cluster", "dump_json", "time"]
