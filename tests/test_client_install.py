"""`pip install ./clients/python` in a clean venv pulls none of the server's dependencies,
and the README's ten-line example runs there against the live stack."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service.auth import IssuedKey
from service.stack import Stack
from tests.conftest import ROOT, sample

CLIENT = ROOT / "clients" / "python"
# The server's own dependencies, none of which the client may bring.
SERVER_ONLY = {
    "sqlalchemy",
    "alembic",
    "celery",
    "kombu",
    "redis",
    "boto3",
    "botocore",
    "psycopg",
    "psycopg-binary",
    "pillow",
    "fastapi",
    "starlette",
    "uvicorn",
    "pydantic",
    "pydantic-settings",
    "structlog",
    "click",
    "rich",
    "limits",
    "prometheus-client",
}
# What it brings: httpx (and its own), anyio, standardwebhooks.
EXPECTED = {
    "dreamgate-client",
    "httpx",
    "httpcore",
    "h11",
    "anyio",
    "idna",
    "certifi",
    "sniffio",
    "typing-extensions",
    "exceptiongroup",
    "standardwebhooks",
}


def _name(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with only `pip install ./clients/python` in it (pinned by
    constraints.txt); its python."""
    venv = tmp_path_factory.mktemp("client-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    env = {**os.environ, "PIP_CONSTRAINT": str(ROOT / "constraints.txt")}
    env.pop("PYTHONPATH", None)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(CLIENT)],
        check=True,
        timeout=600,
        env=env,
        cwd=venv.parent,
    )
    return python


def test_the_client_installs_without_any_of_the_servers_dependencies(client_venv: Path) -> None:
    listed = subprocess.run(
        [str(client_venv), "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        check=True,
    )
    installed = {_name(d["name"]) for d in json.loads(listed.stdout)} - {"pip", "setuptools"}

    assert installed & SERVER_ONLY == set()
    assert "dreamgate-client" in installed
    assert installed <= EXPECTED, installed - EXPECTED
    probe = subprocess.run(
        [
            str(client_venv),
            "-c",
            "import importlib.util as u, dreamgate_client as d; "
            "print(d.__version__, [m for m in ('service', 'sqlalchemy', 'celery', 'boto3') "
            "if u.find_spec(m)])",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    )
    assert probe.stdout.split(maxsplit=1) == ["0.1.0", "[]\n"]


def readme_example() -> str:
    """The Python block under the client README's "Ten lines" heading."""
    text = (CLIENT / "README.md").read_text()
    section = text.split("## Ten lines", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    lines = [line for line in code.splitlines() if line.strip()]
    assert len(lines) <= 10, "the example is meant to stay ten lines"
    return code


@pytest.mark.e2e
@pytest.mark.usefixtures("clean")
def test_the_readme_example_submits_waits_and_downloads(
    client_venv: Path, stack: Stack, keys: dict[str, IssuedKey], tmp_path: Path
) -> None:
    shutil.copy(sample(1), tmp_path / "person.jpg")
    shutil.copy(sample(2), tmp_path / "jacket.jpg")
    env = {
        "PATH": os.environ["PATH"],
        "DREAMGATE_URL": f"http://127.0.0.1:{stack.ports.api}",
        "DREAMGATE_KEY": keys["app-a"].key,
    }

    run = subprocess.run(
        [str(client_venv), "-c", readme_example()],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=tmp_path,
        check=False,
    )

    assert run.returncode == 0, run.stderr
    first, *paths = run.stdout.splitlines()
    assert first.startswith("succeeded ") and first.endswith(" None"), first
    assert paths and all((tmp_path / p).read_bytes().startswith(b"\x89PNG") for p in paths)
