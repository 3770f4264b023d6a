"""`dreamgate dev` as a person runs it: in a checkout of its own (a temporary folder), on
embedded servers it starts itself, with every other command run from a subdirectory and
nothing exported. The dev stack's servers are its own (free ports), never the machine's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.embedded import free_port
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e

# What a fresh shell has: none of the settings a test session or a machine might export.
SCRUB = ("DATABASE_URL", "REDIS_URL", "S3_", "WIRO", "DREAMGATE", "AWS_", "PUBLIC_URL")


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(SCRUB)}
    env["PYTHONPATH"] = str(ROOT)
    return env


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        cwd=cwd,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@dataclass
class Dev:
    checkout: Path
    proc: subprocess.Popen[str]
    port_args: list[str]
    api: str
    sim: str
    out: Path
    # Whether the dev key and the env file were there when /healthz first answered.
    ready_files: tuple[bool, bool]

    @property
    def data(self) -> Path:
        return self.checkout / ".dreamgate"

    def lock(self) -> dict[str, object]:
        return dict(json.loads((self.data / "dev.lock").read_text()))


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dev]:
    checkout = tmp_path_factory.mktemp("checkout")
    (checkout / "sub" / "dir").mkdir(parents=True)
    shutil.copytree(ROOT / "samples", checkout / "samples")  # what the README's curls upload
    ports = {n: free_port() for n in ("port", "sim-port", "postgres-port", "redis-port", "s3-port")}
    port_args = [a for n, p in ports.items() for a in (f"--{n}", str(p))]
    out = checkout / "dev.out"
    with out.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "dev", *port_args],
            cwd=checkout,
            env=clean_env(),
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    api = f"http://127.0.0.1:{ports['port']}"
    data = checkout / ".dreamgate"
    ready: tuple[bool, bool] | None = None
    deadline = time.monotonic() + 180
    while ready is None and time.monotonic() < deadline:
        assert proc.poll() is None, out.read_text()
        try:
            if httpx.get(f"{api}/healthz", timeout=1).status_code == 200:
                ready = ((data / "dev-key").is_file(), (data / "env").is_file())
        except httpx.HTTPError:
            time.sleep(0.05)
    assert ready is not None, out.read_text()
    while "dreamgate is up" not in out.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
        time.sleep(0.1)
    try:
        yield Dev(
            checkout, proc, port_args, api, f"http://127.0.0.1:{ports['sim-port']}", out, ready
        )
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def test_the_dev_key_and_settings_exist_before_healthz_answers(dev: Dev) -> None:
    assert dev.ready_files == (True, True)
    banner = dev.out.read_text()
    for path in ("/docs", "/ops#key=", "/metrics", "/readyz"):
        assert f"{dev.api}{path}" in banner


def test_every_command_finds_the_dev_stack_from_a_subdirectory(dev: Dev) -> None:
    here = dev.checkout / "sub" / "dir"
    created = cli("keys", "create", "--owner", "my-app", cwd=here)
    assert created.returncode == 0, created.stderr
    assert "Traceback" not in created.stderr
    listed = cli("keys", "list", cwd=here)
    assert listed.returncode == 0, listed.stderr
    assert "my-app" in listed.stdout and "dev" in listed.stdout
    assert cli("migrate", cwd=here).returncode == 0
    # The client commands find the gateway and the dev key the same way.
    jobs = cli("jobs", "list", cwd=here)
    assert jobs.returncode == 0, jobs.stderr


def test_a_second_dev_stack_says_already_running_and_touches_nothing(dev: Dev) -> None:
    pid = dev.lock()["pid"]
    second = cli("dev", *dev.port_args, cwd=dev.checkout, timeout=60)
    assert second.returncode != 0
    assert f"already running (pid {pid}): API at {dev.api}" in second.stderr
    assert "Traceback" not in second.stderr
    assert dev.proc.poll() is None
    ready = httpx.get(f"{dev.api}/readyz", timeout=5)
    assert ready.status_code == 200, ready.text
    assert cli("keys", "list", cwd=dev.checkout).returncode == 0


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {title}\n")
    return text[start : text.index("\n## ", start + 1)]


def test_the_readme_first_jobs_run_as_written(dev: Dev) -> None:
    blocks = re.findall(r"```sh\n(.*?)```", readme_section("Send a first job"), re.S)
    curls = [b for b in blocks if "curl" in b]
    assert len(curls) == 2  # the upload and the JSON example (image URLs)
    key = (dev.data / "dev-key").read_text().strip()
    ids = []
    for block in curls:
        # As written, but on this dev stack's ports (another may run on 8000 and 8100).
        script = block.replace("127.0.0.1:8000", dev.api.removeprefix("http://"))
        script = script.replace("127.0.0.1:8100", dev.sim.removeprefix("http://"))
        if "KEY=" not in script:
            script = "KEY=$(cat .dreamgate/dev-key)\n" + script
        run = subprocess.run(
            ["bash", "-ec", script], cwd=dev.checkout, capture_output=True, text=True, timeout=60
        )
        assert run.returncode == 0, run.stderr
        job = json.loads(run.stdout)
        assert job["status"] == "queued", job
        ids.append(job["id"])
    with httpx.Client(base_url=dev.api, headers={"Authorization": f"Bearer {key}"}) as api:
        for job_id in ids:
            done = api.get(f"/v1/jobs/{job_id}", headers={"Prefer": "wait=60"}).json()
            assert done["status"] == "succeeded", done
            assert done["outputs"]


def test_an_unreachable_database_is_one_line_naming_it_and_exit_2(tmp_path: Path) -> None:
    port = free_port()
    env = {**clean_env(), "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{port}/x"}
    for args in (["keys", "list"], ["keys", "create", "--owner", "a"], ["migrate"]):
        r = cli(*args, cwd=tmp_path, env=env)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr
        (line,) = r.stderr.strip().splitlines()
        assert f"127.0.0.1:{port}" in line and line.endswith("(database_unreachable)")
    env = {**clean_env(), "REDIS_URL": f"redis://127.0.0.1:{port}/0"}
    r = cli("worker", cwd=tmp_path, env=env)
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert f"127.0.0.1:{port}" in line and line.endswith("(broker_unreachable)")


def test_a_server_dying_under_the_stack_is_reported_and_the_stack_stops(dev: Dev) -> None:
    # Runs last in this module: it ends the dev stack.
    servers = dev.lock()["servers"]
    assert isinstance(servers, dict)
    os.kill(int(servers["redis"]), signal.SIGKILL)
    assert dev.proc.wait(60) != 0
    said = dev.out.read_text()
    assert "redis died" in said and "Traceback" not in said
    # Everything it started is stopped, its own PostgreSQL included; the lock is free.
    assert not (dev.data / "postgres" / "postmaster.pid").exists()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{dev.api}/healthz", timeout=2)
