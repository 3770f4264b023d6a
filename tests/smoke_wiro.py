"""``make smoke-wiro``: the seed's edit against the real Wiro, for whoever holds credentials.

It costs real money (README, "Smoke test against the real Wiro"): at most four tasks of
DreamOmni2, each about $0.0035 by the seed page's ``totalcost``. Never run in CI (a test
runs it against the simulator, to prove it still runs).

1. Through the gateway (a stack of its own on embedded servers, or ``--gateway``): the
   seed's edit with a short ``Cancel-After``, which must succeed with its output copied to
   S3; then a second job, canceled once Wiro runs it, which must end ``canceled``.
2. With the Wiro client alone, every answer recorded: Run, Task/Detail until the end, Kill
   on a running task, Cancel refused on a finished one, Task/Detail of a task that does not
   exist, and a request with a wrong key.
3. Every recorded body is checked against the shapes in ``tests/fixtures/wiro/`` and saved
   there as ``real-<date>-<n>-<endpoint>.json`` (listed in its index.json), so that the
   contract tests pin what Wiro really said from then on.

Exit code 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from service.stack import Ports, Stack
from service.wiro import (
    PREPROCESSING_STATUSES,
    QUEUED_STATUSES,
    Outcome,
    RunInput,
    WiroClient,
    WiroError,
    WiroRejected,
    WiroTask,
    stop_calls,
)
from tests.wiro_shapes import FIXTURES, differences, fixture, index

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = [ROOT / "samples" / "dreamomni2-input-1.jpg", ROOT / "samples" / "dreamomni2-input-2.jpg"]
SEED_PROMPT = "Replace the suit in the first image with the clothes in the second image."
TERMINAL = {"succeeded", "failed", "canceled"}
# Which documented body each kind of answer is compared with.
DOCUMENTED = {
    "Run": "seed-run.json",
    "Task/Detail": "seed-task-detail.json",
    "Task/Kill": "seed-task-kill.json",
    "Task/Cancel": "seed-task-cancel.json",
    "error": "docs-error-no-task-yet.json",
}


@dataclass
class Recorder(httpx.BaseTransport):
    """An httpx transport that keeps every answer's endpoint, status and JSON body."""

    inner: httpx.BaseTransport = field(default_factory=httpx.HTTPTransport)
    answers: list[dict[str, Any]] = field(default_factory=list)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        response.read()
        endpoint = request.url.path.split("/v1/", 1)[-1]
        endpoint = "Run" if endpoint.startswith("Run/") else endpoint
        try:
            body = json.loads(response.content)
        except ValueError:
            body = {"unparsed": response.text[:500]}
        self.answers.append(
            {"endpoint": endpoint, "http_status": response.status_code, "body": body}
        )
        return response


@dataclass
class Report:
    """The smoke run's checks, in order; any failed one makes the exit code 1."""

    rows: list[tuple[str, bool, str]] = field(default_factory=list)

    def check(self, what: str, ok: bool, detail: str = "") -> bool:
        self.rows.append((what, ok, detail))
        print(f"{'ok  ' if ok else 'FAIL'} {what}{': ' + detail if detail else ''}", flush=True)
        return ok

    @property
    def passed(self) -> bool:
        return all(ok for _, ok, _ in self.rows)


def poll(
    client: WiroClient, taskid: str, until: Callable[[WiroTask], bool], timeout: float
) -> WiroTask:
    """Task/Detail every 3 s (Wiro's docs: start at 3 s) until ``until`` or the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            task = client.task_detail(taskid=taskid)
            if until(task) or time.monotonic() > deadline:
                return task
        except WiroRejected:
            if time.monotonic() > deadline:
                raise
        time.sleep(3)


def stop(client: WiroClient, task: WiroTask) -> None:
    """Cancel or Kill as Wiro's status allows (the calls the gateway would make)."""
    for call in stop_calls(task.status):
        try:
            (client.cancel if call == "cancel" else client.kill)(taskid=task.id)
            return
        except WiroError:
            continue


def run_seed(client: WiroClient) -> str:
    """The seed's edit with the bundled samples as file parts; its taskid."""
    files = [path.open("rb") for path in SAMPLES]
    try:
        inputs = [
            RunInput(file=f, filename=path.name, content_type="image/jpeg")
            for f, path in zip(files, SAMPLES, strict=True)
        ]
        return client.run(
            inputs=inputs, prompt=SEED_PROMPT, steps=25, scale=3.5, callback_url=None
        ).taskid
    finally:
        for f in files:
            f.close()


def direct(client: WiroClient, bad: WiroClient, report: Report, timeout: float) -> None:
    """Every kind of answer, with the client alone."""
    taskid = run_seed(client)
    report.check("Run accepted the seed's edit", bool(taskid), f"taskid {taskid}")
    done = poll(client, taskid, lambda t: t.outcome is not Outcome.running, timeout)
    if done.outcome is Outcome.running:
        stop(client, done)
    report.check(
        "the edit ended as task_postprocess_end with pexit 0 and an output",
        done.outcome is Outcome.succeeded,
        f"{done.status}, pexit {done.pexit}, {len(done.outputs)} output(s), cost {done.totalcost}",
    )
    try:
        client.cancel(taskid=taskid)
        report.check("Cancel of a finished task is refused", False, "it was accepted")
    except WiroRejected as exc:
        report.check("Cancel of a finished task is refused (code 1)", exc.code == 1, exc.message)

    second = run_seed(client)
    assigned = poll(
        client,
        second,
        lambda t: (
            t.outcome is not Outcome.running
            or (t.status not in QUEUED_STATUSES and t.status not in PREPROCESSING_STATUSES)
        ),
        timeout,
    )
    try:
        client.kill(taskid=second)
        killed = poll(client, second, lambda t: t.outcome is not Outcome.running, 120)
        report.check(
            "Kill after task_assign stops the task (task_cancel)",
            killed.outcome is Outcome.canceled or assigned.outcome is not Outcome.running,
            f"seen {assigned.status} before the Kill, then {killed.status}",
        )
    except WiroRejected as exc:
        report.check(
            "Kill after task_assign is accepted", False, f"{assigned.status}: {exc.message}"
        )
        stop(client, assigned)

    try:
        client.task_detail(taskid="0")
        report.check("Task/Detail of no task is refused", False, "it answered a task")
    except WiroRejected as exc:
        report.check("Task/Detail of no task answers code 1", exc.code == 1, exc.message)
    try:
        bad.task_detail(taskid=taskid)
        report.check("a wrong key is refused", False, "it was accepted")
    except WiroError as exc:
        report.check(
            "a wrong key is refused with HTTP 401 and code 0",
            exc.http_status == 401 and exc.code == 0,
            f"HTTP {exc.http_status}, code {exc.code}: {exc.message}",
        )


def through_gateway(base: str, key: str, report: Report, cancel_after: str, timeout: float) -> None:
    """The seed's edit with Cancel-After through the gateway, then a canceled job."""
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=90) as api:

        def submit(**headers: str) -> str:
            files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in SAMPLES]
            r = api.post(
                "/v1/jobs",
                files=files,
                data={"prompt": SEED_PROMPT, "steps": "25", "scale": "3.5"},
                headers=headers,
            )
            r.raise_for_status()
            return str(r.json()["id"])

        def wait(job_id: str, done: Callable[[dict[str, Any]], bool], hold: bool) -> dict[str, Any]:
            # Prefer: wait holds the answer until the job ends: only when that is the wait.
            headers = {"Prefer": "wait=20"} if hold else {}
            deadline = time.monotonic() + timeout
            while True:
                job: dict[str, Any] = api.get(f"/v1/jobs/{job_id}", headers=headers).json()
                if done(job) or time.monotonic() > deadline:
                    return job
                time.sleep(1)

        edit = wait(
            submit(**{"Cancel-After": cancel_after}), lambda j: j["status"] in TERMINAL, True
        )
        report.check(
            f"the gateway's edit (Cancel-After {cancel_after}) succeeded with its output in S3",
            edit["status"] == "succeeded" and bool(edit["outputs"]),
            f"{edit['status']} {edit.get('error') or ''} cost {edit['wiro']['cost']}",
        )
        job_id = submit()
        wait(
            job_id,
            lambda j: (
                j["status"] in TERMINAL
                or (j["wiro"]["status"] or "task_queue")
                not in {"task_queue", *PREPROCESSING_STATUSES}
            ),
            False,
        )
        api.post(f"/v1/jobs/{job_id}/cancel")
        canceled = wait(
            job_id, lambda j: j["status"] in TERMINAL and not j["wiro"]["stopping"], True
        )
        report.check(
            "a job canceled while Wiro runs it ends canceled (or says Wiro finished first)",
            canceled["status"] == "canceled" or canceled["cancel_outcome"] == "finished_first",
            f"{canceled['status']}, cancel {canceled['cancel_outcome']}, "
            f"Wiro {canceled['wiro']['status']}",
        )


def save(answers: list[dict[str, Any]], out: Path, source: str, report: Report) -> None:
    """Check each answer against its documented body and keep it as a dated fixture."""
    today = datetime.now(UTC).date().isoformat()
    listing = index() if out == FIXTURES else {}
    kept: dict[tuple[str, int, str], dict[str, Any]] = {}
    for answer in answers:  # one of each: endpoint, HTTP status, task status or error code
        body = answer["body"]
        first = (body.get("tasklist") or [{}])[0] if isinstance(body, dict) else {}
        errors = (body.get("errors") or [{}]) if isinstance(body, dict) else [{}]
        what = str(first.get("status") if isinstance(first, dict) and first else errors[0])
        kept.setdefault((answer["endpoint"], answer["http_status"], what), answer)
    for n, answer in enumerate(kept.values()):
        body = answer["body"]
        ok = isinstance(body, dict) and body.get("result") is True
        kind = answer["endpoint"] if ok else "error"
        documented = fixture(DOCUMENTED.get(kind, "docs-error-no-task-yet.json"))
        if kind == "error":
            documented = {"result": False, "errors": documented["errors"]}
        found = differences(body, documented)
        report.check(
            f"{answer['endpoint']} answer {n} has the documented shape",
            not found,
            "; ".join(found[:3]),
        )
        name = f"real-{today}-{n:02d}-{answer['endpoint'].replace('/', '-').lower()}.json"
        (out / name).write_text(json.dumps(body, indent=2, ensure_ascii=False) + "\n")
        listing[name] = {
            "endpoint": answer["endpoint"],
            "http_status": answer["http_status"],
            "source": source,
            "verbatim": True,
        }
    (out / "index.json").write_text(json.dumps(listing, indent=2) + "\n")


@contextmanager
def own_gateway(env: dict[str, str]) -> Iterator[tuple[str, str]]:
    """A stack of its own (embedded servers) against the Wiro that ``env`` names."""
    from service.embedded import free_port

    with tempfile.TemporaryDirectory(prefix="smoke-wiro-") as folder:
        ports = Ports(
            api=free_port(),
            sim=free_port(),
            postgres=free_port(),
            redis=free_port(),
            s3=free_port(),
        )
        stack_env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("DATABASE_URL", "REDIS_URL", "S3_"))
        }
        stack_env.update(env, CALLBACK_GRACE_S="5", SWEEP_INTERVAL_S="2")
        stack = Stack(Path(folder), ports=ports, env=stack_env)
        try:
            stack.start()
            yield f"http://127.0.0.1:{ports.api}", stack.ensure_dev_key()
        finally:
            stack.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--base-url", default=os.environ.get("WIRO_BASE_URL", "https://api.wiro.ai/v1")
    )
    parser.add_argument(
        "--gateway", help="a running gateway's URL (default: start a stack of its own)"
    )
    parser.add_argument("--gateway-key", default=os.environ.get("DREAMGATE_KEY", ""))
    parser.add_argument("--out", type=Path, default=FIXTURES, help="where to save the bodies")
    parser.add_argument("--cancel-after", default="10m")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for a task")
    parser.add_argument("--yes", action="store_true", help="do not ask before spending money")
    args = parser.parse_args(argv)
    key, secret = os.environ.get("WIRO_API_KEY", ""), os.environ.get("WIRO_API_SECRET", "")
    if not key:
        print("error: set WIRO_API_KEY (and WIRO_API_SECRET for a signed project)", file=sys.stderr)
        return 2
    if (
        not args.yes
        and input(
            f"This runs up to 4 tasks at {args.base_url} (about $0.015). Go on? [y/N] "
        ).lower()
        != "y"
    ):
        return 2
    report = Report()
    env = {"WIRO_BASE_URL": args.base_url, "WIRO_API_KEY": key, "WIRO_API_SECRET": secret}
    if args.gateway:
        through_gateway(args.gateway, args.gateway_key, report, args.cancel_after, args.timeout)
    else:
        with own_gateway(env) as (url, dev_key):
            through_gateway(url, dev_key, report, args.cancel_after, args.timeout)
    recorder = Recorder()
    client = WiroClient(
        base_url=args.base_url,
        api_key=key,
        api_secret=secret or None,
        model="xiabs/dreamomni2",
        transport=recorder,
        attempts=1,
    )
    bad = WiroClient(
        base_url=args.base_url,
        api_key="not-our-key",
        api_secret=None,
        model="xiabs/dreamomni2",
        transport=recorder,
        attempts=1,
    )
    direct(client, bad, report, args.timeout)
    args.out.mkdir(parents=True, exist_ok=True)
    save(recorder.answers, args.out, f"make smoke-wiro against {args.base_url}", report)
    failed = [what for what, ok, _ in report.rows if not ok]
    print(
        f"\n{len(report.rows) - len(failed)} of {len(report.rows)} checks passed; "
        f"bodies saved in {args.out}"
    )
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
