"""The ``dreamgate`` client commands, run as real subprocesses against the running stack."""

from __future__ import annotations

import hashlib
import json
import os
import re
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
    *args: str,
    url: str,
    key: str,
    cwd: Path = ROOT,
    timeout: float = 120,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``python -m service.cli ARGS`` with DREAMGATE_URL / DREAMGATE_KEY, not on a TTY."""
    extra = env or {}
    env = {k: v for k, v in os.environ.items() if not k.startswith("DREAMGATE_")}
    env.update(DREAMGATE_URL=url, DREAMGATE_KEY=key, PYTHONPATH=str(ROOT), **extra)
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


def progress_offsets(stderr: str) -> list[tuple[str, float]]:
    """The progress lines of a followed job: (status, seconds since it was created)."""
    found = re.findall(r"^  (\w+)\s+\+(\d+\.\d+)s$", stderr, re.M)
    return [(status, float(at)) for status, at in found]


@pytest.mark.e2e
@pytest.mark.usefixtures("clean")
def test_example_follows_the_job_live_and_saves_a_summary(
    gw: str, key: str, tmp_path: Path
) -> None:
    r = run_cli("example", "--out", str(tmp_path / "res"), url=gw, key=key)
    assert r.returncode == 0, r.stderr
    # Every status as it happened, on one clock (the job's creation on the gateway's).
    shown = progress_offsets(r.stderr)
    assert [s for s, _ in shown] == ["queued", "submitting", "running", "finalizing", "succeeded"]
    assert [at for _, at in shown] == sorted(at for _, at in shown)
    # A short summary, not the job's JSON; the files it names exist.
    assert not r.stdout.lstrip().startswith("{")
    assert len(r.stdout.splitlines()) <= 8, r.stdout
    job_line = r.stdout.splitlines()[0]
    assert job_line.startswith("job ") and job_line.endswith("succeeded")
    written = [Path(line.split()[-1]) for line in r.stdout.splitlines() if "res/" in line]
    assert written and all(p.is_file() for p in written)
    assert "timings" in r.stdout and "total" in r.stdout

    as_json = run_cli("example", "--json", url=gw, key=key)
    assert as_json.returncode == 0, as_json.stderr
    body = json.loads(as_json.stdout)
    assert body["status"] == "succeeded" and body["files"] == []


@pytest.mark.e2e
@pytest.mark.usefixtures("clean")
def test_tables_fit_the_terminal_have_headers_and_are_not_padded_when_piped(
    gw: str, key: str, api: httpx.Client, stack: Stack
) -> None:
    long_prompt = "Replace the suit with the clothes of the second image, " * 10
    job = api.post(
        "/v1/jobs", files=[("images", sample(1).open("rb"))], data={"prompt": long_prompt}
    ).json()
    wait_status(api, job["id"])
    for columns in (80, 120):
        listed = run_cli("jobs", "list", url=gw, key=key, env={"COLUMNS": str(columns)})
        assert listed.returncode == 0, listed.stderr
        lines = listed.stdout.splitlines()
        assert all(len(line) <= columns for line in lines), (columns, listed.stdout)
        assert next(line for line in lines if job["id"] in line).endswith("…")
        assert any(line.split()[:2] == ["id", "status"] for line in lines)
    shown = run_cli("jobs", "show", job["id"], url=gw, key=key)
    assert shown.returncode == 0 and shown.stdout
    assert all(line == line.rstrip() for line in shown.stdout.splitlines())
    assert "MiB" in shown.stdout or "KiB" in shown.stdout  # sizes for people

    keys = run_cli("keys", "list", url=gw, key=key, env={"DATABASE_URL": stack.env["DATABASE_URL"]})
    assert keys.returncode == 0, keys.stderr
    header = next(line for line in keys.stdout.splitlines() if line.strip())
    assert header.split()[:4] == ["id", "prefix", "owner", "role"]
