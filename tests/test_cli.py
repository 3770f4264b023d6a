"""The ``dreamgate`` client commands, run as real subprocesses against the running stack."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from service.auth import IssuedKey
from service.embedded import free_port
from service.stack import Stack
from tests.conftest import ROOT, sample, wait_status

SEED_PROMPT = "Replace the suit in the first image with the clothes in the second image."


def run_cli(
    *args: str, url: str, key: str, cwd: Path = ROOT, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``python -m service.cli ARGS`` with DREAMGATE_URL / DREAMGATE_KEY, not on a TTY."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DREAMGATE_")}
    env.update(DREAMGATE_URL=url, DREAMGATE_KEY=key, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def one_line_error(
    result: subprocess.CompletedProcess[str], code: str, *, after_progress: bool = False
) -> str:
    """The command failed with exit code 2 and one readable line naming ``code`` (the last
    line on stderr, after the job's progress lines when ``after_progress``)."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) >= 1 if after_progress else len(lines) == 1, result.stderr
    assert [line for line in lines if line.startswith("error:")] == lines[-1:]
    lines = lines[-1:]
    assert lines[0].startswith("error: ") and lines[0].endswith(f"({code})"), lines[0]
    return lines[0]


@pytest.fixture
def gw(stack: Stack) -> str:
    return f"http://127.0.0.1:{stack.ports.api}"


@pytest.fixture
def key(keys: dict[str, IssuedKey]) -> str:
    return keys["app-a"].key


@pytest.mark.e2e
@pytest.mark.usefixtures("clean")
def test_edit_follows_the_job_and_saves_its_outputs(
    gw: str, key: str, api: httpx.Client, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    r = run_cli(
        "edit",
        str(sample(1)),
        str(sample(2)),
        "--prompt",
        SEED_PROMPT,
        "--steps",
        "20",
        "--scale",
        "4",
        "--out",
        str(out),
        url=gw,
        key=key,
    )
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    paths = [Path(line) for line in r.stdout.splitlines()]
    assert len(paths) >= 1
    job_id = paths[0].name[:36]
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded"
    assert (job["steps"], job["scale"]) == (20, 4.0)
    assert [i["filename"] for i in job["inputs"]] == [sample(1).name, sample(2).name]
    assert len(paths) == len(job["outputs"])
    for path, output in zip(paths, job["outputs"], strict=True):
        assert path.parent == out
        assert path.name == f"{job_id}-{output['position']}-{output['filename']}"
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        assert hashlib.sha256(data).hexdigest() == output["sha256"]
    # The progress went to stderr, line by line off a terminal, with no color codes.
    for status in ("queued", "running", "succeeded"):
        assert status in r.stderr
    assert "\x1b[" not in r.stderr + r.stdout
    assert not list(out.glob("*.part"))


@pytest.mark.e2e
@pytest.mark.usefixtures("clean")
def test_jobs_list_show_and_wait(gw: str, key: str, tmp_path: Path) -> None:
    r = run_cli(
        "edit", str(sample(1)), str(sample(2)), "-p", SEED_PROMPT, "--no-wait", url=gw, key=key
    )
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    assert len(job_id) == 36

    waited = run_cli(
        "jobs", "wait", job_id, "--timeout", "60", "--out", str(tmp_path), url=gw, key=key
    )
    assert waited.returncode == 0, waited.stderr
    assert f"job {job_id} succeeded" in waited.stdout
    assert len(list(tmp_path.glob(f"{job_id}-*"))) >= 1

    shown = run_cli("jobs", "show", job_id, url=gw, key=key)
    assert shown.returncode == 0, shown.stderr
    for word in (job_id, "succeeded", "timeline", "finalizing", "outputs", "task_postprocess_end"):
        assert word in shown.stdout, word

    as_json = json.loads(run_cli("jobs", "show", job_id, "--json", url=gw, key=key).stdout)
    assert as_json["id"] == job_id and as_json["status"] == "succeeded"

    listed = run_cli("jobs", "list", url=gw, key=key)
    assert listed.returncode == 0, listed.stderr
    assert job_id in listed.stdout and "succeeded" in listed.stdout

    page = json.loads(run_cli("jobs", "list", "--json", "--limit", "5", url=gw, key=key).stdout)
    assert [j["id"] for j in page["data"]] == [job_id]

    none = run_cli("jobs", "list", "--status", "failed", url=gw, key=key)
    assert none.returncode == 0 and "no jobs" in none.stdout

    # A finished job cannot be canceled: the gateway's refusal, as one line.
    one_line_error(run_cli("jobs", "cancel", job_id, url=gw, key=key), "job_not_cancelable")


@pytest.mark.e2e
@pytest.mark.usefixtures("clean")
def test_jobs_cancel_and_wait_for_a_canceled_job(
    gw: str, key: str, api: httpx.Client, sim: httpx.Client
) -> None:
    sim.put("/_sim/config", json={"task_duration_s": 30}).raise_for_status()
    r = run_cli("edit", str(sample(1)), "-p", SEED_PROMPT, "--no-wait", url=gw, key=key)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    wait_status(api, job_id, {"running"})

    timed_out = run_cli("jobs", "wait", job_id, "--timeout", "1", url=gw, key=key)
    one_line_error(timed_out, "wait_timeout", after_progress=True)

    canceled = run_cli("jobs", "cancel", job_id, url=gw, key=key)
    assert canceled.returncode == 0, canceled.stderr
    assert job_id in canceled.stdout

    waited = run_cli("jobs", "wait", job_id, "--timeout", "60", url=gw, key=key)
    assert waited.returncode == 1, waited.stderr
    assert f"job {job_id} canceled" in waited.stdout
    assert "Traceback" not in waited.stderr


@pytest.mark.e2e
def test_a_bad_key_is_one_line_and_exit_2(gw: str) -> None:
    for args in (["jobs", "list"], ["edit", str(sample(1)), "-p", SEED_PROMPT]):
        line = one_line_error(run_cli(*args, url=gw, key="dg_not-a-real-key"), "invalid_api_key")
        assert "invalid_api_key" in line


@pytest.mark.e2e
def test_unknown_job_is_one_line(gw: str, key: str) -> None:
    one_line_error(
        run_cli("jobs", "show", "00000000-0000-4000-8000-000000000000", url=gw, key=key),
        "job_not_found",
    )
    one_line_error(run_cli("jobs", "show", "not-a-uuid", url=gw, key=key), "validation_error")


def test_an_unreachable_gateway_is_one_line(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for args in (["jobs", "list"], ["jobs", "wait", "x"], ["edit", str(sample(1)), "-p", "x"]):
        line = one_line_error(run_cli(*args, url=url, key="dg_x", cwd=tmp_path), "unreachable")
        assert url in line


def test_a_missing_image_file_is_one_line(tmp_path: Path) -> None:
    r = run_cli("edit", str(tmp_path / "nope.jpg"), "-p", "x", url="http://127.0.0.1:9", key="k")
    assert "nope.jpg" in one_line_error(r, "bad_image")
