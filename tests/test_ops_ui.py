"""/ops as an operator uses it, in headless Chromium (selenium, Debian's chromium-driver):
open a job from the jobs table, see its thumbnails, press Retry and see the new attempt;
cancel a running job and replay its webhook from the job view.

Screenshots go to the test's tmp dir and .ci/artifacts/ (CI keeps them); with
DREAMGATE_SCREENSHOTS=docs they are also copied to docs/screenshots/ (committed).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.auth import IssuedKey
from service.stack import Stack
from tests.conftest import ROOT, sample, wait_status

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean")]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = ROOT / ".ci" / "artifacts"
DOCS = ROOT / "docs" / "screenshots"

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # pragma: no cover - the dev extra installs it
    webdriver = None

if webdriver is None or not (CHROMIUM and CHROMEDRIVER):
    pytest.skip(
        "needs selenium (the dev extra) and Debian's chromium and chromium-driver: "
        "`make chromium` installs them (apt-get, as root)",
        allow_module_level=True,
    )


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1800",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def shot(driver: Any, tmp_path: Path, name: str) -> Path:
    """Save a screenshot as a test artifact (and in docs/ when asked)."""
    path = tmp_path / f"{name}.png"
    driver.save_screenshot(str(path))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, ARTIFACTS / path.name)
    if os.environ.get("DREAMGATE_SCREENSHOTS") == "docs":
        DOCS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, DOCS / path.name)
    return path


def submit(api: httpx.Client) -> str:
    files = [("images", sample(1).open("rb")), ("images", sample(2).open("rb"))]
    job = api.post("/v1/jobs", files=files, data={"prompt": "make it blue"})
    assert job.status_code == 202, job.text
    return str(job.json()["id"])


def wait_js(driver: Any, script: str, timeout: float = 30) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(
        lambda d: d.execute_script(script)
    )


def test_an_operator_opens_a_job_sees_thumbnails_and_retries_it(
    browser: Any,
    stack: Stack,
    api: httpx.Client,
    sim: httpx.Client,
    keys: dict[str, IssuedKey],
    tmp_path: Path,
) -> None:
    done = submit(api)
    assert wait_status(api, done)["status"] == "succeeded"
    sim.put("/_sim/config", json={"fail_mode": "pexit"}).raise_for_status()
    failed = submit(api)
    assert wait_status(api, failed)["status"] == "failed"
    sim.put("/_sim/config", json={"fail_mode": "none"}).raise_for_status()

    base = f"http://127.0.0.1:{stack.ports.api}"
    browser.get(f"{base}/ops#key={keys['ops'].key}")
    wait_js(browser, "return document.body.dataset.state === 'ready'")
    # The console's figures: every owner, queues, the workers that answer a ping.
    wait_js(browser, "return Number(document.body.dataset.workers || 0) >= 1")
    owners = browser.find_element(By.ID, "owners").text
    assert "app-a" in owners and "$" in owners
    assert "callbacks" in browser.find_element(By.ID, "queues").text
    assert "yes" in browser.find_element(By.ID, "workers").text
    shot(browser, tmp_path, "ops-overview")

    # Open the succeeded job from the jobs table: inputs and output as thumbnails.
    browser.find_element(By.CSS_SELECTOR, f'#jobs a[href="#job={done}"]').click()
    wait_js(browser, f"return document.body.dataset.job === '{done}'")
    loaded = "return document.querySelectorAll('#jv-thumbs img[data-loaded]').length"
    wait_js(browser, f"{loaded} >= 3")
    kinds = browser.execute_script(
        "return [...document.querySelectorAll('#jv-thumbs img[data-loaded]')]"
        ".map(i => i.dataset.kind + ':' + i.naturalWidth)"
    )
    assert sorted(k.split(":")[0] for k in kinds) == ["inputs", "inputs", "outputs"]
    assert all(0 < int(k.split(":")[1]) <= 256 for k in kinds)  # thumbnails, not originals
    view = browser.find_element(By.ID, "job-view").text
    assert "task_postprocess_end" in view and "$" in view  # Wiro's status and cost
    browser.execute_script("document.getElementById('job-view').scrollIntoView()")
    shot(browser, tmp_path, "ops-job")

    # The failed job, from the failures table: Wiro's message; Retry starts attempt 2.
    browser.find_element(By.CSS_SELECTOR, f'#failures a[href="#job={failed}"]').click()
    wait_js(browser, f"return document.body.dataset.job === '{failed}'")
    wait_js(browser, "return document.getElementById('job-view').dataset.status === 'failed'")
    assert "wiro_task_failed" in browser.find_element(By.ID, "jv-facts").text
    browser.find_element(By.ID, "jv-retry").click()
    wait_js(browser, "return document.getElementById('jv-notice').textContent.includes('retried')")
    wait_js(
        browser,
        "return document.getElementById('job-view').dataset.status === 'succeeded'",
        timeout=60,
    )
    assert "retried 1" in browser.find_element(By.ID, "jv-attempt").text
    assert wait_status(api, failed)["status"] == "succeeded"
    wait_js(browser, "return document.querySelectorAll('#jv-thumbs img[data-loaded]').length >= 3")
    shot(browser, tmp_path, "ops-retried")

    # Filters: by status, the failed-then-retried job is no longer among the failed.
    browser.find_element(By.ID, "jv-close").click()
    browser.execute_script("document.getElementById('f-status').value = 'failed'")
    browser.find_element(By.CSS_SELECTOR, "#filters button").click()
    wait_js(browser, "return document.querySelector('#jobs td.empty') !== null")


def test_an_operator_cancels_a_running_job_and_replays_its_webhook(
    browser: Any,
    stack: Stack,
    api: httpx.Client,
    sim: httpx.Client,
    keys: dict[str, IssuedKey],
) -> None:
    from service.embedded import free_port

    sim.put("/_sim/config", json={"task_duration_s": 60}).raise_for_status()
    nobody = f"http://127.0.0.1:{free_port()}/hook"  # refuses: every delivery fails
    files = [("images", sample(1).open("rb"))]
    job = api.post("/v1/jobs", files=files, data={"prompt": "x", "webhook_url": nobody}).json()
    wait_status(api, job["id"], {"running"})

    browser.get(f"http://127.0.0.1:{stack.ports.api}/ops#key={keys['ops'].key}")
    wait_js(browser, "return document.body.dataset.state === 'ready'")
    browser.execute_script(f"location.hash = '#job={job['id']}'")
    wait_js(browser, "return document.getElementById('job-view').dataset.status === 'running'")
    browser.find_element(By.ID, "jv-cancel").click()
    wait_js(
        browser,
        "return document.getElementById('job-view').dataset.status === 'canceled'",
        timeout=60,
    )
    assert wait_status(api, job["id"])["status"] == "canceled"

    # The job.running / job.canceled messages failed; Replay makes one more attempt now.
    replay = "#jv-deliveries button"
    wait_js(browser, f"return document.querySelector('{replay}') !== null", timeout=30)
    browser.find_element(By.CSS_SELECTOR, replay).click()
    wait_js(
        browser, "return document.getElementById('jv-notice').textContent.includes('failed again')"
    )
