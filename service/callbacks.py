"""Wiro's callback to us: its URL and per-job token, the proof that a task is ours, and the
taskid a callback body hints at.

The callback is only ever a hint (the outcome is read from Task/Detail); the token is what
makes a caller worth listening to. Only its hash is stored.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import uuid
from typing import Any
from urllib.parse import parse_qs, urlsplit

from psycopg_pool import AsyncConnectionPool

from service import jobs
from service.container import Services
from service.db import transaction
from service.models import JobStatus as S

# The route (service/api/routers/wiro_callback.py) and every URL we hand Wiro share this.
PATH = "/v1/wiro/callbacks/{job_id}"
PREFIX = PATH.split("{", 1)[0]


def new_token() -> tuple[str, str]:
    """A fresh per-job callback token and the hash that is stored in its place."""
    token = secrets.token_urlsafe(32)
    return token, hash_token(token)


def hash_token(token: str) -> str:
    """The stored form of a callback token."""
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(token: str, stored_hash: str) -> bool:
    """Constant-time check of a presented callback token against its stored hash."""
    return hmac.compare_digest(hash_token(token), stored_hash)


def url(public_url: str, job_id: uuid.UUID, token: str, *, extra_query: str = "") -> str:
    """The URL Wiro calls when the job's task ends (``extra_query``: e.g. trace context)."""
    return public_url.rstrip("/") + PATH.format(job_id=job_id) + f"?token={token}" + extra_query


def is_ours(callback_url: str | None, job_id: uuid.UUID, token_hash: str | None) -> bool:
    """True when a task's ``callbackurl`` is the one we sent for this job (path and token)."""
    if not callback_url or token_hash is None:
        return False
    parts = urlsplit(callback_url)
    token = (parse_qs(parts.query).get("token") or [""])[0]
    return parts.path.endswith(PATH.format(job_id=job_id)) and token_matches(token, token_hash)


def taskid_hint(body: bytes, content_type: str) -> str | None:
    """Whatever the body claims the taskid is (JSON or form); only ever used as a hint."""
    data: Any = None
    if body:
        try:
            data = json.loads(body)
        except ValueError:
            if "form" in content_type:
                data = {k: v[0] for k, v in parse_qs(body.decode(errors="replace")).items()}
    if isinstance(data, dict):
        if isinstance(data.get("tasklist"), list) and data["tasklist"]:
            data = data["tasklist"][0]
        for key in ("taskid", "id"):
            value = data.get(key) if isinstance(data, dict) else None
            if isinstance(value, str | int) and str(value).strip():
                return str(value)[:64]
    return None


def note_hint(svc: Services, job_id: uuid.UUID, hint: str) -> None:
    """Keep the taskid a callback named for a job whose Run's answer never came: the only
    word of its task, which the sweep may adopt through Task/Detail."""
    with transaction(svc.sessions) as s:
        job = jobs.get(s, job_id)
        if (
            job is not None
            and job.status == S.submitting
            and job.wiro_taskid is None
            and job.run_sent_at is not None
        ):
            jobs.note(s, job_id, jobs.CALLBACK_HINT, {"taskid": hint})


class Refused(Exception):
    """No such job, or not its token (the two are not told apart)."""


class Spent(Exception):
    """The job is finished: its callback URL has served its purpose."""


def check(svc: Services, job_id: uuid.UUID, token: str) -> jobs.TaskRef:
    """Refuse an unknown job or a wrong token (``Refused``) and a finished job (``Spent``);
    the job as read (``awaits_run`` says whether a taskid in the body counts)."""
    with svc.autocommit_sessions() as s:  # one read: no BEGIN/COMMIT round trips
        job = jobs.task_ref(s, job_id)
    return verified(job, token)


async def check_async(pool: AsyncConnectionPool, job_id: uuid.UUID, token: str) -> jobs.TaskRef:
    """``check`` on the event loop's autocommit pool: no thread-pool trip."""
    async with pool.connection() as conn:
        job = await jobs.task_ref_async(conn, job_id)
    return verified(job, token)


def verified(job: jobs.TaskRef | None, token: str) -> jobs.TaskRef:
    """The job, if the token is its callback token and it is not finished (else raise)."""
    stored = job.callback_token_hash if job else None
    # Same work for unknown jobs and wrong tokens: the answer reveals nothing.
    if not token_matches(token, stored or "0" * 64) or job is None:
        raise Refused
    if S(job.status).terminal:
        raise Spent(job.status)
    return job


def awaits_run(job: jobs.TaskRef) -> bool:
    """True when the job waits for its Run's answer: a taskid in a callback body counts."""
    return job.status == S.submitting and job.wiro_taskid is None and job.run_sent_at is not None
