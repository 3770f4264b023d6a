"""The callback's pure parts: its URL, the proof a task is ours, the body's hint."""

from __future__ import annotations

import uuid

from service import callbacks


def test_a_tasks_callback_url_is_ours_only_with_our_path_and_token() -> None:
    job_id = uuid.uuid4()
    token, stored = callbacks.new_token()
    url = callbacks.url("https://gw.example/", job_id, token, extra_query="&traceparent=00-x")
    assert url.startswith(f"https://gw.example/v1/wiro/callbacks/{job_id}?token=")
    assert url.startswith("https://gw.example" + callbacks.PREFIX)
    assert callbacks.is_ours(url, job_id, stored)
    assert not callbacks.is_ours(url.replace(token, "guess"), job_id, stored)
    assert not callbacks.is_ours(url, uuid.uuid4(), stored)
    assert not callbacks.is_ours(url, job_id, None)
    assert not callbacks.is_ours(None, job_id, stored)
    assert stored != token and callbacks.token_matches(token, stored)


def test_the_body_hints_at_a_taskid_in_any_shape_wiro_sends() -> None:
    hint = callbacks.taskid_hint
    assert hint(b'{"id": "42", "status": "task_postprocess_end"}', "application/json") == "42"
    assert hint(b'{"tasklist": [{"taskid": 7}]}', "application/json") == "7"
    assert hint(b"taskid=9&status=x", "application/x-www-form-urlencoded") == "9"
    assert hint(b"not json", "text/plain") is None
    assert hint(b"", "application/json") is None
    assert hint(b'{"id": ""}', "application/json") is None
    assert hint(b'{"id": "' + b"9" * 100 + b'"}', "application/json") == "9" * 64
