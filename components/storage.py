"""Durable S3-compatible storage (AWS, MinIO, moto) for model directories and single data files.

A directory's MANIFEST.sha256.json is written last, so it marks a finished upload and lets downloads check
every byte; downloads land in a temp dir beside the target and are renamed into place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError, NoCredentialsError

from components.environment import AWS_ENDPOINT, AWS_KEY_ID, AWS_SECRET_KEY, MLFLOW_S3_ENDPOINT
from components.progress import StageProgress, megabytes
from components.util import console, file_sha256

MANIFEST = "MANIFEST.sha256.json"
MIB = 1024 * 1024
# S3 allows at most 10,000 parts, so 64 MiB chunks cover objects up to ~640 GB.
FILE_TRANSFER = TransferConfig(multipart_threshold=64 * MIB, multipart_chunksize=64 * MIB)
DENIED = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "InvalidToken", "ExpiredToken"}
MISSING = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}
_URI = re.compile(r"s3://(?P<bucket>[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(?:/(?P<prefix>.*))?")


class IntegrityError(RuntimeError):
    """A downloaded file does not match the checksum recorded at upload time."""


def client():
    # AWS_ENDPOINT_URL is read by boto3 itself and wins; MLflow deployments only set MLFLOW_S3_ENDPOINT_URL.
    endpoint = None if AWS_ENDPOINT.is_set() else MLFLOW_S3_ENDPOINT.get()
    # MinIO and moto do not serve virtual-host bucket names on a bare host:port.
    path_style = {"addressing_style": "path"} if endpoint or AWS_ENDPOINT.is_set() else None
    config = Config(retries={"max_attempts": 5, "mode": "standard"}, s3=path_style)
    # A fresh session: boto3's default one caches the first credentials it sees, ignoring later env changes.
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


def parse_uri(uri: str) -> tuple[str, str]:
    match = _URI.fullmatch(str(uri).strip())
    if not match:
        raise ValueError(
            f"not an S3 URI: {uri!r}; expected s3://bucket/prefix (bucket: 3-63 lowercase "
            "letters, digits, dots or hyphens)"
        )
    return match["bucket"], (match["prefix"] or "").strip("/")


def _join(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix else rel


@contextmanager
def _errors(uri: str):
    """Turn botocore errors into built-in ones that name the URI (and never the secret)."""
    try:
        yield
    except NoCredentialsError as err:
        raise PermissionError(f"no AWS credentials for {uri}: set {AWS_KEY_ID}/{AWS_SECRET_KEY}") from err
    except (ClientError, S3UploadFailedError) as err:
        # boto3 wraps upload failures in S3UploadFailedError and keeps the ClientError only as __context__.
        cause = err if isinstance(err, ClientError) else err.__context__
        if not isinstance(cause, ClientError):
            raise
        code = str(cause.response.get("Error", {}).get("Code", ""))
        status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in DENIED or status == 403:
            raise PermissionError(
                f"access to {uri} denied ({code or status}): check {AWS_KEY_ID}/{AWS_SECRET_KEY} and the bucket policy"
            ) from err
        if code in MISSING or status == 404:
            raise FileNotFoundError(f"{uri} does not exist ({code or status})") from err
        raise


def _object(uri: str) -> tuple[str, str]:
    bucket, key = parse_uri(uri)
    if not key:
        raise ValueError(f"{uri!r} names a bucket, not an object")
    return bucket, key


def _list(s3, bucket: str, prefix: str) -> list[dict]:
    # The trailing slash keeps s3://b/model from also matching s3://b/model-old.
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/" if prefix else "")
    return [obj for page in pages for obj in page.get("Contents", [])]


def s3_etags(uri: str) -> dict[str, str]:
    """Relative key -> ETag for every object under the prefix; a cheap content key for caching."""
    bucket, prefix = parse_uri(uri)
    with _errors(uri):
        objects = _list(client(), bucket, prefix)
    if not objects:
        raise FileNotFoundError(f"no objects under {uri}")
    cut = len(prefix) + 1 if prefix else 0
    return {obj["Key"][cut:]: obj["ETag"].strip('"') for obj in sorted(objects, key=lambda o: o["Key"])}


def build_manifest(local_dir: Path) -> dict[str, dict]:
    root = Path(local_dir)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() != MANIFEST)
    return {p.relative_to(root).as_posix(): {"sha256": file_sha256(p), "size": p.stat().st_size} for p in files}


def upload_dir(local_dir: str | Path, uri: str, threshold: int = 64 * MIB, chunk: int = 64 * MIB) -> dict:
    """Upload every file under local_dir, then the manifest; returns the manifest (relative path -> sha256, size)."""
    root = Path(local_dir)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory")
    bucket, prefix = parse_uri(uri)
    manifest = build_manifest(root)
    s3, config = client(), TransferConfig(multipart_threshold=threshold, multipart_chunksize=chunk)
    with _errors(uri), _transfer("upload", uri, manifest) as shown:
        for rel in manifest:
            s3.upload_file(str(root / rel), bucket, _join(prefix, rel), Config=config, Callback=shown.advance)
        # Written last: a crash mid-upload leaves no manifest, so nobody downloads a partial model.
        s3.put_object(
            Bucket=bucket,
            Key=_join(prefix, MANIFEST),
            Body=json.dumps(manifest, indent=1).encode(),
            ContentType="application/json",
        )
    return manifest


@contextmanager
def _transfer(verb: str, uri: str, manifest: dict[str, dict]):
    """Bytes moved so far as they move (boto3 calls back from its threads), then one line with the size."""
    total, started = sum(m["size"] for m in manifest.values()), time.perf_counter()
    with StageProgress(f"{verb} {uri}", total, show=megabytes) as shown:
        yield shown
    elapsed = time.perf_counter() - started
    where = "to" if verb == "upload" else "from"
    console.print(f"{verb}ed {len(manifest)} files ({megabytes(total)}) {where} {uri} in {elapsed:.1f} s")


def _remote_manifest(s3, bucket: str, prefix: str, uri: str) -> dict[str, dict]:
    try:
        with _errors(f"{uri.rstrip('/')}/{MANIFEST}"):
            return json.loads(s3.get_object(Bucket=bucket, Key=_join(prefix, MANIFEST))["Body"].read())
    except FileNotFoundError:
        with _errors(uri):
            count = len(_list(s3, bucket, prefix))
    # Refuse rather than guess: objects without a manifest may be an upload that died halfway.
    raise FileNotFoundError(
        f"{uri} holds {count} objects but no {MANIFEST}: an unfinished upload, or one not "
        "made by components.storage.upload_dir"
        if count
        else f"nothing under {uri}"
    )


def _matches(local_dir: Path, manifest: dict[str, dict]) -> bool:
    # A cheap check (manifest equality plus sizes); the full hash was verified when the directory was installed.
    try:
        same = json.loads((local_dir / MANIFEST).read_text()) == manifest
    except (OSError, ValueError):  # absent or half-written
        return False
    return same and all(
        (local_dir / rel).is_file() and (local_dir / rel).stat().st_size == m["size"] for rel, m in manifest.items()
    )


def _fetch(s3, bucket: str, key: str, dest: Path, expected: dict, uri: str, config: TransferConfig, done) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _errors(uri):
        s3.download_file(bucket, key, str(dest), Config=config, Callback=done)
    size, digest = dest.stat().st_size, file_sha256(dest)
    if (size, digest) != (expected["size"], expected["sha256"]):
        raise IntegrityError(
            f"{uri} failed verification: expected sha256 {expected['sha256']} ({expected['size']} "
            f"bytes), got {digest} ({size} bytes); it changed after upload or arrived corrupted"
        )


def download_dir(uri: str, local_dir: str | Path, threshold: int = 64 * MIB, chunk: int = 64 * MIB) -> Path:
    """Download and verify the directory uploaded by upload_dir; skips when local_dir already matches."""
    bucket, prefix = parse_uri(uri)
    target = Path(local_dir)
    s3, config = client(), TransferConfig(multipart_threshold=threshold, multipart_chunksize=chunk)
    manifest = _remote_manifest(s3, bucket, prefix, uri)
    if _matches(target, manifest):
        return target
    if any(rel.startswith("/") or ".." in rel.split("/") for rel in manifest):  # must not write outside target
        raise IntegrityError(f"{uri}/{MANIFEST} lists paths outside the directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    try:
        with _transfer("download", uri, manifest) as shown:
            for rel, expected in manifest.items():
                where = f"{uri.rstrip('/')}/{rel}"
                _fetch(s3, bucket, _join(prefix, rel), tmp / rel, expected, where, config, shown.advance)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        # Move a stale target aside first: two renames are as close to an atomic directory swap as POSIX gets.
        if target.exists():
            target.rename(old)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return target


def download_file(uri: str, local_path: str | Path) -> Path:
    bucket, key = _object(uri)
    path = Path(local_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        with _errors(uri):
            client().download_file(bucket, key, str(tmp), Config=FILE_TRANSFER)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def upload_file(local_path: str | Path, uri: str) -> str:
    bucket, key = _object(uri)
    if not Path(local_path).is_file():
        raise FileNotFoundError(f"{local_path} is not a file")
    with _errors(uri):
        client().upload_file(str(local_path), bucket, key, Config=FILE_TRANSFER)
    return uri
