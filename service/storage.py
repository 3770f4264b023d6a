"""S3 through boto3: streamed puts that hash as they go, streamed gets, presigned URLs."""

from __future__ import annotations

import hashlib
import io
import re
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Literal

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

from service import metrics

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

# 8 MiB parts, 4 in flight and 2 read ahead bound a copy's memory to about 48 MiB.
TRANSFER = TransferConfig(
    multipart_threshold=8 * 1024 * 1024,
    multipart_chunksize=8 * 1024 * 1024,
    max_concurrency=4,
    use_threads=True,
)
# boto3 reads up to 10 parts ahead of a non-seekable stream by default (80 MiB more); its
# TransferConfig takes this s3transfer setting only as an attribute.
TRANSFER.max_in_memory_upload_chunks = 2
SPOOL_BYTES = 4 * 1024 * 1024
# A stream that ends within this many bytes is stored with one PutObject, not through the
# transfer manager (its thread pool per call costs more than a small PUT); a longer one
# keeps this much more in memory while it is copied.
SMALL_STREAM_BYTES = 4 * 1024 * 1024


# -- where each object lives -------------------------------------------------------------

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
ThumbnailKind = Literal["inputs", "outputs"]


def safe_name(name: str, default: str) -> str:
    """A file name reduced to ``[A-Za-z0-9._-]``, at most 100 characters."""
    return _UNSAFE.sub("_", name).strip("._")[:100] or default


def input_key(job_id: uuid.UUID, position: int, filename: str) -> str:
    """Where an uploaded input lives."""
    return f"inputs/{job_id}/{position}-{safe_name(filename, 'image')}"


def output_key(job_id: uuid.UUID, position: int, name: str) -> str:
    """Where output ``position`` of a job lives."""
    return f"outputs/{job_id}/{position}-{safe_name(name, 'output')}"


def thumbnail_key(job_id: uuid.UUID, kind: ThumbnailKind, position: int) -> str:
    """Where the thumbnail of input or output ``position`` lives."""
    return f"thumbs/{job_id}/{kind}-{position}.jpg"


# Lifecycle rules with these ids are ours (``set_retention``); any other is left alone.
RULE_PREFIX = "dreamgate-"
_RULE_NAMES = {"outputs/": "output-retention", "inputs/": "input-retention"}


def retention_rule_id(prefix: str) -> str:
    """The id of our lifecycle rule for a key prefix (``dreamgate-output-retention``)."""
    name = _RULE_NAMES.get(prefix) or prefix.strip("/").replace("/", "-") + "-retention"
    return RULE_PREFIX + name


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


@dataclass(frozen=True)
class StoredObject:
    """What was written: where, how many bytes, and their sha256."""

    key: str
    size: int
    sha256: str


class TooLarge(Exception):
    """A stream went past the size it was allowed."""


class HashingReader(io.RawIOBase):
    """A read-only stream over ``source`` that counts and hashes what passes through.

    Written by hand because boto3 computes checksums only for its own purposes and does
    not hand them back; this lets one pass over the bytes give the sha256 we record.
    """

    def __init__(self, source: IO[bytes] | Iterator[bytes], *, limit: int | None = None) -> None:
        self._source = source
        self._iter: Iterator[bytes] | None = None if hasattr(source, "read") else source
        self._buffer = b""
        self._hash = hashlib.sha256()
        self.size = 0
        self._limit = limit

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        view = memoryview(b)
        want = len(view)
        if self._iter is not None:
            while not self._buffer:
                try:
                    self._buffer = next(self._iter)
                except StopIteration:
                    return 0
            chunk, self._buffer = self._buffer[:want], self._buffer[want:]
        else:
            chunk = self._source.read(want)  # type: ignore[union-attr]  # _iter is None: a file
        n = len(chunk)
        view[:n] = chunk
        self._hash.update(chunk)
        self.size += n
        if self._limit is not None and self.size > self._limit:
            raise TooLarge(f"more than {self._limit} bytes")
        return n

    @property
    def sha256(self) -> str:
        """Hex digest of every byte read so far."""
        return self._hash.hexdigest()


def _read_up_to(reader: io.RawIOBase, n: int) -> memoryview:
    """Exactly ``n`` bytes from ``reader``, or fewer only at its end (one buffer, no copies)."""
    buffer = memoryview(bytearray(n))
    filled = 0
    while filled < n:
        got = reader.readinto(buffer[filled:])
        if not got:
            break
        filled += got
    return buffer[:filled]


class _Prefixed(io.RawIOBase):
    """Bytes already read from a stream, then the rest of the stream."""

    def __init__(self, head: memoryview, rest: io.RawIOBase) -> None:
        self._head: memoryview | None = head
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self._head is not None:
            n = min(len(b), len(self._head))
            b[:n] = self._head[:n]
            self._head = self._head[n:] if n < len(self._head) else None  # free it once read
            return n
        return self._rest.readinto(b) or 0


def _remaining(source: IO[bytes] | Iterator[bytes]) -> int | None:
    """Bytes left in a seekable file from its position; None for a stream or iterator."""
    seekable = getattr(source, "seekable", None)
    if seekable is None or not seekable():
        return None
    file: IO[bytes] = source  # type: ignore[assignment]  # it has seekable(): a file
    try:
        start = file.tell()
        end = file.seek(0, io.SEEK_END)
        file.seek(start)
    except (OSError, ValueError):
        return None
    return end - start


def _client(endpoint_url: str | None, region: str) -> S3Client:
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,
        config=Config(
            retries={"mode": "standard", "max_attempts": 5},
            connect_timeout=5,
            read_timeout=60,
            s3={"addressing_style": "path"} if endpoint_url else None,
            # moto and older S3-compatible servers reject the new default checksums.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


class Storage:
    """One bucket on an S3-compatible server."""

    def __init__(self, client: S3Client, bucket: str, *, signer: S3Client | None = None) -> None:
        self._s3 = client
        # Presigned URLs are signed for the host they name: a client of the public
        # endpoint (S3_PUBLIC_ENDPOINT_URL) signs them when the servers' address differs.
        self._signer = signer or client
        self.bucket = bucket

    @classmethod
    def from_settings(
        cls,
        *,
        endpoint_url: str | None,
        region: str,
        bucket: str,
        public_endpoint_url: str | None = None,
    ) -> Storage:
        """A client built from our settings; credentials come from boto3's usual chain."""
        client = _client(endpoint_url, region)
        signer = _client(public_endpoint_url, region) if public_endpoint_url else None
        return cls(client, bucket, signer=signer)

    def ensure_bucket(self) -> None:
        """Create the bucket if it is missing (embedded and test servers start empty)."""
        try:
            self._s3.head_bucket(Bucket=self.bucket)
        except ClientError:
            self._s3.create_bucket(Bucket=self.bucket)

    def set_output_retention(self, days: int) -> None:
        """Expire ``outputs/`` after ``days`` days (0: keep them); see ``set_retention``."""
        self.set_retention({"outputs/": days})

    def set_retention(self, days_by_prefix: dict[str, int]) -> list[dict[str, Any]]:
        """Make our own lifecycle rules say ``days_by_prefix`` (0 or less: no rule), and
        leave every other rule on the bucket as it is; returns the rules now in force.

        S3 has no call that adds one rule: the whole configuration is read, our rules
        (``RULE_PREFIX`` + the prefix) replaced, and written back (or deleted when nothing
        is left). Two of these racing can lose one write; run it from one place (``dreamgate
        migrate --ensure-bucket``). S3 itself deletes the copies, so retention costs the
        service nothing at run time.
        """
        try:
            current = list(
                self._s3.get_bucket_lifecycle_configuration(Bucket=self.bucket).get("Rules", [])
            )
        except ClientError as exc:
            if _error_code(exc) != "NoSuchLifecycleConfiguration":
                raise
            current = []
        ours = {retention_rule_id(p) for p in days_by_prefix}
        rules: list[dict[str, Any]] = [dict(r) for r in current if r.get("ID") not in ours]
        for prefix, days in sorted(days_by_prefix.items()):
            if days > 0:
                rules.append(
                    {
                        "ID": retention_rule_id(prefix),
                        "Filter": {"Prefix": prefix},
                        "Status": "Enabled",
                        "Expiration": {"Days": days},
                    }
                )
        if rules == [dict(r) for r in current]:
            return rules
        if rules:
            self._s3.put_bucket_lifecycle_configuration(
                Bucket=self.bucket,
                LifecycleConfiguration={"Rules": rules},  # type: ignore[typeddict-item]  # rules read back from S3
            )
        else:
            self._s3.delete_bucket_lifecycle(Bucket=self.bucket)
        return rules

    def ping(self) -> None:
        """Raise unless the bucket answers."""
        self._s3.head_bucket(Bucket=self.bucket)

    def put_stream(
        self,
        key: str,
        source: IO[bytes] | Iterator[bytes],
        *,
        content_type: str,
        limit: int | None = None,
    ) -> StoredObject:
        """Stream ``source`` into ``key`` in bounded memory, hashing it on the way."""
        size = _remaining(source)
        if size is not None and size < TRANSFER.multipart_threshold:
            return self._put_small(key, source, size, content_type=content_type, limit=limit)  # type: ignore[arg-type]  # _remaining said: a seekable file
        reader = HashingReader(source, limit=limit)
        started = time.perf_counter()
        # A stream (an output being copied) that ends within one part is one PutObject;
        # a longer one goes on, after the part already read, through the transfer manager.
        head = _read_up_to(reader, SMALL_STREAM_BYTES)
        if len(head) < SMALL_STREAM_BYTES:
            try:
                self._s3.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=bytes(head),
                    ContentLength=len(head),
                    ContentType=content_type,
                )
            finally:
                metrics.observe_s3("put", "put", started, reader.size)
            return StoredObject(key=key, size=reader.size, sha256=reader.sha256)
        try:
            self._s3.upload_fileobj(
                io.BufferedReader(_Prefixed(head, reader), buffer_size=1024 * 1024),
                self.bucket,
                key,
                ExtraArgs={"ContentType": content_type},
                Config=TRANSFER,
            )
        finally:
            metrics.observe_s3("put", "put", started, reader.size)
        return StoredObject(key=key, size=reader.size, sha256=reader.sha256)

    def _put_small(
        self, key: str, source: IO[bytes], size: int, *, content_type: str, limit: int | None
    ) -> StoredObject:
        """One PutObject for a seekable file below the multipart size.

        upload_fileobj would build a TransferManager and a thread pool for each call; for
        an upload of a few hundred KB that costs more than the PUT itself.
        """
        if limit is not None and size > limit:
            raise TooLarge(f"more than {limit} bytes")
        start = source.tell()
        digest = hashlib.file_digest(source, "sha256")  # type: ignore[arg-type]  # a binary file
        source.seek(start)
        started = time.perf_counter()
        try:
            self._s3.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=source,
                ContentLength=size,
                ContentType=content_type,
            )
        finally:
            metrics.observe_s3("put", "put", started, size)
        return StoredObject(key=key, size=size, sha256=digest.hexdigest())

    def download_spooled(self, key: str) -> IO[bytes]:
        """The object in a seekable temp file (memory up to 4 MiB, then disk)."""
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 - caller closes
        started = time.perf_counter()
        try:
            # One streamed GET: inputs are at most MAX_IMAGE_BYTES, and download_fileobj's
            # ranged parallel GETs (a thread pool per call) only pay off for large objects.
            body = self._s3.get_object(Bucket=self.bucket, Key=key)["Body"]
            for chunk in body.iter_chunks(1024 * 1024):
                spool.write(chunk)
        finally:
            metrics.observe_s3("get", "get", started, spool.tell())
        spool.seek(0)
        return spool

    def read(self, key: str) -> bytes:
        """A whole (small) object; for tests and tools, never for images in the pipeline."""
        return self._s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def delete_prefix(self, prefix: str) -> None:
        """Remove every object under ``prefix`` (a job's uploads when its creation fails)."""
        pages = self._s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        )
        for page in pages:
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                self._s3.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})  # type: ignore[typeddict-item]  # stubs want ObjectIdentifierTypeDef

    def presigned_get(self, key: str, *, ttl_s: int) -> str:
        """A time-limited GET URL for ``key``."""
        return self._signer.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=ttl_s
        )
