"""An unreliable S3: the real loopback S3 server (moto) behind tests/faults/s3proxy.py, which answers a share of
requests with 500 or 503, resets connections (before or after the server did the work), cuts answers short
and stalls them. Uploads (shard_gopro.py --out s3://), --verify, and the shard cache every training rank
reads must either complete correctly or fail naming what failed (an s3:// URL of the set, no traceback),
within a bounded time; never leave a partial object or file under a final name, never call a whole shard bad.

A lower fault rate (which boto3's standard retries, 3 attempts, mostly absorb) and a higher one (which they
often cannot) are both run; the outcome of each is recorded as it came."""

from __future__ import annotations

import time

import pytest
from conftest import make_bucket, run_cli

from .conftest import files_of
from .s3proxy import FlakyS3Proxy

BOUND_S = 120  # the longest any one command may take under faults
ARGS = ("--maxcount", 4, "--workers", 2, "--no-progress", "--format", "png")  # the session shards: 4 shards, 9 objects
RATES = (0.2, 0.5)
FAULT = "unreliable S3 (500/503, resets, cut and stalled answers)"


def _client(env: dict):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )


def _objects(client, bucket: str, prefix: str) -> dict[str, bytes]:
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            out[obj["Key"][len(prefix) + 1 :]] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


def _named(stderr: str, url: str) -> bool:
    """A one-line `error: ...` naming the set's bucket (an object of it, or the bucket), and no traceback."""
    bucket = url.split("/")[2]
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    return bool(lines) and f"s3://{bucket}" in lines[-1] and "Traceback" not in stderr


@pytest.fixture(scope="module")
def reference(shards) -> dict[str, bytes]:
    """The session's shard set (made with ARGS but one worker: the same bytes)."""
    return files_of(shards)


@pytest.fixture(scope="module")
def flaky_bucket(s3_server, reference):
    """A bucket holding a finished shard set (put directly, not through the proxy) at s3://faults-flaky/set."""
    make_bucket(s3_server, "faults-flaky")
    client = _client(s3_server)
    for rel, data in reference.items():
        client.put_object(Bucket="faults-flaky", Key=f"set/{rel}", Body=data)
    return "s3://faults-flaky/set"


@pytest.mark.slow
def test_uploads_through_a_flaky_s3(flaky_bucket, shard_source, reference, s3_server, tmp_path, record):
    record.expect(FAULT, "upload: shard_gopro.py --out s3://")
    client = _client(s3_server)
    injected = 0
    for seed, rate in enumerate(RATES):
        url = f"s3://faults-flaky/up{seed}"
        with FlakyS3Proxy(s3_server["AWS_ENDPOINT_URL"], rate, seed) as proxy:
            env = {**s3_server, "AWS_ENDPOINT_URL": proxy.url, "TMPDIR": str(tmp_path)}
            started = time.monotonic()
            proc = run_cli(
                "data_prep/shard_gopro.py", "--src", shard_source, "--out", url, *ARGS, env=env, timeout=BOUND_S + 60
            )
            took = time.monotonic() - started
        injected += proxy.total
        record.injections = injected
        assert took < BOUND_S, f"the upload took {took:.0f} s under faults"
        up = _objects(client, "faults-flaky", f"up{seed}")
        partial = [k for k, v in up.items() if reference.get(k) != v]
        if partial or (proc.returncode != 0 and "manifest.json" in up):
            record(
                FAULT,
                f"upload (shard_gopro.py --out s3://), {rate:.0%} of requests",
                proxy.total,
                "data lost",
                f"objects that differ {partial}; manifest of a failed run: "
                f"{proc.returncode != 0 and 'manifest.json' in up}",
            )
        if proc.returncode == 0:
            assert up == reference, "the upload reported success but the objects are not the set"
            outcome, detail = (
                "identical",
                f"{proxy.total} faults in {proxy.requests} requests; completed in {took:.1f} s",
            )
        else:
            assert proc.returncode == 1 and _named(proc.stderr, url), proc.stderr[-3000:]
            message = [line for line in proc.stderr.splitlines() if line.startswith("error: ")][-1]
            outcome, detail = (
                "named error",
                (f"{proxy.total} faults in {proxy.requests} requests; stopped in {took:.1f} s: {message[7:130]}"),
            )
        # whatever happened, the same command without faults finishes the set
        again = run_cli(
            "data_prep/shard_gopro.py",
            "--src",
            shard_source,
            "--out",
            url,
            *ARGS,
            env={**s3_server, "TMPDIR": str(tmp_path)},
        )
        assert again.returncode == 0, again.stderr[-3000:]
        if _objects(client, "faults-flaky", f"up{seed}") != reference:
            record(
                FAULT,
                f"upload (shard_gopro.py --out s3://), {rate:.0%} of requests",
                proxy.total,
                "data lost",
                "the rerun without faults did not give the set",
            )
        record(
            FAULT,
            f"upload (shard_gopro.py --out s3://), {rate:.0%} of requests",
            proxy.total,
            outcome,
            detail + "; every object whole; the same command without faults completes the set",
        )


@pytest.mark.slow
def test_verify_through_a_flaky_s3(flaky_bucket, s3_server, record):
    record.expect(FAULT, "shard_gopro.py --verify s3://")
    injected = 0
    for seed, rate in enumerate(RATES):
        with FlakyS3Proxy(s3_server["AWS_ENDPOINT_URL"], rate, 10 + seed) as proxy:
            env = {**s3_server, "AWS_ENDPOINT_URL": proxy.url}
            started = time.monotonic()
            proc = run_cli(
                "data_prep/shard_gopro.py", "--verify", flaky_bucket, "--no-progress", env=env, timeout=BOUND_S + 60
            )
            took = time.monotonic() - started
        injected += proxy.total
        record.injections = injected
        assert took < BOUND_S, f"--verify took {took:.0f} s under faults"
        assert " are bad:" not in proc.stdout, f"--verify called whole shards bad:\n{proc.stdout}"
        if proc.returncode == 0:
            assert proc.stdout.startswith("ok: 8 files"), proc.stdout
            outcome, detail = "identical", f"{proxy.total} faults in {proxy.requests} requests; 'ok' in {took:.1f} s"
        else:
            assert proc.returncode == 1 and _named(proc.stderr, flaky_bucket), proc.stdout + proc.stderr[-3000:]
            message = [line for line in proc.stderr.splitlines() if line.startswith("error: ")][-1]
            outcome, detail = (
                "named error",
                (f"{proxy.total} faults in {proxy.requests} requests; stopped in {took:.1f} s: {message[7:130]}"),
            )
        record(
            FAULT,
            f"--verify s3://, {rate:.0%} of requests",
            proxy.total,
            outcome,
            detail + "; no whole shard reported bad",
        )


@pytest.mark.slow
def test_shard_cache_through_a_flaky_s3(flaky_bucket, s3_server, reference, tmp_path, monkeypatch, record):
    from golf_dist.data import storage
    from golf_dist.errors import DataError

    record.expect(FAULT, "shard cache (storage.local_shard_dir)")
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    injected = 0
    try:
        for seed, rate in enumerate(RATES):
            cache = tmp_path / f"cache{seed}"
            folder = cache / "faults-flaky" / "set"
            with FlakyS3Proxy(s3_server["AWS_ENDPOINT_URL"], rate, 20 + seed) as proxy:
                monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
                storage._clients.clear()
                started = time.monotonic()
                try:
                    storage.local_shard_dir(flaky_bucket, cache)
                    error = None
                except DataError as err:
                    error = str(err)
                took = time.monotonic() - started
            injected += proxy.total
            record.injections = injected
            assert took < BOUND_S, f"the cache took {took:.0f} s under faults"
            cached = files_of(folder) if folder.is_dir() else {}
            partial = [k for k, v in cached.items() if reference.get(k) != v]
            if partial or (error and "manifest.json" in cached):
                record(
                    FAULT,
                    f"shard cache (storage.local_shard_dir), {rate:.0%} of requests",
                    proxy.total,
                    "data lost",
                    f"rate {rate}: files under a final name that differ {partial}; manifest after an error: "
                    f"{bool(error and 'manifest.json' in cached)}",
                )
            if error is None:
                assert cached == reference, "the cache reported success but holds other files"
                outcome, detail = (
                    "identical",
                    f"{proxy.total} faults in {proxy.requests} requests; complete in {took:.1f} s",
                )
            else:
                assert flaky_bucket in error, error
                outcome, detail = (
                    "named error",
                    (f"{proxy.total} faults in {proxy.requests} requests; DataError in {took:.1f} s: {error[:120]}"),
                )
            monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server["AWS_ENDPOINT_URL"])  # without faults: completes
            storage._clients.clear()
            storage.local_shard_dir(flaky_bucket, cache)
            assert files_of(folder) == reference
            record(
                FAULT,
                f"shard cache (storage.local_shard_dir), {rate:.0%} of requests",
                proxy.total,
                outcome,
                detail + "; nothing partial under a final name; complete once S3 answered",
            )
    finally:
        storage._clients.clear()
