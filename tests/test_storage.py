"""S3 through boto3 on a real S3 server (moto): streamed puts, retention rule."""

from __future__ import annotations

import hashlib
import io
import uuid

import pytest

from service.stack import Stack
from service.storage import Storage, TooLarge


@pytest.fixture
def storage(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Storage:
    # Credentials through boto3's usual chain, as in production.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", stack.env["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", stack.env["AWS_SECRET_ACCESS_KEY"])
    store = Storage.from_settings(
        endpoint_url=stack.env["S3_ENDPOINT_URL"],
        region="us-east-1",
        bucket=f"t-{uuid.uuid4().hex[:12]}",
    )
    store.ensure_bucket()
    return store


def test_put_stream_records_size_and_sha256_of_a_multipart_upload(storage: Storage) -> None:
    data = bytes(range(256)) * (40 * 1024 + 7)  # about 10 MiB: more than one part
    chunks = iter([data[i : i + 65536] for i in range(0, len(data), 65536)])

    stored = storage.put_stream("outputs/x/0-a.png", chunks, content_type="image/png")

    assert stored.size == len(data)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert storage.read("outputs/x/0-a.png") == data


def test_put_stream_stops_past_its_limit(storage: Storage) -> None:
    with pytest.raises(TooLarge):
        storage.put_stream(
            "inputs/x/0-a.png", io.BytesIO(b"x" * 5000), content_type="x/y", limit=4096
        )


def test_output_retention_is_a_lifecycle_rule_on_outputs_only(
    storage: Storage, stack: Stack
) -> None:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=stack.env["S3_ENDPOINT_URL"],
        region_name="us-east-1",
        aws_access_key_id="embedded",
        aws_secret_access_key="embedded",
    )

    storage.set_output_retention(30)
    [rule] = s3.get_bucket_lifecycle_configuration(Bucket=storage.bucket)["Rules"]
    assert rule["Expiration"]["Days"] == 30
    assert rule["Filter"]["Prefix"] == "outputs/"
    assert rule["Status"] == "Enabled"

    storage.set_output_retention(0)
    with pytest.raises(s3.exceptions.ClientError):
        s3.get_bucket_lifecycle_configuration(Bucket=storage.bucket)
