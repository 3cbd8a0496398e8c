"""Bad training samples with both loaders: a truncated tar, a missing member, an undecodable image,
mismatched blur/sharp sizes (found at start-up), and corrupt image data behind a good header (found
when decoded). `data.on_bad_sample: error` names shard and key and exits non-zero; `skip` leaves the
sample out, counts it and logs the count to MLflow. The broken shards are real files made here."""

import io
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import rewrite_shard, run_cli, write_config
from PIL import Image

from golf_dist.data.dali import DaliTrainLoader
from golf_dist.data.loaders import make_train_loader
from golf_dist.data.shard_reader import index_shard
from golf_dist.data.split_check import check_split, open_pairs
from golf_dist.data.torch_loader import ShardPairs
from golf_dist.errors import DataError

SHARD = "train/train-000001.tar"  # the shard that gets broken; its second sample is the bad one
KINDS = ("truncated", "missing_member", "undecodable", "size_mismatch")


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _corrupt_png(data: bytes) -> bytes:
    """The same PNG header (signature, IHDR: size and format intact) with an IDAT that is not zlib data."""
    ihdr_end = 8 + 8 + 13 + 4
    garbage = bytes(range(256)) * 8
    idat = struct.pack(">I", len(garbage)) + b"IDAT" + garbage + struct.pack(">I", zlib.crc32(b"IDAT" + garbage))
    iend = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return data[:ihdr_end] + idat + iend


def broken_shards(shards: Path, dest: Path, kind: str) -> tuple[Path, str]:
    """A copy of the shard folder with one bad training sample of `kind`; (folder, the bad sample's key)."""
    shutil.copytree(shards, dest)
    path = dest / SHARD
    # the maker's DALI index beside the shard now describes the old tar: the loader must not trust it
    refs = index_shard(path)
    key = refs[1].key
    if kind == "truncated":  # cut inside the bad sample's sharp image: it and all after it are lost
        offset, size = refs[1].members["sharp.png"]
        with open(path, "r+b") as f:
            f.truncate(offset + size // 2)
    elif kind == "missing_member":
        rewrite_shard(path, lambda name, data: None if name == f"{key}.sharp.png" else data)
    elif kind == "undecodable":
        rewrite_shard(path, lambda name, data: b"this is not an image " * 20 if name == f"{key}.blur.png" else data)
    elif kind == "size_mismatch":
        small = np.zeros((32, 48, 3), dtype=np.uint8)
        rewrite_shard(path, lambda name, data: _png(small) if name == f"{key}.sharp.png" else data)
    elif kind == "corrupt_data":
        rewrite_shard(path, lambda name, data: _corrupt_png(data) if name == f"{key}.blur.png" else data)
    else:
        raise ValueError(kind)
    return dest, key


LOST = {"truncated": 3, "missing_member": 1, "undecodable": 1, "size_mismatch": 1}  # of the shard's 4 samples


@pytest.mark.parametrize("kind", KINDS)
def test_error_names_the_shard_and_the_sample(shards, tmp_path, kind):
    folder, key = broken_shards(shards, tmp_path / "s", kind)
    with pytest.raises(DataError) as caught:
        check_split(folder, "train", "error")
    message = str(caught.value)
    assert str(folder / SHARD) in message and key in message, message


@pytest.mark.parametrize("kind", KINDS)
def test_skip_leaves_the_sample_out_of_both_loaders_and_counts_it(shards, tmp_path, kind):
    folder, key = broken_shards(shards, tmp_path / "s", kind)
    checked = check_split(folder, "train", "skip")
    assert checked.n_bad == LOST[kind] and checked.n_samples == 12 - LOST[kind]
    assert key in {b.key for b in checked.bad}

    pairs = open_pairs(folder, "train", "skip")
    assert len(pairs) == 12 - LOST[kind] and key not in {ref.key for ref in pairs.refs}
    for i in range(len(pairs)):  # every pair left in loads
        pairs.load(i)

    # DALI: three epochs of this split never bring the bad sample, and bring every good one
    loader = DaliTrainLoader(
        checked,
        crop=32,
        flips=False,
        crops_per_frame=1,
        per_device=3,
        rank=0,
        world=1,
        seed=0,
        device="cpu",
        num_threads=1,
    )
    seen = set()
    for _ in range(3 * checked.n_samples // 3):
        next(loader)
        seen.update(source.rsplit(" ", 1)[-1] for source in loader.last_sources)
    assert seen == {ref.key for ref in pairs.refs}
    assert loader.excluded == LOST[kind]


def _cli_run(folder: Path, tmp_path: Path, loader: str, on_bad: str):
    cfg = write_config(
        tmp_path / "c.yaml",
        folder,
        tmp_path / "out",
        data={"loader": loader, "on_bad_sample": on_bad},
        train={"steps": 2, "log_every": 2, "val_every": 2, "checkpoint_every": 2},
    )
    return run_cli("launch/train.py", "--config", cfg, "--stage", "f")


def _metric(tmp_path: Path, name: str) -> float:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("golf-test").experiment_id])[0]
    return run.data.metrics[name]


@pytest.mark.parametrize("kind, loader", [("undecodable", "dali"), ("missing_member", "torch")])
def test_training_stops_with_the_sample_named(shards, tmp_path, kind, loader):
    folder, key = broken_shards(shards, tmp_path / "s", kind)
    proc = _cli_run(folder, tmp_path, loader, "error")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert key in proc.stderr and str(folder / SHARD) in proc.stderr and "Traceback" not in proc.stderr
    assert not any((tmp_path / "out").rglob("step-*"))


@pytest.mark.slow
@pytest.mark.parametrize("kind, loader", [("truncated", "torch"), ("size_mismatch", "dali")])
def test_training_skips_counts_prints_and_logs_to_mlflow(shards, tmp_path, kind, loader):
    folder, _ = broken_shards(shards, tmp_path / "s", kind)
    proc = _cli_run(folder, tmp_path, loader, "skip")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"skipped {LOST[kind]} bad training sample(s)" in proc.stdout
    assert _metric(tmp_path, "bad_samples_skipped") == LOST[kind]


# ---- corrupt image data behind a good header: found only when decoded --------------------------------


def test_corrupt_data_torch_error_names_it_and_skip_replaces_it(shards, tmp_path):
    from golf_dist.config import load_config

    folder, key = broken_shards(shards, tmp_path / "s", "corrupt_data")
    checked = check_split(folder, "train", "error")  # the header is fine: it passes the start-up check
    assert checked.n_bad == 0
    pairs = ShardPairs(folder, "train")
    for on_bad in ("error", "skip"):
        cfg = load_config(
            "gopro",
            "f",
            [
                f"data.shards={folder}",
                "data.crop=32",
                "data.num_workers=0",
                f"data.on_bad_sample={on_bad}",
                "train.steps=6",
            ],
        )
        loader = make_train_loader(
            cfg, pairs, global_batch=4, accum=1, world=1, rank=0, start_step=0, device="cpu", loader="torch"
        )
        if on_bad == "error":
            with pytest.raises(DataError, match=key):
                for _ in range(6):  # two epochs of 12 pairs: the bad one is drawn
                    next(loader)
        else:
            for _ in range(6):
                next(loader)
            assert loader.skipped_runtime == 2  # drawn once per epoch, replaced each time


def test_open_pairs_decodes_the_first_pairs_so_corrupt_validation_frames_are_found_at_start_up(shards, tmp_path):
    """open_pairs(decoded=N) decodes the split's first N pairs (the trainer's validation frames: val.max_pairs):
    error names the corrupt one; skip leaves it out, counts it, and the next pair takes its place."""
    folder, key = broken_shards(shards, tmp_path / "s", "corrupt_data")  # pair 5 of 12 (0-based)
    with pytest.raises(DataError) as caught:
        open_pairs(folder, "train", "error", decoded=8)
    assert f"shard {folder / SHARD} sample {key}" in str(caught.value), caught.value
    assert len(open_pairs(folder, "train", "error", decoded=5)) == 12  # pairs 0-4 only: the bad one not decoded
    pairs = open_pairs(folder, "train", "skip", decoded=8)
    assert [b.key for b in pairs.checked.bad] == [key] and len(pairs) == 11
    assert key not in [ref.key for ref in pairs.refs]


@pytest.mark.slow
def test_a_frame_that_fails_in_the_evaluation_worker_is_named_without_the_workers_traceback(shards, tmp_path):
    """evaluate_pairs decodes frames in a DataLoader worker, which wraps an error in its traceback: the
    DataError that reaches validation or golf-evaluate carries the sample's message alone."""
    import torch

    from golf_dist.evaluation.validation import evaluate_pairs

    folder, key = broken_shards(shards, tmp_path / "s", "corrupt_data")  # pair 5 of 12
    with pytest.raises(DataError) as caught:
        evaluate_pairs(
            torch.nn.Identity(), None, ShardPairs(folder, "train"), 0, torch.device("cpu"), limit=8, with_ssim=False
        )
    message = str(caught.value)
    assert message.startswith(f"shard {folder / SHARD} sample {key}") and "Traceback" not in message, message


def test_corrupt_data_dali_stops_naming_the_sample(shards, tmp_path):
    folder, key = broken_shards(shards, tmp_path / "s", "corrupt_data")
    loader = DaliTrainLoader(
        check_split(folder, "train", "skip"),
        crop=32,
        flips=False,
        crops_per_frame=1,
        per_device=4,
        rank=0,
        world=1,
        seed=0,
        device="cpu",
        num_threads=1,
    )
    with pytest.raises(DataError) as caught:
        for _ in range(6):
            next(loader)
    assert key in str(caught.value) and str(folder / SHARD) in str(caught.value)


@pytest.mark.slow
def test_a_run_that_fails_mid_training_ends_its_mlflow_run_as_failed(shards, tmp_path):
    """Corrupt data found only when decoded stops training after the tracking run has started; the trainer's
    close() ends that run FAILED instead of leaving it RUNNING in the MLflow UI."""
    from mlflow.tracking import MlflowClient

    folder, key = broken_shards(shards, tmp_path / "s", "corrupt_data")
    cfg = write_config(
        tmp_path / "c.yaml",
        folder,
        tmp_path / "out",
        data={"loader": "torch", "on_bad_sample": "error", "num_workers": 0},
        train={"steps": 8, "log_every": 2, "val_every": 100, "checkpoint_every": 100},
    )
    proc = run_cli("launch/train.py", "--config", cfg, "--stage", "f")
    assert proc.returncode == 1 and key in proc.stderr, proc.stdout + proc.stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("golf-test").experiment_id])
    assert run.info.status == "FAILED"


def test_evaluation_checks_its_split_at_start_up_like_validation(small_run, shards, tmp_path):
    """golf-evaluate runs the validation split's start-up check on the split it evaluates: with the run's
    data.on_bad_sample=error a frame corrupt behind a good header stops it before any network runs, naming the
    shard and the sample, nothing written; with skip the pair is left out, the next takes its place, and the
    result and MLflow count it."""
    import json

    out = tmp_path / "out"
    shutil.copytree(small_run["out"], out, ignore=shutil.ignore_patterns("checkpoints", "evaluation*.json"))
    folder, key = broken_shards(shards, tmp_path / "s", "corrupt_data")  # pair 5 of the 12 training pairs
    args = (
        "launch/evaluate.py",
        "--output-dir",
        out,
        "--shards",
        folder,
        "--split",
        "train",
        "--limit",
        "8",
        "--iterations",
        "1",
    )
    stopped = run_cli(*args)
    assert stopped.returncode != 0
    error = stopped.stderr.strip().splitlines()[-1]
    assert f"bad sample: shard {folder / SHARD} sample {key}" in error and "data.on_bad_sample=skip" in error, error
    assert "Traceback" not in stopped.stderr and not (out / "evaluation.json").exists()

    skipped = run_cli(*args, "data.on_bad_sample=skip", check=True)
    result = json.loads((out / "evaluation.json").read_text())
    assert result["pairs"] == 8 and result["bad_samples_skipped"] == 1, skipped.stdout[-2000:]
    import mlflow

    run = mlflow.MlflowClient(f"sqlite:///{small_run['db']}").get_run(result["mlflow_run_id"])
    assert run.data.metrics["test_bad_samples_skipped"] == 1.0
