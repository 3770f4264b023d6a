"""The server's wheel is self-contained: migrations, their Alembic setup, the samples and the
client ship inside it, and an installed copy migrates a database from any directory."""

from __future__ import annotations

import email
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from alembic.script import ScriptDirectory

import migrations
from service import __version__
from service.embedded import free_port
from service.stack import Stack, own_database
from tests.conftest import ROOT

MIGRATIONS = sorted(p.name for p in (ROOT / "migrations" / "versions").glob("*.py"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `pip install .` would install, built from this checkout."""
    out = tmp_path_factory.mktemp("wheel")
    env = {**os.environ, "PIP_CONSTRAINT": str(ROOT / "constraints.txt")}
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(ROOT)],
        check=True,
        timeout=600,
        env=env,
        cwd=out,
    )
    [built] = out.glob("dreamgate-*.whl")
    return built


def test_the_wheel_carries_migrations_samples_client_and_license(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        for name in (
            "migrations/__init__.py",
            "migrations/env.py",
            "migrations/script.py.mako",
            "dreamgate_client/__init__.py",
            "dreamgate_client/py.typed",
            "service/api/static/ops.html",
            "wirosim/app.py",
            "workers/tasks.py",
        ):
            assert name in names, name
        assert sorted(n.rsplit("/", 1)[1] for n in names if "migrations/versions/" in n) == (
            MIGRATIONS
        )
        for n in (1, 2):  # the files themselves, not links to samples/
            shipped = whl.read(f"service/samples/dreamomni2-input-{n}.jpg")
            original = (ROOT / "samples" / f"dreamomni2-input-{n}.jpg").read_bytes()
            assert hashlib.sha256(shipped).digest() == hashlib.sha256(original).digest()
        [metadata] = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = email.message_from_bytes(whl.read(metadata))
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert meta["Version"] == __version__
    assert meta["License-Expression"] == "MIT"
    assert {u.split(",")[0] for u in meta.get_all("Project-URL") or []} >= {"Homepage", "Changelog"}


@pytest.fixture
def fresh_database(database_url: str) -> Iterator[str]:
    """An empty database on the tests' PostgreSQL."""
    admin = database_url.rsplit("/", 1)[0] + "/postgres"
    with own_database(admin, "dreamgate_pkg") as url:
        yield url


def test_the_unpacked_wheel_migrates_a_new_database_from_another_directory(
    wheel: Path, fresh_database: str, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as whl:
        whl.extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), DATABASE_URL=fresh_database)

    def run(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, *args], env=env, cwd=elsewhere, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    where = run("-c", "import service, migrations; print(service.__file__, migrations.__file__)")
    assert all(path.startswith(str(site)) for path in where.split())
    assert run("-m", "service.cli", "--version").strip() == f"dreamgate, version {__version__}"
    run("-m", "service.cli", "migrate")

    with psycopg.connect(fresh_database) as conn:
        version = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables")}
    head = ScriptDirectory.from_config(migrations.alembic_config(fresh_database)).get_current_head()
    assert version == (head,)
    assert {"jobs", "job_events", "api_keys", "webhook_messages"} <= tables


def test_the_client_distribution_moves_with_the_server(wheel: Path) -> None:
    # Both ship dreamgate_client/ (decision 0013): one version, or two owners disagree.
    client = (ROOT / "clients" / "python" / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'^version = "([^"]+)"', client, re.M)[1] == __version__  # type: ignore[index]


DOCKERFILE = (ROOT / "Dockerfile").read_text(encoding="utf-8")


@pytest.mark.e2e
def test_the_images_install_steps_give_a_server_that_passes_its_healthcheck(
    wheel: Path, fresh_database: str, stack: Stack, tmp_path: Path
) -> None:
    """The Dockerfile's steps replayed without Docker (no engine on CI's machines): the wheel
    into a clean venv with the constraints, then migrate, serve, and its HEALTHCHECK."""
    # The steps replayed here are the ones the image runs.
    assert "RUN pip wheel --no-deps --wheel-dir /dist ." in DOCKERFILE
    assert "pip install --constraint /tmp/constraints.txt /tmp/dist/dreamgate-*.whl" in DOCKERFILE
    assert "PYTHONPATH" not in DOCKERFILE
    found = re.search(r"^HEALTHCHECK .*?CMD (\[.*?\])$", DOCKERFILE, re.M | re.S)
    assert found, "the image has a HEALTHCHECK"
    healthcheck: list[str] = json.loads(found[1])

    venv = tmp_path / "image"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    subprocess.run(
        ["pip", "install", "--quiet", "--constraint", str(ROOT / "constraints.txt"), str(wheel)],
        check=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    app = tmp_path / "app"  # the image's WORKDIR: no checkout in sight
    app.mkdir()
    env.update({k: v for k, v in stack.env.items() if k not in ("PATH", "PYTHONPATH")})
    env["DATABASE_URL"] = fresh_database
    dreamgate = str(venv / "bin" / "dreamgate")
    assert (
        subprocess.run(
            [dreamgate, "--version"], env=env, cwd=app, capture_output=True, text=True, check=True
        ).stdout.strip()
        == f"dreamgate, version {__version__}"
    )
    subprocess.run([dreamgate, "migrate"], env=env, cwd=app, check=True, timeout=120)

    port = free_port()
    probe = [arg.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for arg in healthcheck]
    probe[0] = str(venv / "bin" / probe[0])  # `python` on the image's PATH is the venv's
    ready = [*probe[:-1], probe[-1].replace("/healthz", "/readyz")]
    server = subprocess.Popen(
        [dreamgate, "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=app,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(probe, env=env, cwd=app, capture_output=True).returncode != 0:
            assert server.poll() is None, server.stderr.read().decode() if server.stderr else ""
            assert time.monotonic() < deadline, "the HEALTHCHECK never passed"
            time.sleep(0.5)
        # And ready: the installed server reaches PostgreSQL, Redis and S3.
        subprocess.run(ready, env=env, cwd=app, check=True, timeout=30)
    finally:
        server.terminate()
        server.wait(timeout=30)
