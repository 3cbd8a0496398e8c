"""Shards on S3 against a real S3-compatible server on loopback (moto_server, the `s3_server` fixture):
upload, rerun, --verify, errors naming bucket and key, the local cache, parts, and training from s3://."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, make_bucket, run_cli, write_config

from golf_dist.data import storage
from golf_dist.data.torch_loader import ShardPairs
from golf_dist.errors import DataError

SECRETS = ("golf-test-secret", "golf-test-key")  # the fixture's credentials: never in any output


def _client(env: dict):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )


def _objects(env: dict, bucket: str, prefix: str) -> dict[str, bytes]:
    client = _client(env)
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            out[obj["Key"][len(prefix) + 1 :]] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


def _local(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def _no_secrets(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, f"a credential ({secret}) appears in the output"


def _shard_to_s3(shards: Path, env: dict, url: str, *extra) -> subprocess.CompletedProcess:
    return run_cli(
        "data_prep/shard_gopro.py",
        "--src",
        shards.parent / "GOPRO_Large",
        "--out",
        url,
        "--maxcount",
        4,
        "--workers",
        2,
        "--no-progress",
        "--format",
        "png",
        *extra,
        env=env,
    )


@pytest.fixture()
def s3_env(s3_server, monkeypatch) -> dict:
    """The loopback server's variables in this process too (for in-process calls), with fresh clients."""
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    storage._clients.clear()
    yield s3_server
    storage._clients.clear()


@pytest.mark.slow
def test_shard_to_s3_equals_local_rerun_skips_and_verify_finds_damage(shards, s3_server):
    env = s3_server
    make_bucket(env, "h1-up")
    url = "s3://h1-up/gopro/png"
    proc = _shard_to_s3(shards, env, url)
    assert proc.returncode == 0, proc.stderr
    assert f"manifest: {url}/manifest.json" in proc.stdout and "wrote 4 shards (kept 0" in proc.stdout
    # the same bytes as the local run of the same arguments (the `shards` fixture), each with its sha256
    objects, local = _objects(env, "h1-up", "gopro/png"), _local(shards)
    assert sorted(objects) == sorted(local) and len(objects) == 9  # 4 shards, 4 indexes, the manifest
    client = _client(env)
    for relpath, data in objects.items():
        assert data == local[relpath], relpath
        meta = client.head_object(Bucket="h1-up", Key=f"gopro/png/{relpath}")["Metadata"]
        assert meta["sha256"] == hashlib.sha256(data).hexdigest() and meta["bytes"] == str(len(data))

    again = _shard_to_s3(shards, env, url)
    assert again.returncode == 0 and "wrote 0 shards (kept 4 already complete)" in again.stdout, again.stderr
    good = run_cli("data_prep/shard_gopro.py", "--verify", url, "--no-progress", env=env)
    assert good.returncode == 0 and good.stdout.startswith("ok: 8 files ("), good.stdout + good.stderr

    flipped = bytearray(objects["train/train-000001.tar"])
    flipped[1000] ^= 0xFF
    client.put_object(Bucket="h1-up", Key="gopro/png/train/train-000001.tar", Body=bytes(flipped))
    client.put_object(
        Bucket="h1-up", Key="gopro/png/train/train-000002.tar", Body=objects["train/train-000002.tar"][:-1024]
    )
    client.delete_object(Bucket="h1-up", Key="gopro/png/test/test-000000.idx")
    bad = run_cli("data_prep/shard_gopro.py", "--verify", url, "--no-progress", env=env)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    lines = bad.stdout.splitlines()
    assert lines[0] == f"3 of 8 files in {url} are bad:"
    assert any(line.startswith(f"  changed: {url}/train/train-000001.tar has sha256 ") for line in lines)
    size = len(objects["train/train-000002.tar"])
    assert f"  truncated: {url}/train/train-000002.tar has {size - 1024} of {size} bytes" in lines
    assert f"  missing: {url}/test/test-000000.idx" in lines
    # the damaged objects carry no upload record of this plan: a rerun refuses, --overwrite repairs
    refused = _shard_to_s3(shards, env, url)
    assert refused.returncode == 1 and f"{url}/train/train-000001.tar" in refused.stderr
    assert "--overwrite" in refused.stderr
    repaired = _shard_to_s3(shards, env, url, "--overwrite")
    assert repaired.returncode == 0, repaired.stderr
    assert run_cli("data_prep/shard_gopro.py", "--verify", url, env=env).returncode == 0
    assert _objects(env, "h1-up", "gopro/png") == local
    _no_secrets(*(p.stdout + p.stderr for p in (proc, again, good, bad, refused, repaired)))


@pytest.mark.slow
def test_s3_errors_name_the_bucket_and_key(shards, s3_server, tmp_path):
    env = s3_server
    make_bucket(env, "h1-empty")
    cases = [
        (("--verify", "s3://h1-no-such-bucket/x"), "bucket s3://h1-no-such-bucket does not exist"),
        (
            ("--src", shards.parent / "GOPRO_Large", "--out", "s3://h1-no-such-bucket/x", "--no-progress"),
            "bucket s3://h1-no-such-bucket does not exist",
        ),
        (("--verify", "s3://h1-empty/nothing/here"), "s3://h1-empty/nothing/here/manifest.json is missing"),
    ]
    for args, message in cases:
        proc = run_cli("data_prep/shard_gopro.py", *args, env=env)
        assert proc.returncode == 1 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
        _no_secrets(proc.stdout + proc.stderr)
    # nothing listening at the endpoint
    from conftest import free_port

    down = {**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_MAX_ATTEMPTS": "1"}
    proc = run_cli("data_prep/shard_gopro.py", "--verify", "s3://h1-empty/x", env=down)
    assert proc.returncode == 1 and "cannot reach http://127.0.0.1:" in proc.stderr, proc.stderr
    assert "AWS_ENDPOINT_URL" in proc.stderr
    # no credentials anywhere in the standard chain
    bare = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    bare.update(
        AWS_ENDPOINT_URL=env["AWS_ENDPOINT_URL"],
        AWS_DEFAULT_REGION="us-east-1",
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    proc = subprocess.run(
        [sys.executable, str(ROOT / "data_prep" / "shard_gopro.py"), "--verify", "s3://h1-empty/x"],
        capture_output=True,
        text=True,
        env=bare,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1 and "no AWS credentials found" in proc.stderr and "s3://h1-empty" in proc.stderr


def test_local_cache_downloads_verifies_reuses_and_repairs(shards, s3_env, tmp_path):
    env = s3_env
    make_bucket(env, "h1-cache")
    url = "s3://h1-cache/sets/a"
    assert _shard_to_s3(shards, env, url).returncode == 0
    cache = tmp_path / "cache"
    folder = storage.local_shard_dir(url, cache)
    assert folder == cache / "h1-cache" / "sets" / "a"
    assert _local(folder) == _local(shards)
    assert storage.local_shard_dir(str(shards), cache) == shards  # a local path comes back unchanged

    mtimes = {p: p.stat().st_mtime_ns for p in folder.rglob("*.tar")}
    assert storage.local_shard_dir(url, cache) == folder
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*.tar")} == mtimes, "valid files were downloaded again"

    damaged = folder / "train" / "train-000000.tar"
    data = bytearray(damaged.read_bytes())
    data[2000] ^= 0x55
    damaged.write_bytes(bytes(data))
    storage.local_shard_dir(url, cache)
    assert damaged.read_bytes() == (shards / "train" / "train-000000.tar").read_bytes(), "damage not repaired"

    # ShardPairs reads s3:// through the cache: the same pixels as the local shards
    remote, local = ShardPairs(url, "train", cache_dir=cache), ShardPairs(shards, "train")
    assert len(remote) == len(local) == 12
    for i in (0, 7, 11):
        for a, b in zip(remote.load(i), local.load(i)):
            assert np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b

    # an object changed after sharding is refused, naming it
    client = _client(env)
    client.put_object(Bucket="h1-cache", Key="sets/a/test/test-000000.tar", Body=b"not the shard")
    (folder / "test" / "test-000000.tar").unlink()
    with pytest.raises(DataError, match=r"s3://h1-cache/sets/a/test/test-000000\.tar is 13 bytes .* changed after"):
        storage.local_shard_dir(url, cache)
    assert not (folder / "test" / "test-000000.tar").exists(), "a bad download landed under its final name"
    assert not list(folder.rglob("*.tmp-*"))
    client.delete_object(Bucket="h1-cache", Key="sets/a/test/test-000000.tar")
    with pytest.raises(DataError, match=r"s3://h1-cache/sets/a/test/test-000000\.tar is listed in the manifest but"):
        storage.local_shard_dir(url, cache)
    with pytest.raises(DataError, match=r"s3://h1-cache/sets/none/manifest\.json does not exist"):
        storage.local_shard_dir("s3://h1-cache/sets/none", cache)


@pytest.mark.slow
def test_parts_on_s3_merge_to_the_single_run_bytes(shards, s3_server):
    env = s3_server
    make_bucket(env, "h1-parts")
    url = "s3://h1-parts/p"
    for part in (0, 2):
        proc = _shard_to_s3(shards, env, url, "--num-parts", 3, "--part", part)
        assert proc.returncode == 0, proc.stderr
    merge = _shard_to_s3(shards, env, url, "--num-parts", 3, "--merge")
    assert merge.returncode == 1 and f"{url}/parts/part-00001-of-00003.json" in merge.stderr
    assert "--num-parts 3 --part 1" in merge.stderr
    assert _shard_to_s3(shards, env, url, "--num-parts", 3, "--part", 1).returncode == 0
    merge = _shard_to_s3(shards, env, url, "--num-parts", 3, "--merge")
    assert merge.returncode == 0, merge.stderr
    objects = _objects(env, "h1-parts", "p")
    assert {k: v for k, v in objects.items() if not k.startswith("parts/")} == _local(shards)
    assert sorted(k for k in objects if k.startswith("parts/")) == [
        f"parts/part-0000{i}-of-00003.json" for i in range(3)
    ]


@pytest.mark.slow
def test_train_reads_s3_shards_and_logs_no_credentials(shards, s3_server, tmp_path):
    env = {**s3_server, "HOME": str(tmp_path / "home")}  # any default cache lands in the test's folder
    make_bucket(env, "h1-train")
    url = "s3://h1-train/gopro"
    assert _shard_to_s3(shards, env, url).returncode == 0
    cache = tmp_path / "cache"
    cfg = write_config(
        tmp_path / "cfg.yaml",
        url,
        tmp_path / "out",
        data={"cache_dir": str(cache)},
        train={"steps": 2, "log_every": 1, "val_every": 2, "checkpoint_every": 2},
    )
    proc = run_cli("launch/train.py", "--config", cfg, "--stage", "f", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (cache / "h1-train" / "gopro" / "manifest.json").read_bytes() == (shards / "manifest.json").read_bytes()
    assert not (tmp_path / "home" / ".cache" / "golf_dist").exists(), "a reader ignored data.cache_dir"
    _no_secrets(proc.stdout + proc.stderr)
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        params = dict(db.execute("select key, value from params").fetchall())
        tags = db.execute("select value from tags").fetchall()
    assert params["data.shards"] == url
    _no_secrets(json.dumps(params), json.dumps(tags))
    assert not any("AWS_SECRET" in k or "aws_secret" in k for k in params)


@pytest.mark.slow
def test_sigkill_during_upload_then_rerun_gives_the_uninterrupted_objects(s3_server, tmp_path):
    """Kill the whole run once its first shard is up; the rerun keeps what was uploaded and ends with exactly
    the objects of an uninterrupted (local) run."""
    import signal
    import time

    from golf_dist.data.prep.synthetic import make_synthetic_gopro

    env = s3_server
    src = tmp_path / "GOPRO_Large"
    make_synthetic_gopro(
        src, seed=6, workers=1, train_pairs=6, test_pairs=2, height=192, width=256, frames_per_scene=2, progress=False
    )
    args = ("--src", src, "--format", "jp2", "--maxcount", 1, "--workers", 2, "--no-progress")
    run_cli("data_prep/shard_gopro.py", *args, "--out", tmp_path / "reference", check=True)
    make_bucket(env, "h1-kill")
    url = "s3://h1-kill/k"
    stage = tmp_path / "tmp"  # $TMPDIR: where the runs stage their shards
    stage.mkdir()
    env = {**env, "TMPDIR": str(stage)}
    cmd = [sys.executable, str(ROOT / "data_prep" / "shard_gopro.py"), *map(str, args), "--out", url]
    proc = subprocess.Popen(
        cmd, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    client = _client(env)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            keys = [o["Key"] for o in client.list_objects_v2(Bucket="h1-kill").get("Contents", [])]
            if any(k.endswith(".tar") for k in keys):
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended ({proc.returncode}) before the kill"
    reference = _local(tmp_path / "reference")
    before = _objects(env, "h1-kill", "k")
    assert "manifest.json" not in before and before, "killed after its first upload, before the manifest"
    assert all(reference[k] == v for k, v in before.items()), "an object is visible but not whole"
    rerun = run_cli("data_prep/shard_gopro.py", *args, "--out", url, env=env)
    assert rerun.returncode == 0, rerun.stderr
    kept = sum(k.endswith(".tar") and k.replace(".tar", ".idx") in before for k in before)
    assert f"(kept {kept} already complete)" in rerun.stdout
    assert _objects(env, "h1-kill", "k") == reference
    # the rerun removed its staging folder; only the killed run's (it could not clean up) is left
    assert len(list(stage.iterdir())) == 1
