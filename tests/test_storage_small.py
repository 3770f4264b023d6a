"""Small objects go to S3 in one PutObject and come back in one GetObject (moto)."""

from __future__ import annotations

import hashlib
import io
import tempfile

from service.stack import Stack
from service.storage import Storage


def test_a_short_stream_is_stored_whole_with_its_size_and_sha256(storage: Storage) -> None:
    data = bytes(range(256)) * 4000  # about 1 MB, in many chunks
    chunks = iter([data[i : i + 10_000] for i in range(0, len(data), 10_000)])

    stored = storage.put_stream("outputs/x/0-small.png", chunks, content_type="image/png")

    assert stored.size == len(data)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert storage.read("outputs/x/0-small.png") == data


def test_a_spooled_upload_is_stored_from_where_it_stands(storage: Storage) -> None:
    data = b"\x89PNG" + bytes(range(256)) * 800
    with tempfile.SpooledTemporaryFile(max_size=1024) as spool:
        spool.write(b"skip" + data)
        spool.seek(4)

        stored = storage.put_stream("inputs/x/0-a.png", spool, content_type="image/png")

    assert stored.size == len(data)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert storage.read("inputs/x/0-a.png") == data


def test_an_input_comes_back_whole_in_a_seekable_file(storage: Storage) -> None:
    data = bytes(range(256)) * 30_000  # past the spool's memory size
    storage.put_stream("inputs/x/1-b.png", io.BytesIO(data), content_type="image/png")

    with storage.download_spooled("inputs/x/1-b.png") as f:
        assert f.read() == data


def test_presigned_urls_name_the_public_endpoint_and_work_there(
    storage: Storage, stack: Stack
) -> None:
    # The servers reach S3 at 127.0.0.1; clients are told "localhost" (as compose tells
    # them localhost:9000 for minio:9000). The URL must be signed for the host it names.
    import httpx

    inner = stack.env["S3_ENDPOINT_URL"]
    public = inner.replace("127.0.0.1", "localhost")
    store = Storage.from_settings(
        endpoint_url=inner, region="us-east-1", bucket=storage.bucket, public_endpoint_url=public
    )
    store.put_stream("outputs/p/0-a.png", iter([b"public"]), content_type="image/png")

    url = store.presigned_get("outputs/p/0-a.png", ttl_s=60)

    assert url.startswith(f"{public}/")
    got = httpx.get(url, timeout=10)
    assert got.status_code == 200 and got.content == b"public"
