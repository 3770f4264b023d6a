"""The API docs as a product: /docs and /redoc load no CDN asset, and Swagger UI renders
the operations in a real (headless) browser."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile

import httpx
import pytest

from service.stack import Stack
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = ROOT / ".ci" / "artifacts"
OPERATIONS = ("Submit an edit job", "Get a job", "List jobs", "Cancel a job")
CDN = re.compile(r"cdn\.|jsdelivr|unpkg|googleapis|cloudflare", re.IGNORECASE)


@pytest.fixture(scope="module")
def base(stack: Stack) -> str:
    return f"http://127.0.0.1:{stack.ports.api}"


def chromium(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """Headless Chromium with a fresh profile, no network of its own beyond the page."""
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory(prefix="dreamgate-chromium-") as profile:
        return subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                "--disable-quic",
                f"--user-data-dir={profile}",
                "--virtual-time-budget=10000",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_reference_only_local_assets(base: str, page: str) -> None:
    r = httpx.get(base + page, timeout=10)
    assert r.status_code == 200
    assert "text/html" in r.headers["content-type"]
    assert not CDN.search(r.text), CDN.search(r.text)
    assets = re.findall(r'(?:src|href)="([^"]+)"', r.text)
    assert assets, r.text
    for asset in assets:
        assert asset.startswith("/"), f"{page} loads {asset} from elsewhere"
        got = httpx.get(base + asset, timeout=10)
        assert got.status_code == 200, asset
        assert len(got.content) > 0


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (.ci/run installs it with apt)")
def test_swagger_ui_renders_the_operations_in_chromium(base: str) -> None:
    dom = chromium("--dump-dom", f"{base}/docs")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    for summary in OPERATIONS:
        assert summary in html, f"{summary!r} not rendered; DOM starts {html[:500]!r}"
    assert "opblock" in html  # Swagger UI's own operation blocks, not just the raw spec
    assert "/v1/jobs/{job_id}/cancel" in html

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "docs.png"
    shot.unlink(missing_ok=True)
    taken = chromium(f"--screenshot={shot}", "--window-size=1280,2000", f"{base}/docs")
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert shot.exists() and shot.read_bytes().startswith(b"\x89PNG")
