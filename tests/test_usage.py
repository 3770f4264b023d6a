"""Usage and cost per key (GET /v1/usage, `dreamgate usage`), and monthly budgets (402)."""

from __future__ import annotations

import csv
import io
import uuid
from decimal import Decimal
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, text

from service.stack import Stack
from tests.conftest import client_for, sample, upload_files, wait_for, wait_status
from tests.test_cli import run_cli
from tests.test_webhooks import Receiver

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean")]

PROMPT = "Replace the suit in the first image with the clothes in the second image."
SIM_COST = Decimal("0.0035")  # the simulator's totalcost of a successful task


@pytest.fixture
def receiver() -> Any:
    r = Receiver()
    yield r
    r.close()


def new_key(admin_api: httpx.Client, owner: str, **limits: Any) -> dict[str, Any]:
    r = admin_api.post("/v1/admin/keys", json={"owner": owner, **limits})
    assert r.status_code == 201, r.text
    created: dict[str, Any] = r.json()
    return created


def submit(app: httpx.Client, **fields: Any) -> httpx.Response:
    return app.post("/v1/jobs", files=upload_files(sample(1)), data={"prompt": PROMPT, **fields})


def run_job(app: httpx.Client, **fields: Any) -> dict[str, Any]:
    r = submit(app, **fields)
    assert r.status_code == 202, r.text
    return wait_status(app, r.json()["id"])


def test_usage_by_key_and_by_day_shows_jobs_seconds_cost_and_bytes(
    stack: Stack, admin_api: httpx.Client, sim: httpx.Client
) -> None:
    owner, other = f"usage-{uuid.uuid4().hex[:6]}", f"other-{uuid.uuid4().hex[:6]}"
    k1, k2, k3 = (new_key(admin_api, o) for o in (owner, owner, other))
    with (
        client_for(stack, k1["key"]) as a1,
        client_for(stack, k2["key"]) as a2,
        client_for(stack, k3["key"]) as b,
    ):
        done = [run_job(a1), run_job(a1)]
        sim.put("/_sim/config", json={"fail_mode": "pexit"}).raise_for_status()
        failed = run_job(a2)
        sim.put("/_sim/config", json={"fail_mode": "none"}).raise_for_status()
        run_job(b)
        assert [j["status"] for j in done] == ["succeeded", "succeeded"]
        assert failed["status"] == "failed"

        by_key = a1.get("/v1/usage", params={"group_by": "key"})
        assert by_key.status_code == 200, by_key.text
        rows = {r["key_id"]: r for r in by_key.json()["data"]}
        # A client sees its own owner's keys, and no one else's.
        assert set(rows) == {k1["id"], k2["id"]}
        first, second = rows[k1["id"]], rows[k2["id"]]
        assert (first["owner"], first["key_prefix"]) == (owner, k1["prefix"])
        assert first["jobs"]["succeeded"] == 2 and first["jobs_total"] == 2
        assert Decimal(first["cost_usd"]) == 2 * SIM_COST
        assert first["output_bytes"] == sum(o["size"] for j in done for o in j["outputs"])
        assert first["wiro_seconds"] == pytest.approx(
            sum(j["metrics"]["wiro_s"] for j in done), abs=0.01
        )
        assert second["jobs"]["failed"] == 1 and Decimal(second["cost_usd"]) == 0
        assert second["output_bytes"] == 0

        [today] = a1.get("/v1/usage").json()["data"]  # group_by=day is the default
        assert today["day"] == done[0]["created_at"][:10]
        assert today["jobs_total"] == 3
        assert Decimal(today["cost_usd"]) == 2 * SIM_COST

        # An admin sees every owner's, or one owner's.
        everyone = admin_api.get("/v1/usage", params={"group_by": "key"}).json()
        assert {k1["id"], k2["id"], k3["id"]} <= {r["key_id"] for r in everyone["data"]}
        only = admin_api.get("/v1/usage", params={"group_by": "key", "owner": other}).json()
        assert [r["key_id"] for r in only["data"]] == [k3["id"]]
        assert a1.get("/v1/usage", params={"owner": other}).status_code == 403

        # A period without jobs has no rows and a zero total.
        empty = a1.get("/v1/usage", params={"from": "2020-01-01", "to": "2020-02-01"}).json()
        assert empty["data"] == [] and empty["total"]["jobs_total"] == 0
        bad = a1.get("/v1/usage", params={"from": "2020-02-01", "to": "2020-01-01"})
        assert (bad.status_code, bad.json()["code"]) == (422, "invalid_period")


def test_usage_as_csv_and_as_the_cli_table(stack: Stack, admin_api: httpx.Client) -> None:
    key = new_key(admin_api, f"csv-{uuid.uuid4().hex[:6]}")
    with client_for(stack, key["key"]) as app:
        job = run_job(app)
        r = app.get("/v1/usage", params={"group_by": "key"}, headers={"Accept": "text/csv"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert [row["key_id"] for row in rows] == [key["id"], ""]
    assert rows[-1]["day"] == "total"
    assert rows[0]["succeeded"] == "1" and Decimal(rows[0]["cost_usd"]) == SIM_COST
    assert int(rows[0]["output_bytes"]) == job["outputs"][0]["size"]

    gw = f"http://127.0.0.1:{stack.ports.api}"
    shown = run_cli("usage", "--by", "key", url=gw, key=key["key"])
    assert shown.returncode == 0, shown.stderr
    line = next(row for row in shown.stdout.splitlines() if key["prefix"] in row)
    assert "0.0035" in line.split()


def input_folders(s3: Any, stack: Stack) -> set[str]:
    listed = s3.list_objects_v2(Bucket=stack.env["S3_BUCKET"], Prefix="inputs/")
    return {o["Key"].split("/")[1] for o in listed.get("Contents", [])}


def key_jobs(engine: Engine, key_id: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM jobs WHERE api_key_id = :k"), {"k": key_id}
            ).scalar_one()
        )


def test_a_key_over_its_monthly_budget_gets_402_and_nothing_is_stored(
    stack: Stack, admin_api: httpx.Client, engine: Engine, s3: Any, receiver: Receiver
) -> None:
    # 0.005: the first job (no history: estimate 0) and the second (0.0035 spent) pass;
    # the second brings spent plus in flight to 0.007, past 80 % and past the budget.
    key = new_key(admin_api, f"budget-{uuid.uuid4().hex[:6]}", budget_usd="0.005")
    assert Decimal(key["budget_usd"]) == Decimal("0.005")
    with client_for(stack, key["key"]) as app:
        assert run_job(app)["status"] == "succeeded"
        second = submit(app, webhook_url=receiver.url())
        assert second.status_code == 202, second.text

        before = input_folders(s3, stack)
        refused = submit(app)
        assert refused.status_code == 402
        assert refused.headers["content-type"] == "application/problem+json"
        problem = refused.json()
        assert problem["code"] == "budget_exceeded"
        assert Decimal(problem["budget_usd"]) == Decimal("0.005")
        assert Decimal(problem["spent_usd"]) + Decimal(problem["in_flight_usd"]) >= Decimal("0.007")
        assert "budget" in problem["detail"]
        # Nothing stored: no job row, no uploaded input.
        assert key_jobs(engine, key["id"]) == 2
        assert input_folders(s3, stack) == before

        # Raising the budget lets it submit again; the month's warning is not sent twice.
        admin_api.patch(f"/v1/admin/keys/{key['id']}", json={"budget_usd": "1"})
        assert submit(app).status_code == 202
        wait_status(app, second.json()["id"])

    def warning() -> list[dict[str, Any]]:
        hooks = [r.verify(key["webhook_secret"]) for r in receiver.received()]
        return [h for h in hooks if h["type"] == "key.budget_warning"]

    [event] = wait_for(warning, what="the budget warning")
    data = event["data"]
    assert (data["key_id"], data["job_id"]) == (key["id"], second.json()["id"])
    assert Decimal(data["budget_usd"]) == Decimal("0.005")
    assert data["share"] >= 0.8
    with engine.connect() as conn:
        warned = conn.execute(
            text(
                "SELECT count(*) FROM job_events WHERE kind = 'budget_warning' AND job_id IN "
                "(SELECT id FROM jobs WHERE api_key_id = :k)"
            ),
            {"k": key["id"]},
        ).scalar_one()
    assert warned == 1


def test_budgets_are_set_from_the_cli_and_cleared_with_none(stack: Stack) -> None:
    import subprocess
    import sys

    def cli(*args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "service.cli", "keys", *args],
            env=stack.env,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout

    made = cli("create", "--owner", f"cli-budget-{uuid.uuid4().hex[:6]}", "--budget-usd", "12.5")
    key_id = made.split()[1]
    assert "budget=$12.5" in cli("update", key_id, "--budget-usd", "12.5")
    assert "budget=-" in cli("update", key_id, "--budget-usd", "none")
