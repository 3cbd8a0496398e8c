"""SIGKILL at random moments of sharding (data_prep/shard_gopro.py, 2 worker processes), to a local folder
and to S3 (the loopback moto server): whatever a killed run leaves under a final name (a shard, an index,
the manifest; a local file or an S3 object) is byte-identical to an uninterrupted run's, and the same
command run again ends with exactly the uninterrupted run's files and no temporaries.

The moment: once a seeded random number of shards is under its final name, plus a random fraction of a
shard's writing time; the whole process group (the parent and its workers) is killed, as a node failure
would."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, make_bucket, run_cli

from .conftest import SHARD_ARGS, files_of, leftovers

ARGS = SHARD_ARGS
LOCAL_KILLS = 3
S3_KILLS = 2


def _start(source: Path, out: str, env: dict) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    full.update(env)
    cmd = [sys.executable, str(ROOT / "data_prep/shard_gopro.py"), "--src", str(source), "--out", out, *map(str, ARGS)]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )


def _kill_when(proc: subprocess.Popen, count, shards_done: int, fraction: float) -> int:
    """Kill the run's process group once `count()` reaches `shards_done`, `fraction` of a shard's time later;
    return how many shards were under their final name at the kill (-1: it had already finished)."""
    deadline = time.monotonic() + 120
    seen = 0
    while proc.poll() is None and (seen := count()) < shards_done:
        assert time.monotonic() < deadline, "sharding made no progress in 120 s"
        time.sleep(0.003)
    time.sleep(fraction * 0.06)
    if proc.poll() is not None:
        return -1
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    if proc.returncode == 0:  # it finished between the poll above and the kill: the kill landed on nothing
        return -1
    return seen


def _start_and_kill(start, count, rng: random.Random) -> tuple[subprocess.Popen, int]:
    """Start a run (start(attempt) -> Popen) and kill it at a seeded moment. A run that finished before its
    kill landed (an idle machine shards fast) proves nothing: it is started again on a fresh destination
    with the kill target halved, up to 4 times."""
    done = rng.randint(0, 12)  # of 16: the kill lands before the last shards and the manifest
    fraction = rng.random()
    for attempt in range(4):
        proc = start(attempt)
        seen = _kill_when(proc, lambda attempt=attempt: count(attempt), done, fraction)
        if seen >= 0:
            assert proc.returncode == -signal.SIGKILL, proc.returncode
            return proc, seen
        done, fraction = done // 2, fraction / 2
    raise AssertionError(f"4 runs ended before their kill landed (exit status {proc.returncode})")


@pytest.mark.slow
def test_sigkill_while_sharding_locally(shard_source, shard_reference, tmp_path, record):
    source, reference = shard_source, shard_reference
    record.expect("SIGKILL at a random moment of sharding", "local folder")
    rng = random.Random("kill-sharding-local")
    details = []
    for i in range(LOCAL_KILLS):

        def folder(attempt: int, i=i) -> Path:
            return tmp_path / f"out{i}-{attempt}"

        proc, seen = _start_and_kill(
            lambda a: _start(source, str(folder(a)), {}), lambda a: sum(1 for _ in folder(a).glob("*/*.tar")), rng
        )
        out = Path(proc.args[proc.args.index("--out") + 1])
        record.injections = i + 1
        left = files_of(out) if out.is_dir() else {}
        temporaries = leftovers(out) if out.is_dir() else []
        partial = [name for name, data in left.items() if reference.get(name) != data]
        if partial:
            record(
                "SIGKILL at a random moment of sharding",
                "local folder",
                i + 1,
                "data lost",
                f"kill {i}: files under a final name that differ from an uninterrupted run's: {partial}",
            )
        rerun = run_cli("data_prep/shard_gopro.py", "--src", source, "--out", out, *ARGS)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        after = files_of(out)
        if after != reference or leftovers(out):
            record(
                "SIGKILL at a random moment of sharding",
                "local folder",
                i + 1,
                "data lost",
                f"kill {i}: the rerun's files differ from an uninterrupted run's "
                f"({sorted(set(after) ^ set(reference)) or [k for k in after if after[k] != reference.get(k)]}); "
                f"temporaries: {leftovers(out)}",
            )
        details.append(f"{seen} shards done +{len(temporaries)} temporaries")
    record(
        "SIGKILL at a random moment of sharding",
        "local folder",
        LOCAL_KILLS,
        "identical",
        f"killed with {'; '.join(details)}: every file under a final name whole, the rerun equals an uninterrupted run",
    )


@pytest.mark.slow
def test_sigkill_while_sharding_to_s3(shard_source, shard_reference, s3_server, tmp_path, record):
    source, reference = shard_source, shard_reference
    import boto3

    record.expect("SIGKILL at a random moment of sharding", "S3 (loopback moto server)")
    env = s3_server
    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    make_bucket(env, "faults-kill")
    rng = random.Random("kill-sharding-s3")
    staging = tmp_path / "tmp"  # $TMPDIR: where the runs stage shards on their way up
    staging.mkdir()
    env = {**env, "TMPDIR": str(staging)}

    def objects(prefix: str) -> dict[str, bytes]:
        out = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket="faults-kill", Prefix=prefix + "/"):
            for obj in page.get("Contents", []):
                out[obj["Key"][len(prefix) + 1 :]] = client.get_object(Bucket="faults-kill", Key=obj["Key"])[
                    "Body"
                ].read()
        return out

    def count(prefix: str) -> int:
        found = client.list_objects_v2(Bucket="faults-kill", Prefix=prefix + "/").get("Contents", [])
        return sum(1 for o in found if o["Key"].endswith(".tar"))

    details = []
    for i in range(S3_KILLS):
        proc, seen = _start_and_kill(
            lambda a, i=i: _start(source, f"s3://faults-kill/k{i}-{a}", env), lambda a, i=i: count(f"k{i}-{a}"), rng
        )
        url = proc.args[proc.args.index("--out") + 1]
        prefix = url.rsplit("/", 1)[1]
        record.injections = i + 1
        left = objects(prefix)
        partial = [name for name, data in left.items() if reference.get(name) != data]
        if partial:
            record(
                "SIGKILL at a random moment of sharding",
                "S3 (loopback moto server)",
                i + 1,
                "data lost",
                f"kill {i}: objects under a final key that differ from an uninterrupted run's files: {partial}",
            )
        rerun = run_cli("data_prep/shard_gopro.py", "--src", source, "--out", url, *ARGS, env=env)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        after = objects(prefix)
        if after != reference:
            record(
                "SIGKILL at a random moment of sharding",
                "S3 (loopback moto server)",
                i + 1,
                "data lost",
                f"kill {i}: the rerun's objects differ from an uninterrupted run's files "
                f"({sorted(set(after) ^ set(reference)) or [k for k in after if after[k] != reference.get(k)]})",
            )
        details.append(f"{seen} shards up")
    stale = sorted(p.name for p in staging.iterdir())
    record(
        "SIGKILL at a random moment of sharding",
        "S3 (loopback moto server)",
        S3_KILLS,
        "identical",
        f"killed with {'; '.join(details)}: every object under a final key whole, the rerun equals an "
        f"uninterrupted run ({len(stale)} staging folder(s) of killed runs left in $TMPDIR)",
    )
