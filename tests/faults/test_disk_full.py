"""ENOSPC from a real, small tmpfs (mounted by the test; the tests run as root): while a training run writes
a checkpoint, while shards are written (a local folder, and the staging folder of an S3 upload), while the
S3 shard cache downloads, and while the metrics file is appended to.

Expected: the writer stops with a named error (the path, the free space; no traceback) and leaves nothing
partial under a final name and no temporaries; once there is room again, the same command finishes and
its result equals an uninterrupted run's (training: bit for bit). The metrics file is not a reason to stop
training: there a full disk must cost a warning and the lines that could not be written, nothing more."""

from __future__ import annotations

import json
import random
import re
import shutil
import warnings
from pathlib import Path

import pytest
from conftest import log_lines, make_bucket, mlflow_template, run_cli, tmpfs

from .conftest import SHARD_ARGS, differences, files_of, in_parallel, leftovers, resize, train_argv, train_config

ROOM = 64 << 20  # "space freed": the tmpfs grown to 64 MB
NAMED = re.compile(r"error: no space left while writing (\S+) \(([\d.]+ MB free of [\d.]+ MB|free space unknown)")


def _named(stderr: str) -> str | None:
    """The path a named disk-full error gives, or None (no such line, or a traceback)."""
    found = NAMED.search(stderr)
    return None if found is None or "Traceback" in stderr else found.group(1)


# ---------------------------------------------------------------- a checkpoint


def _checkpoint_bytes(ref_out: Path) -> int:
    last = sorted((ref_out / "f" / "checkpoints").glob("step-*"))[-1]
    return sum(p.stat().st_size for p in last.iterdir())


def _full_disk_run(forkserver, references, folder: Path, size: int) -> dict:
    """A stage f run whose output folder is a tmpfs of `size` bytes; then the tmpfs grown and the run again."""
    out = folder / "out"
    cfg = train_config(folder / "cfg.yaml", references.shards, out)
    argv = train_argv(cfg, "f", *references.overrides("torch", "f"))
    with tmpfs(out, size):
        run = forkserver.run(argv, folder / "full")
        rc = run.wait()
        named = _named(run.stderr)
        ckpts = out / "f" / "checkpoints"
        kept = sorted(p.name for p in ckpts.iterdir()) if ckpts.is_dir() else []
        state = {
            "rc": rc,
            "named": named,
            "stderr": run.stderr[-3000:],
            "kept": kept,
            "temporaries": leftovers(out),
            "exported": (out / "f.safetensors").exists(),
        }
        # every checkpoint under a final name loads
        from golf_dist.checkpoints import load_checkpoint

        broken = []
        for name in kept:
            try:
                load_checkpoint(ckpts / name)
            except Exception as err:  # noqa: BLE001 (any failure: a partial checkpoint under a final name)
                broken.append(f"{name}: {err}")
        state["broken"] = broken
        resize(out, ROOM)
        again = forkserver.run(argv, folder / "again").check()
        state["resumed"] = [line for line in log_lines(again.stdout) if line.startswith("resuming stage f")]
        state["diffs"] = differences(references.get("torch", "f"), out, "f")
        state["after_temporaries"] = leftovers(out)
    return state


@pytest.mark.slow
def test_disk_full_during_a_checkpoint(forkserver, references, tmp_path, record):
    record.expect("ENOSPC while a checkpoint is written", "training run, stage f (torch)")
    ckpt = _checkpoint_bytes(references.get("torch", "f"))
    rng = random.Random("disk-full-checkpoint")
    sizes = [int(ckpt * rng.uniform(0.2, 0.95)) + (64 << 10), int(ckpt * rng.uniform(1.05, 1.9)) + (64 << 10)]
    results = in_parallel(
        *[
            (lambda i=i, size=size: _full_disk_run(forkserver, references, tmp_path / f"d{i}", size))
            for i, size in enumerate(sizes)
        ]
    )
    record.injections = len(results)
    details = []
    for size, state in zip(sizes, results):
        assert state["rc"] == 1 and state["named"], (
            f"not a named disk-full error (exit {state['rc']}):\n{state['stderr']}"
        )
        assert "/f/checkpoints/step-" in state["named"], state["named"]
        assert not state["exported"], "the run finished on the small disk: no fault was injected"
        if state["broken"] or state["temporaries"] or state["diffs"] or state["after_temporaries"]:
            record(
                "ENOSPC while a checkpoint is written",
                "training run, stage f (torch)",
                len(results),
                "data lost",
                f"tmpfs of {size} bytes: partial checkpoints {state['broken']}, temporaries {state['temporaries']} "
                f"/ {state['after_temporaries']}, differs from an uninterrupted run: {state['diffs']}",
            )
        details.append(
            f"{size / 1e6:.1f} MB disk: stopped writing {Path(state['named']).name} (kept {state['kept'] or 'none'})"
        )
    record(
        "ENOSPC while a checkpoint is written",
        "training run, stage f (torch)",
        len(results),
        "named error",
        "; ".join(details) + "; no temporaries, every checkpoint left loads, the rerun with room ends bitwise "
        "equal to an uninterrupted run",
    )


# ---------------------------------------------------------------- shards


@pytest.mark.slow
def test_disk_full_while_sharding_locally(shard_source, shard_reference, tmp_path, record):
    source, reference = shard_source, shard_reference
    record.expect("ENOSPC while shards are written", "local folder")
    total = sum(len(v) for v in reference.values())
    rng = random.Random("disk-full-shards")
    details = []
    for i in range(3):
        disk = tmp_path / f"disk{i}"
        size = int(total * rng.uniform(0.15, 0.9))
        with tmpfs(disk, size):
            out = disk / "shards"
            proc = run_cli("data_prep/shard_gopro.py", "--src", source, "--out", out, *SHARD_ARGS)
            named = _named(proc.stderr)
            assert proc.returncode == 1 and named and named.startswith(str(out)), (
                f"not a named disk-full error (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
            )
            record.injections = i + 1
            left = files_of(out) if out.is_dir() else {}
            partial = [k for k, v in left.items() if reference.get(k) != v]
            temporaries = leftovers(out) if out.is_dir() else []
            if partial or temporaries or "manifest.json" in left:
                record(
                    "ENOSPC while shards are written",
                    "local folder",
                    i + 1,
                    "data lost",
                    f"{size} bytes: under final names {partial}, temporaries {temporaries}, manifest "
                    f"{'written' if 'manifest.json' in left else 'absent'}",
                )
            resize(disk, ROOM)
            again = run_cli("data_prep/shard_gopro.py", "--src", source, "--out", out, *SHARD_ARGS)
            assert again.returncode == 0, again.stderr[-3000:]
            if files_of(out) != reference or leftovers(out):
                record(
                    "ENOSPC while shards are written",
                    "local folder",
                    i + 1,
                    "data lost",
                    f"{size} bytes: the rerun with room differs from an uninterrupted run",
                )
            details.append(
                f"{size / 1e3:.0f} kB disk: stopped at {Path(named).name} with {len(left) // 2} shard(s) kept"
            )
    record(
        "ENOSPC while shards are written",
        "local folder",
        3,
        "named error",
        "; ".join(details) + "; nothing partial, no manifest; the rerun with room equals an uninterrupted run",
    )


@pytest.mark.slow
def test_disk_full_while_staging_an_s3_upload(shard_source, shard_reference, s3_server, tmp_path, record):
    source, reference = shard_source, shard_reference
    import boto3

    record.expect("ENOSPC while shards are written", "S3 upload (its staging folder, $TMPDIR)")
    env = s3_server
    make_bucket(env, "faults-full")
    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    url = "s3://faults-full/set"
    disk = tmp_path / "tmp"
    smallest = min(len(v) for k, v in reference.items() if k.endswith(".tar"))
    with tmpfs(disk, smallest // 2):
        proc = run_cli(
            "data_prep/shard_gopro.py", "--src", source, "--out", url, *SHARD_ARGS, env={**env, "TMPDIR": str(disk)}
        )
        named = _named(proc.stderr)
        assert proc.returncode == 1 and named and named.startswith(str(disk)), proc.stderr[-3000:]
        record.injections = 1
        keys = [o["Key"] for o in client.list_objects_v2(Bucket="faults-full").get("Contents", [])]
        if "set/manifest.json" in keys:
            record(
                "ENOSPC while shards are written",
                "S3 upload (its staging folder, $TMPDIR)",
                1,
                "data lost",
                "a manifest was uploaded by a run that failed",
            )
        resize(disk, ROOM)
        again = run_cli(
            "data_prep/shard_gopro.py", "--src", source, "--out", url, *SHARD_ARGS, env={**env, "TMPDIR": str(disk)}
        )
        assert again.returncode == 0, again.stderr[-3000:]
        got = {}
        for key in [o["Key"] for o in client.list_objects_v2(Bucket="faults-full").get("Contents", [])]:
            got[key[len("set/") :]] = client.get_object(Bucket="faults-full", Key=key)["Body"].read()
        if got != reference:
            record(
                "ENOSPC while shards are written",
                "S3 upload (its staging folder, $TMPDIR)",
                1,
                "data lost",
                "the rerun with room did not upload an uninterrupted run's files",
            )
        stale = list(disk.iterdir())
    record(
        "ENOSPC while shards are written",
        "S3 upload (its staging folder, $TMPDIR)",
        1,
        "named error",
        f"{smallest // 2} bytes of $TMPDIR: stopped naming {Path(named).name}; no manifest; {len(keys)} whole "
        f"object(s) up; the rerun with room uploads an uninterrupted run's objects ({len(stale)} staging left)",
    )


def test_disk_full_in_the_s3_shard_cache(shards, s3_server, tmp_path, monkeypatch, record):
    """The cache of an s3:// shard set (what every training rank reads) on a disk too small for it."""
    import boto3

    from golf_dist.data import storage
    from golf_dist.errors import StorageFullError

    record.expect("ENOSPC while the S3 shard cache downloads", "golf_dist.data.storage.local_shard_dir")
    env = s3_server
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    storage._clients.clear()
    make_bucket(env, "faults-cache-full")
    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    local = files_of(shards)
    for rel, data in local.items():
        client.put_object(Bucket="faults-cache-full", Key=f"set/{rel}", Body=data)
    url = "s3://faults-cache-full/set"
    disk = tmp_path / "cache"
    size = sum(len(v) for v in local.values()) // 2
    try:
        with tmpfs(disk, size):
            with pytest.raises(StorageFullError) as caught:
                storage.local_shard_dir(url, disk)
            record.injections = 1
            message = str(caught.value)
            assert str(disk) in message and "MB free of" in message, message
            folder = disk / "faults-cache-full" / "set"
            cached = files_of(folder)
            partial = [k for k, v in cached.items() if local.get(k) != v]
            if partial or leftovers(folder) or "manifest.json" in cached:
                record(
                    "ENOSPC while the S3 shard cache downloads",
                    "golf_dist.data.storage.local_shard_dir",
                    1,
                    "data lost",
                    f"partial files {partial}, temporaries {leftovers(folder)}, manifest "
                    f"{'written' if 'manifest.json' in cached else 'absent'}",
                )
            resize(disk, ROOM)
            assert storage.local_shard_dir(url, disk) == folder
            if files_of(folder) != local:
                record(
                    "ENOSPC while the S3 shard cache downloads",
                    "golf_dist.data.storage.local_shard_dir",
                    1,
                    "data lost",
                    "the cache filled with room differs from the shard set",
                )
    finally:
        storage._clients.clear()
    record(
        "ENOSPC while the S3 shard cache downloads",
        "golf_dist.data.storage.local_shard_dir",
        1,
        "named error",
        f"{size / 1e3:.0f} kB disk: StorageFullError naming {Path(message.split(' (')[0].split()[-1]).name}; "
        f"{len(cached)} whole file(s) kept, no manifest; with room the cache completes",
    )


# ---------------------------------------------------------------- metrics


@pytest.mark.slow
def test_disk_full_while_metrics_are_logged(tmp_path, record):
    """Tracker with a real MLflow store (SQLite) and its metrics.jsonl on a tmpfs that fills: training goes on
    (no exception), a warning names the file, every metric reaches MLflow, and once there is room again the
    file takes new lines and stays readable (plots.read_metrics)."""
    import contextlib
    import io

    from golf_dist.evaluation.plots import read_metrics
    from golf_dist.tracking import Tracker

    record.expect("ENOSPC while metrics are logged", "metrics.jsonl (golf_dist.tracking.Tracker)")
    db = tmp_path / "mlflow.db"
    shutil.copyfile(mlflow_template(), db)
    disk = tmp_path / "disk"
    with tmpfs(disk, 64 << 10):
        metrics_file = disk / "f" / "metrics.jsonl"
        tracker = Tracker(True, f"sqlite:///{db}", "faults", metrics_file=metrics_file)
        tracker.start(run_name="disk-full")
        assert tracker.run_id, "no MLflow run"
        values = {f"m{i}": 0.1 * i for i in range(12)}  # a line of ~300 bytes, as the trainer writes
        stderr = io.StringIO()
        filler = disk / "filler"
        with contextlib.redirect_stderr(stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tracker.log_metrics(values, 1)
            free = shutil.disk_usage(disk).free
            try:
                with open(filler, "wb") as fh:  # the disk full to the last page: the metrics file's page has room
                    fh.write(b"\0" * free)
            except OSError:
                pass
            for step in range(2, 31):  # fills the metrics file's last page, then fails
                tracker.log_metrics(values, step)
            filler.unlink()  # room again
            for step in range(31, 41):
                tracker.log_metrics(values, step)
            tracker.end()
        warned = [line for line in log_lines(stderr.getvalue()) if line.startswith("warning: cannot append to")]
        assert len(warned) == 1 and str(metrics_file) in warned[0], stderr.getvalue()
        failed = tracker.failed["metrics file"]
        assert failed > 0, "the disk never filled: no fault was injected"
        record.injections = 1  # one full disk, however many lines it cost

        from mlflow.tracking import MlflowClient

        history = [
            m.step for m in MlflowClient(tracking_uri=f"sqlite:///{db}").get_metric_history(tracker.run_id, "m1")
        ]
        assert history == list(range(1, 41)), "MLflow lost metrics"
        text = metrics_file.read_text()
        cut = [line[:60] + "..." + line[-40:] for line in text.splitlines() if not _parses(line)]
        if cut:  # read_metrics skips such lines with a warning; the writer must never leave one
            record(
                "ENOSPC while metrics are logged",
                "metrics.jsonl (golf_dist.tracking.Tracker)",
                1,
                "data lost",
                f"{len(cut)} line(s) cut short by the full disk: {cut[:1]}",
            )
        try:
            steps = [step for step, _ in read_metrics(metrics_file)["m1"]]
        except ValueError as err:  # json.JSONDecodeError
            bad = [line[:60] + "..." + line[-40:] for line in text.splitlines() if not _parses(line)]
            record(
                "ENOSPC while metrics are logged",
                "metrics.jsonl (golf_dist.tracking.Tracker)",
                1,
                "data lost",
                f"{failed} line(s) not written (warned, in MLflow); after room returned the file is "
                f"unreadable ({type(err).__name__}): a cut line with the next one glued on: {bad[:1]}",
            )
        if steps[-10:] != list(range(31, 41)):
            record(
                "ENOSPC while metrics are logged",
                "metrics.jsonl (golf_dist.tracking.Tracker)",
                1,
                "data lost",
                f"lines written after room returned are missing: {steps[-10:]}",
            )
    record(
        "ENOSPC while metrics are logged",
        "metrics.jsonl (golf_dist.tracking.Tracker)",
        1,
        "identical",
        f"{failed} line(s) could not be written: one warning naming the file, every metric in MLflow, "
        "the file readable and complete again once there is room; training not stopped",
    )


def _parses(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except ValueError:
        return False
