"""S3 through boto3 on a real S3 server (moto): streamed puts, retention rule."""

from __future__ import annotations

import hashlib
import io

import pytest

from service.stack import Stack
from service.storage import Storage, TooLarge


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


def test_retention_adds_and_removes_only_its_own_lifecycle_rules(
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

    def rules() -> dict[str, dict[str, object]]:
        try:
            found = s3.get_bucket_lifecycle_configuration(Bucket=storage.bucket)["Rules"]
        except s3.exceptions.ClientError:
            return {}
        return {str(r["ID"]): dict(r) for r in found}

    storage.set_output_retention(30)
    [rule] = rules().values()
    assert rule["Expiration"] == {"Days": 30}
    assert rule["Filter"] == {"Prefix": "outputs/"}
    assert rule["Status"] == "Enabled"
    storage.set_output_retention(0)
    assert rules() == {}

    # Someone else's rule on the bucket survives ours coming and going.
    theirs = {
        "ID": "ops-logs-expiry",
        "Filter": {"Prefix": "logs/"},
        "Status": "Enabled",
        "Expiration": {"Days": 7},
    }
    s3.put_bucket_lifecycle_configuration(
        Bucket=storage.bucket, LifecycleConfiguration={"Rules": [theirs]}
    )
    storage.set_retention({"outputs/": 30, "inputs/": 90})
    now = rules()
    assert set(now) == {
        "ops-logs-expiry",
        "dreamgate-output-retention",
        "dreamgate-input-retention",
    }
    assert now["dreamgate-input-retention"]["Filter"] == {"Prefix": "inputs/"}
    assert now["dreamgate-input-retention"]["Expiration"] == {"Days": 90}
    storage.set_retention({"outputs/": 14, "inputs/": 0})
    now = rules()
    assert set(now) == {"ops-logs-expiry", "dreamgate-output-retention"}
    assert now["dreamgate-output-retention"]["Expiration"] == {"Days": 14}
    storage.set_retention({"outputs/": 0, "inputs/": 0})
    assert set(rules()) == {"ops-logs-expiry"}
    s3.delete_bucket_lifecycle(Bucket=storage.bucket)
