"""components.storage against a real moto S3 server on loopback (HTTP, signatures, multipart and all)."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import boto3
import pytest
import requests

from components import storage

MIB = 1024 * 1024


@pytest.fixture
def bucket(moto_url) -> str:
    name = f"test-{uuid.uuid4().hex[:12]}"
    storage.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def model_dir(tmp_path) -> Path:
    root = tmp_path / "model"
    (root / "tokenizer").mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "llama"}')
    (root / "tokenizer" / "tokenizer.json").write_text('{"vocab": {"a": 0}}')
    (root / "empty.txt").write_bytes(b"")
    (root / "model.safetensors").write_bytes(os.urandom(12 * MIB))  # above the 5 MiB threshold used below
    return root


def digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != storage.MANIFEST
    }


@pytest.mark.integration
def test_parse_uri():
    assert storage.parse_uri("s3://bucket/a/b/") == ("bucket", "a/b")
    assert storage.parse_uri("s3://bucket") == ("bucket", "")
    for bad in ("bucket/a", "s3://", "s3:///a", "http://bucket/a", "s3://Bad_Bucket/a"):
        with pytest.raises(ValueError, match="s3://bucket/prefix"):
            storage.parse_uri(bad)


@pytest.mark.integration
def test_model_dir_round_trip_is_byte_identical_and_multipart(bucket, model_dir, tmp_path):
    uri = f"s3://{bucket}/models/tiny"
    manifest = storage.upload_dir(model_dir, uri, threshold=5 * MIB, chunk=5 * MIB)
    assert set(manifest) == {"config.json", "tokenizer/tokenizer.json", "empty.txt", "model.safetensors"}

    s3 = storage.client()
    big = s3.head_object(Bucket=bucket, Key="models/tiny/model.safetensors")
    assert big["ETag"].strip('"').endswith("-3")  # a multipart ETag: 12 MiB in 5 MiB parts
    assert s3.head_object(Bucket=bucket, Key="models/tiny/model.safetensors", PartNumber=1)["PartsCount"] == 3
    small = s3.head_object(Bucket=bucket, Key="models/tiny/config.json")
    assert "-" not in small["ETag"]

    out = storage.download_dir(uri, tmp_path / "cache" / "tiny")
    assert digests(out) == digests(model_dir)
    assert not [p for p in out.parent.iterdir() if p.name != "tiny"], "no temp dirs left beside the target"

    # A second download finds the matching manifest and does not touch the files.
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert storage.download_dir(uri, out) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime

    # New content under the same URI replaces the stale local copy.
    (model_dir / "tokenizer" / "tokenizer.json").write_text('{"vocab": {"a": 0, "b": 1}}')
    storage.upload_dir(model_dir, uri, threshold=5 * MIB, chunk=5 * MIB)
    assert digests(storage.download_dir(uri, out)) == digests(model_dir)
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]


@pytest.mark.integration
def test_single_file_round_trip(bucket, tmp_path):
    src = tmp_path / "train.jsonl"
    src.write_text('{"text": "hi", "label": "greet"}\n')
    uri = storage.upload_file(src, f"s3://{bucket}/data/train.jsonl")
    got = storage.download_file(uri, tmp_path / "dl" / "train.jsonl")
    assert got.read_bytes() == src.read_bytes()


@pytest.mark.integration
def test_missing_prefix_and_object_name_the_uri(bucket, tmp_path):
    uri = f"s3://{bucket}/models/nope"
    with pytest.raises(FileNotFoundError, match=uri):
        storage.download_dir(uri, tmp_path / "nope")
    assert not (tmp_path / "nope").exists()
    with pytest.raises(FileNotFoundError, match=uri):
        storage.s3_etags(uri)
    with pytest.raises(FileNotFoundError, match=f"{uri}/data.csv"):
        storage.download_file(f"{uri}/data.csv", tmp_path / "data.csv")
    missing_bucket = f"s3://no-such-{uuid.uuid4().hex[:8]}/models/x"
    with pytest.raises(FileNotFoundError, match=missing_bucket):
        storage.s3_etags(missing_bucket)


@pytest.mark.integration
def test_prefix_without_manifest_is_refused(bucket, model_dir, tmp_path):
    uri = f"s3://{bucket}/models/partial"
    storage.upload_file(model_dir / "config.json", f"{uri}/config.json")
    with pytest.raises(FileNotFoundError, match=f"{uri}.*no {storage.MANIFEST}"):
        storage.download_dir(uri, tmp_path / "partial")


@pytest.fixture
def iam_auth(moto_url):
    """Make the moto server check signatures and IAM policies, as real S3 does; switched off again after."""
    iam = boto3.client("iam", endpoint_url=moto_url)  # created while auth is still off
    iam.create_user(UserName="nobody")  # a real user with no policies: valid signature, no permissions
    key = iam.create_access_key(UserName="nobody")["AccessKey"]
    reply = requests.post(f"{moto_url}/moto-api/reset-auth", data=b"0", timeout=10)
    reply.raise_for_status()
    try:
        yield key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        previous = reply.json()["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"].encode()
        requests.post(f"{moto_url}/moto-api/reset-auth", data=previous, timeout=10).raise_for_status()
        iam.delete_access_key(UserName="nobody", AccessKeyId=key["AccessKeyId"])
        iam.delete_user(UserName="nobody")


@pytest.mark.integration
@pytest.mark.parametrize(
    "case, code",
    [
        ("unknown key", "InvalidAccessKeyId"),
        ("wrong secret", "SignatureDoesNotMatch"),
        ("no permission", "AccessDenied"),
    ],
)
def test_bad_credentials_raise_permission_error(case, code, bucket, model_dir, iam_auth, tmp_path, monkeypatch):
    key_id, secret = iam_auth
    key_id = "AKIAUNKNOWNKEY000000" if case == "unknown key" else key_id
    secret = "not-the-secret" if case == "wrong secret" else secret
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    uri = f"s3://{bucket}/models/tiny"
    calls = [
        lambda: storage.s3_etags(uri),
        lambda: storage.download_dir(uri, tmp_path / "m"),
        lambda: storage.upload_file(model_dir / "config.json", f"{uri}/config.json"),
        lambda: storage.download_file(f"{uri}/config.json", tmp_path / "c.json"),
    ]
    for call in calls:
        with pytest.raises(PermissionError) as err:
            call()
        message = str(err.value)
        assert uri in message and "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY" in message and secret not in message
        # HEAD responses carry no error body, so download_file only sees the bare status 403.
        assert f"({'403' if 'HeadObject' in str(err.value.__cause__) else code})" in message


@pytest.mark.integration
def test_corrupted_object_fails_verification(bucket, model_dir, tmp_path):
    uri = f"s3://{bucket}/models/tiny"
    storage.upload_dir(model_dir, uri, threshold=5 * MIB, chunk=5 * MIB)
    storage.client().put_object(Bucket=bucket, Key="models/tiny/tokenizer/tokenizer.json", Body=b'{"vocab": {"b": 0}}')
    target = tmp_path / "cache" / "tiny"
    with pytest.raises(storage.IntegrityError, match=f"{uri}/tokenizer/tokenizer.json.*sha256"):
        storage.download_dir(uri, target)
    assert list(target.parent.iterdir()) == [], "neither the target nor a temp dir may survive a failed download"


@pytest.mark.integration
def test_etags_are_stable_and_track_content(bucket, model_dir, moto_url, monkeypatch):
    uri = f"s3://{bucket}/models/tiny"
    storage.upload_dir(model_dir, uri, threshold=5 * MIB, chunk=5 * MIB)
    first = storage.s3_etags(uri)
    assert set(first) == {"config.json", "tokenizer/tokenizer.json", "empty.txt", "model.safetensors", storage.MANIFEST}
    storage.upload_dir(model_dir, uri, threshold=5 * MIB, chunk=5 * MIB)  # same bytes again
    assert storage.s3_etags(uri) == first

    # MLflow-style configuration reaches the same server.
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", moto_url)
    assert storage.s3_etags(uri) == first

    (model_dir / "config.json").write_text('{"model_type": "llama", "changed": true}')
    storage.upload_dir(model_dir, uri, threshold=5 * MIB, chunk=5 * MIB)
    second = storage.s3_etags(uri)
    changed = {rel for rel in first if first[rel] != second[rel]}
    assert changed == {"config.json", storage.MANIFEST}
