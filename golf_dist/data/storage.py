"""Shards on S3 (or any S3-compatible store): URLs, the client, verified transfers, and the local cache.

Credentials come only from boto3's standard chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE
and ~/.aws, instance or pod roles); an S3-compatible store (MinIO, Ceph, ...) is named by
AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3), which botocore reads itself. Nothing here prints or
stores a credential: errors name the bucket and key only.

Each uploaded object carries its SHA-256 in its metadata (x-amz-meta-sha256), so a rerun can skip
objects already uploaded; downloads are hashed while they stream and renamed into place only when
size and SHA-256 match the manifest.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from pathlib import Path

from golf_dist.data.shard_reader import MANIFEST, parse_manifest
from golf_dist.errors import DataError
from golf_dist.files import atomic_path, sha256_file, write_atomic

S3_PREFIX = "s3://"
DEFAULT_CACHE = Path("~/.cache/golf_dist/shards")
_CACHE_STATE = ".golf_cache_state.json"  # relpath -> [bytes, mtime_ns, sha256] of files verified before
_clients: dict[int, object] = {}  # one client per process (clients do not survive a fork)


def is_s3_url(path: str | os.PathLike | None) -> bool:
    return isinstance(path, str) and path.startswith(S3_PREFIX)


def split_s3_url(url: str) -> tuple[str, str]:
    """'s3://bucket/some/prefix/' -> ('bucket', 'some/prefix'); the prefix may be empty."""
    if not is_s3_url(url):
        raise DataError(f"{url!r} is not an s3:// URL (expected s3://bucket/prefix)")
    bucket, _, prefix = url[len(S3_PREFIX) :].partition("/")
    if not bucket:
        raise DataError(f"{url!r} names no bucket (expected s3://bucket/prefix)")
    return bucket, prefix.strip("/")


def s3_key(prefix: str, relpath: str) -> str:
    return f"{prefix}/{relpath}" if prefix else relpath


def s3_url(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def s3_client():
    """An S3 client from the standard credential chain; AWS_ENDPOINT_URL is honoured by botocore."""
    pid = os.getpid()
    if pid not in _clients:
        try:
            import boto3
        except ImportError:
            raise DataError("s3:// shards need boto3: pip install boto3") from None
        from botocore.config import Config

        # standard retries (3 attempts unless AWS_MAX_ATTEMPTS says otherwise); endpoint and region from the env.
        # Timeouts bound a silent endpoint: 10 s to connect, 30 s without a byte (botocore's defaults: 60 s each)
        _clients[pid] = boto3.client(
            "s3", config=Config(retries={"mode": "standard"}, connect_timeout=10, read_timeout=30)
        )
    return _clients[pid]


def s3_error(err: Exception, bucket: str, key: str | None, action: str) -> DataError:
    """A botocore error as a DataError naming the bucket and key (never a credential)."""
    where = s3_url(bucket, key) if key else f"bucket s3://{bucket}"
    name = type(err).__name__
    code = ""
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
    if code in ("NoSuchBucket",):
        return DataError(f"{action} {where}: bucket {bucket} does not exist (create it, or fix the URL)")
    if code in ("NoSuchKey", "404", "NotFound"):
        return DataError(f"{action} {where}: no such object")
    if code in ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return DataError(
            f"{action} {where}: access denied ({code}); check the credentials in the standard chain "
            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws) and the bucket policy"
        )
    if name == "NoCredentialsError":
        return DataError(
            f"{action} {where}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or AWS_PROFILE, or run where an instance role applies"
        )
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the AWS endpoint"
        return DataError(f"{action} {where}: cannot reach {endpoint} ({name}); check AWS_ENDPOINT_URL and the network")
    return DataError(f"{action} {where} failed: {code or name}")


def _botocore_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError, ClientError
    from urllib3.exceptions import HTTPError  # a connection cut while botocore reads an error answer escapes unwrapped

    return (ClientError, BotoCoreError, HTTPError)


def head(bucket: str, key: str) -> dict | None:
    """The object's head (ContentLength, Metadata, ...), or None when there is no such object."""
    client = s3_client()
    try:
        return client.head_object(Bucket=bucket, Key=key)
    except _botocore_errors() as err:
        code = str((getattr(err, "response", None) or {}).get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound"):
            return None
        raise s3_error(err, bucket, key, "reading") from None


def check_bucket(bucket: str) -> None:
    """DataError naming the bucket when it is missing or not ours to use."""
    try:
        s3_client().head_bucket(Bucket=bucket)
    except _botocore_errors() as err:
        code = str((getattr(err, "response", None) or {}).get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise DataError(f"bucket s3://{bucket} does not exist (create it, or fix the URL)") from None
        raise s3_error(err, bucket, None, "opening") from None


def list_keys(bucket: str, prefix: str) -> list[str]:
    """Every key under `prefix/` (recursively)."""
    client = s3_client()
    keys: list[str] = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""
        ):
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
    except _botocore_errors() as err:
        raise s3_error(err, bucket, prefix or None, "listing") from None
    return keys


def upload_file(path: Path, bucket: str, key: str, sha256: str, extra: dict[str, str] | None = None) -> None:
    """Upload one finished local file; its SHA-256 and size go into the object's metadata.

    An S3 PUT (multipart included) makes the object visible whole or not at all.
    """
    meta = {"sha256": sha256, "bytes": str(path.stat().st_size), **(extra or {})}
    try:
        s3_client().upload_file(str(path), bucket, key, ExtraArgs={"Metadata": meta})
    except _botocore_errors() as err:
        raise s3_error(err, bucket, key, "uploading") from None
    except Exception as err:  # boto3's S3UploadFailedError wraps the ClientError
        if type(err).__name__ == "S3UploadFailedError":
            cause = err.__cause__ or err.__context__ or err
            raise s3_error(cause, bucket, key, "uploading") from None
        raise


def put_bytes(data: bytes, bucket: str, key: str) -> None:
    meta = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": str(len(data))}
    try:
        s3_client().put_object(Bucket=bucket, Key=key, Body=data, Metadata=meta)
    except _botocore_errors() as err:
        raise s3_error(err, bucket, key, "uploading") from None


def get_bytes(bucket: str, key: str) -> bytes | None:
    """A small object's bytes, or None when there is no such object."""
    try:
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except _botocore_errors() as err:
        code = str((getattr(err, "response", None) or {}).get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound"):
            return None
        raise s3_error(err, bucket, key, "reading") from None


def delete(bucket: str, key: str) -> None:
    try:
        s3_client().delete_object(Bucket=bucket, Key=key)
    except _botocore_errors() as err:
        raise s3_error(err, bucket, key, "deleting") from None


BODY_ATTEMPTS = 3  # whole downloads tried when an answer breaks off mid-body (botocore retries only the request)


def hash_object(bucket: str, key: str, dest: Path | None = None) -> tuple[int, str] | None:
    """(size, SHA-256) of an object's bytes as they stream (also written to `dest` if given); None if missing.

    botocore's retries cover a request that fails, not a body cut short after the answer began: such a
    download starts again from the first byte, up to BODY_ATTEMPTS times, before the error names the object."""
    for _attempt in range(1, BODY_ATTEMPTS + 1):
        digest, size = hashlib.sha256(), 0
        try:
            body = s3_client().get_object(Bucket=bucket, Key=key)["Body"]
        except _botocore_errors() as err:
            code = str((getattr(err, "response", None) or {}).get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                return None
            raise s3_error(err, bucket, key, "downloading") from None
        try:
            with open(dest, "wb") if dest is not None else contextlib.nullcontext() as f:
                for block in iter(functools.partial(body.read, 1 << 20), b""):
                    digest.update(block)
                    size += len(block)
                    if f is not None:
                        f.write(block)
                if f is not None:
                    f.flush()
                    os.fsync(f.fileno())
            return size, digest.hexdigest()
        except _botocore_errors() as err:
            broken = err
    raise s3_error(broken, bucket, key, f"downloading ({BODY_ATTEMPTS} attempts, each cut short)") from None


def download_verified(bucket: str, key: str, dest: Path, size: int, sha256: str) -> None:
    """Download to a temporary name, check size and SHA-256, then rename to `dest`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        got = hash_object(bucket, key, tmp)
        if got is None:
            raise DataError(f"{s3_url(bucket, key)} is listed in the manifest but missing from the bucket")
        if got != (size, sha256):
            raise DataError(
                f"{s3_url(bucket, key)} is {got[0]} bytes with sha256 {got[1][:12]}..., the manifest says "
                f"{size} bytes, sha256 {sha256[:12]}...: the object changed after sharding; "
                f"run python data_prep/shard_gopro.py --verify s3://{bucket}/... and reshard"
            )


@contextlib.contextmanager
def _locked(folder: Path):
    """An exclusive lock on the cache folder, so ranks on one node download once (best effort)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as f:
        try:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX)
        except (ImportError, OSError):
            pass  # no flock here (some network file systems): each process verifies on its own
        yield


def cache_dir_for(url: str, cache_dir: str | os.PathLike | None) -> Path:
    bucket, prefix = split_s3_url(url)
    root = Path(cache_dir).expanduser() if cache_dir else DEFAULT_CACHE.expanduser()
    return root / bucket / prefix if prefix else root / bucket


def local_shard_dir(
    shards: str | os.PathLike, cache_dir: str | os.PathLike | None = None, progress: bool = False
) -> Path:
    """A local folder holding the shard set `shards` names.

    A local path comes back unchanged. For s3://bucket/prefix, the manifest, every shard and every
    index are brought into `cache_dir/<bucket>/<prefix>` (default ~/.cache/golf_dist/shards/...),
    each checked against the manifest's size and SHA-256 and renamed into place whole; files already
    there and valid are reused (verified once, then remembered by size and mtime).
    """
    if not is_s3_url(shards):
        return Path(shards)
    url = str(shards)
    bucket, prefix = split_s3_url(url)
    folder = cache_dir_for(url, cache_dir)
    with _locked(folder):
        data = get_bytes(bucket, s3_key(prefix, MANIFEST))
        if data is None:
            check_bucket(bucket)
            raise DataError(
                f"{s3_url(bucket, s3_key(prefix, MANIFEST))} does not exist: no finished shard set at {url} "
                "(make one with: python data_prep/shard_gopro.py --src GOPRO_Large --out s3://bucket/prefix)"
            )
        manifest = parse_manifest(data, s3_url(bucket, s3_key(prefix, MANIFEST)))
        state_path = folder / _CACHE_STATE
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            state = {}
        files = []
        for split, info in manifest["splits"].items():
            for i, shard in enumerate(info["shards"]):
                files.append((shard["path"], shard["bytes"], shard["sha256"], f"splits.{split}.shards[{i}].path"))
                if "index" in shard:
                    index, field = shard["index"], f"splits.{split}.shards[{i}].index.path"
                    files.append((index["path"], index["bytes"], index["sha256"], field))
        from tqdm import tqdm

        inside = folder.resolve()
        for relpath, size, sha, field in tqdm(files, disable=not progress, desc="shard cache", unit="file"):
            dest = folder / relpath
            # parse_manifest admits only <split>/<name>.tar|.idx; this also refuses a symlink out of the cache
            if not dest.resolve().is_relative_to(inside):
                raise DataError(
                    f"{s3_url(bucket, s3_key(prefix, MANIFEST))}: {field} {relpath!r} leads outside the cache "
                    f"folder {folder}: refusing to write there; reshard (python data_prep/shard_gopro.py)"
                )
            if dest.is_file():
                stat = dest.stat()
                if state.get(relpath) == [size, stat.st_mtime_ns, sha] and stat.st_size == size:
                    continue
                if stat.st_size == size and sha256_file(dest) == sha:
                    state[relpath] = [size, stat.st_mtime_ns, sha]
                    continue
            download_verified(bucket, s3_key(prefix, relpath), dest, size, sha)
            state[relpath] = [size, dest.stat().st_mtime_ns, sha]
        write_atomic(state_path, json.dumps(state, sort_keys=True).encode())
        manifest_path = folder / MANIFEST
        if not manifest_path.is_file() or manifest_path.read_bytes() != data:
            write_atomic(manifest_path, data)  # last: a cache with a manifest is a complete one
    return folder
