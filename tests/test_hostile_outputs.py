"""Wiro's output URLs are hostile input: the copy into S3 is guarded (service/fetch.py).

Every redirect target below is harmless if the guard failed: 127.0.0.2 and [::1] are not
on WIRO_OUTPUT_HOSTS (only the simulator's 127.0.0.1:port is), and nothing listens there
for us. The guard's refusal is told apart from a failed connection by its message.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from service.stack import Stack
from tests.conftest import configure, sample, upload_files, wait_status

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean")]

REFUSED_ADDRESS = "the URL's host is not one images may come from"


def submit(api: httpx.Client) -> str:
    r = api.post("/v1/jobs", files=upload_files(sample(1)), data={"prompt": "swap the suit"})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def failed_copy(api: httpx.Client, job_id: str) -> dict[str, Any]:
    done = wait_status(api, job_id, timeout=90)
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "output_copy_failed"
    assert done["outputs"] == []
    return done


@pytest.mark.parametrize(
    "target",
    ["http://127.0.0.2:{sim}/_sim/config", "http://[::1]:{sim}/_sim/config"],
    ids=["127.0.0.2", "ipv6-loopback"],
)
def test_output_redirect_to_internal_address_fails_the_job(
    api: httpx.Client, sim: httpx.Client, stack: Stack, target: str
) -> None:
    configure(sim, output_redirect_url=target.format(sim=stack.ports.sim))
    job_id = submit(api)

    done = failed_copy(api, job_id)

    message = done["error"]["message"]
    assert message == f"output 0: {REFUSED_ADDRESS}"
    # Refused on the first attempt: a refusal is not retried as a flaky network would be.
    assert not [e for e in done["timeline"] if e["kind"] == "finalize_retry"]
    shown = str(done["error"]) + str(done["timeline"])
    assert "127.0.0.2" not in shown and "::1" not in shown


def test_output_redirect_to_an_allowed_host_serving_no_image_stores_nothing(
    api: httpx.Client, sim: httpx.Client, stack: Stack
) -> None:
    # The simulator's own config (its API secret inside) on the allow-listed host: the hop
    # is allowed, but the bytes are JSON, not the PNG Wiro declared.
    configure(sim, output_redirect_url="/_sim/config")
    job_id = submit(api)

    done = failed_copy(api, job_id)

    assert done["error"]["message"] == "output 0: the file is not an image"
    assert "sim-secret" not in str(done)


def test_output_redirect_loop_is_cut_after_a_few_hops(api: httpx.Client, sim: httpx.Client) -> None:
    # Every /cdn/ path redirects to /cdn/loop/0.png: each hop is allowed, none ends.
    configure(sim, output_redirect_url="/cdn/loop/0.png")
    job_id = submit(api)

    done = failed_copy(api, job_id)

    assert done["error"]["message"] == "output 0: the URL redirects too many times"


def test_output_of_zeros_declared_png_is_not_stored(api: httpx.Client, sim: httpx.Client) -> None:
    configure(sim, output_mode="zeros", output_size_bytes=8 * 1024 * 1024)
    job_id = submit(api)

    done = failed_copy(api, job_id)

    assert done["error"]["message"] == "output 0: the file is not an image"


def test_output_that_drips_is_cut_at_the_deadline(api: httpx.Client, sim: httpx.Client) -> None:
    # One byte every 0.5 s: no single read ever times out (OUTPUT_READ_TIMEOUT_S is 5),
    # only OUTPUT_READ_DEADLINE_S (8 in the tests) ends it.
    configure(sim, output_mode="drip", output_stall_s=0.5)
    job_id = submit(api)

    done = failed_copy(api, job_id)

    assert done["error"]["message"] == "output 0: the download took too long"
