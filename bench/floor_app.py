"""The submit benchmark's floor: the least an app can do for the promise of ``POST /v1/jobs``.

It reads the whole request body, INSERTs one row into the same ``jobs`` table of the same
database, pushes the job's id onto a Redis list, and answers 202 with the id. A multipart
body's files are stored, as the gateway stores them, in the same S3 bucket of the same
server (one PutObject each, from a thread: boto3 is the client both use), so that the
multipart figure compares like with like. No auth, no image checks, no framework beyond
Starlette's form parser: a bare ASGI app, served by the same uvicorn command as the
gateway (h11, same worker count)::

    DATABASE_URL=... REDIS_URL=... python -m uvicorn bench.floor_app:create_app --factory \
        --workers 2 --http h11 --no-access-log --port 8900
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from typing import Any

import boto3
import psycopg
import redis.asyncio as aioredis
from botocore.config import Config
from starlette.datastructures import UploadFile
from starlette.requests import Request

INSERT = (
    "INSERT INTO jobs (id, status, owner, prompt, steps, scale, created_at, updated_at,"
    " enqueued_at) VALUES (%s, 'queued', 'floor', %s, 25, 3.5, now(), now(), now())"
)
POOL_SIZE = 5  # as the gateway's own SQLAlchemy pool


class Floor:
    """A tiny pool of async psycopg connections and one Redis client."""

    def __init__(self) -> None:
        self.dsn = os.environ["DATABASE_URL"].replace("postgresql+psycopg://", "postgresql://")
        self.pool: asyncio.Queue[psycopg.AsyncConnection[Any]] | None = None
        self.redis = aioredis.Redis.from_url(os.environ["REDIS_URL"])
        self.bucket = os.environ.get("S3_BUCKET", "dreamgate")
        # As the gateway's client (service/storage.py): path style, no extra checksums,
        # and a connection per concurrent put.
        self.s3 = boto3.client(
            "s3",
            endpoint_url=os.environ.get("S3_ENDPOINT_URL"),
            region_name=os.environ.get("S3_REGION", "us-east-1"),
            config=Config(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                max_pool_connections=64,
            ),
        )

    async def store(self, job_id: str, n: int, upload: UploadFile) -> None:
        body = await upload.read()
        await asyncio.to_thread(
            self.s3.put_object,
            Bucket=self.bucket,
            Key=f"floor/{job_id}/{n}",
            Body=body,
            ContentType=upload.content_type or "application/octet-stream",
        )

    async def start(self) -> None:
        self.pool = asyncio.Queue()
        for _ in range(POOL_SIZE):
            self.pool.put_nowait(await psycopg.AsyncConnection.connect(self.dsn, autocommit=True))

    async def accept(self, prompt: str, job_id: str) -> str:
        assert self.pool is not None
        conn = await self.pool.get()
        try:
            await conn.execute(INSERT, (job_id, prompt))
        finally:
            self.pool.put_nowait(conn)
        await self.redis.lpush("floor", job_id)
        return job_id


def create_app() -> Any:
    """The ASGI app (a factory, as the gateway's)."""
    floor = Floor()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await floor.start()
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        job_id = str(uuid.uuid4())
        prompt = "floor"
        headers = dict(scope["headers"])
        if headers.get(b"content-type", b"").startswith(b"multipart/form-data"):
            form = await Request(scope, receive).form()
            prompt = str(form.get("prompt") or "floor")
            files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
            for n, upload in enumerate(files):
                await floor.store(job_id, n, upload)
        else:
            body = bytearray()
            more = True
            while more:
                message = await receive()
                body += message.get("body", b"")
                more = message.get("more_body", False)
            if headers.get(b"content-type", b"").startswith(b"application/json"):
                prompt = str(json.loads(body).get("prompt", "floor"))
        job_id = await floor.accept(prompt, job_id)
        out = json.dumps({"id": job_id, "status": "queued"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 202,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"location", b"/v1/jobs/" + job_id.encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": out})

    return app
