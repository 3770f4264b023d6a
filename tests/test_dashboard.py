"""The /ops dashboard in headless Chromium: after a mixed run, the figures it shows are the
admin API's, and a screenshot is kept as a CI artifact (.ci/artifacts/ops.png)."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Any

import httpx
import pytest

from service.auth import IssuedKey
from service.stack import Stack
from tests.conftest import sample, upload_files, wait_for, wait_status
from tests.test_docs_ui import ARTIFACTS, CDN, CHROMIUM, chromium

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean")]

PROMPT = "Replace the suit in the first image with the clothes in the second image."
STATUSES = ("queued", "submitting", "running", "finalizing", "succeeded", "failed", "canceled")


class Dom(HTMLParser):
    """Text by element id, and the rows of each table body, from Chromium's dumped DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.text: dict[str, str] = {}
        self.rows: dict[str, list[list[str]]] = {}
        self.body_state = ""
        self._open: list[tuple[str, str | None]] = []
        self._table: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "body":
            self.body_state = a.get("data-state") or ""
        if tag == "table":
            self._table = a.get("id")
            self.rows.setdefault(self._table or "", [])
        if tag == "tr" and self._table and self._open and self._open[-1][0] == "tbody":
            self.rows[self._table].append([])
        if tag == "td" and self._table and self.rows.get(self._table):
            self.rows[self._table][-1].append("")
        self._open.append((tag, a.get("id")))

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            done, _ = self._open.pop()
            if done == tag:
                break
        if tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        for _, ident in self._open:
            if ident:
                self.text[ident] = self.text.get(ident, "") + data
        in_cell = any(tag == "td" for tag, _ in self._open)  # a job id's link included
        if self._table and in_cell and self.rows[self._table]:
            self.rows[self._table][-1][-1] += data


def submit(api: httpx.Client) -> str:
    r = api.post("/v1/jobs", files=upload_files(sample(1), sample(2)), data={"prompt": PROMPT})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def test_ops_page_is_one_self_contained_file(anon: httpx.Client) -> None:
    r = anon.get("/ops")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert not CDN.search(r.text)
    assert not re.search(r'(?:src|href)="(?!#)', r.text), "the page loads nothing else"
    assert "/v1/admin/stats" in r.text and "/v1/admin/jobs" in r.text


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (.ci/run installs it with apt)")
def test_dashboard_shows_the_apis_figures_in_chromium(
    api: httpx.Client,
    admin_api: httpx.Client,
    sim: httpx.Client,
    keys: dict[str, IssuedKey],
    stack: Stack,
) -> None:
    # A small mixed run: two succeeded, one failed, one canceled, one left running (stuck).
    for job_id in [submit(api), submit(api)]:
        assert wait_status(api, job_id)["status"] == "succeeded"
    sim.put("/_sim/config", json={"fail_mode": "pexit"}).raise_for_status()
    failed = submit(api)
    assert wait_status(api, failed)["status"] == "failed"
    sim.put("/_sim/config", json={"fail_mode": "none", "task_duration_s": 60}).raise_for_status()
    canceled = submit(api)
    wait_status(api, canceled, {"running"})
    api.post(f"/v1/jobs/{canceled}/cancel")
    assert wait_status(api, canceled)["status"] == "canceled"
    stuck = submit(api)
    wait_status(api, stuck, {"running"})
    wait_for(
        lambda: admin_api.get("/v1/admin/stats").json()["stuck"]["count"] == 1,
        timeout=20,
        what="the running job to count as stuck",
    )
    stats: dict[str, Any] = admin_api.get("/v1/admin/stats").json()

    url = f"http://127.0.0.1:{stack.ports.api}/ops#key={keys['ops'].key}"
    dumped = chromium("--dump-dom", url)
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    dom = Dom()
    dom.feed(dumped.stdout)

    assert dom.body_state == "ready", dom.text.get("error") or dumped.stdout[:1000]
    shown = {s: int(dom.text[f"count-{s}"]) for s in STATUSES}
    assert shown == stats["jobs_by_status"]
    assert shown["succeeded"] == 2 and shown["failed"] == 1 and shown["canceled"] == 1
    assert shown["running"] == 1
    assert dom.text["stuck-count"] == "1"
    assert [r[0] for r in dom.rows["stuck"]] == [stuck]
    [failure] = dom.rows["failures"]
    assert failure[0] == failed and failure[1] == "wiro_task_failed"
    assert "CUDA out of memory" in failure[2]
    assert dom.text["fig-finished"] == str(stats["throughput"]["finished_total"]) == "4"
    assert dom.text["fig-created"] == "5"
    assert {r[0] for r in dom.rows["jobs"]} == {
        j["id"] for j in admin_api.get("/v1/admin/jobs", params={"limit": 20}).json()["data"]
    }
    assert "rect" in dumped.stdout and 'data-kind="succeeded"' in dumped.stdout  # the chart
    assert keys["ops"].key not in dumped.stdout  # the fragment is cleared once read

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "ops.png"
    shot.unlink(missing_ok=True)
    taken = chromium(f"--screenshot={shot}", "--window-size=1280,1400", url)
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert shot.exists() and shot.read_bytes().startswith(b"\x89PNG")

    api.post(f"/v1/jobs/{stuck}/cancel")
    wait_status(api, stuck)


def test_dashboard_with_a_client_key_asks_for_an_admin_key(
    keys: dict[str, IssuedKey], stack: Stack
) -> None:
    if CHROMIUM is None:
        pytest.skip("no chromium")
    url = f"http://127.0.0.1:{stack.ports.api}/ops#key={keys['app-a'].key}"
    dumped = chromium("--dump-dom", url)
    dom = Dom()
    dom.feed(dumped.stdout)
    assert dom.body_state == "error"
    assert "admin key" in dom.text.get("error", "")
