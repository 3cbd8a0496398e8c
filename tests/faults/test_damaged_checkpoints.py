"""A damaged newest and a damaged oldest checkpoint: a run killed after its fourth checkpoint gets its newest
checkpoint damaged (a kind drawn by a seeded RNG: truncated weights, a zeroed optimizer file, a deleted RNG
file, a state.json that is not an object) and its oldest state.json truncated. The rerun must warn, fall
back to the previous whole checkpoint, go on and end bitwise equal to an uninterrupted run."""

from __future__ import annotations

import json
import random
import time

import pytest
from conftest import TINY_DATA, run_cli, write_config  # tests/conftest.py

from .conftest import differences, leftovers, train_argv, train_config
from .test_kill_training import line_count, logged_steps

FAULT = "damaged checkpoints (newest and oldest)"


def _damage(step_dir, kind: str) -> None:
    if kind == "truncated weights":
        model = step_dir / "model.safetensors"
        model.write_bytes(model.read_bytes()[: model.stat().st_size // 3])
    elif kind == "zeroed optimizer file":
        opt = step_dir / "optimizer.pt"
        opt.write_bytes(b"\0" * opt.stat().st_size)
    elif kind == "deleted RNG file":
        (step_dir / "rng.pt").unlink()
    elif kind == "state.json not an object":
        (step_dir / "state.json").write_text(json.dumps([1, 2, 3]))
    else:
        raise ValueError(kind)


@pytest.mark.slow
def test_damaged_newest_and_oldest_checkpoints(forkserver, references, tmp_path, record):
    record.expect(FAULT, "training run, stage f (torch)")
    rng = random.Random("damaged-checkpoints")
    kind = rng.choice(["truncated weights", "zeroed optimizer file", "deleted RNG file", "state.json not an object"])
    ref = references.get("torch", "f")
    out = tmp_path / "out"
    cfg = train_config(
        tmp_path / "cfg.yaml", references.shards, out, train={"keep_last": 4, "checkpoint_every": 1}
    )  # neither changes the weights: the reference holds
    argv = train_argv(cfg, "f", *references.overrides("torch", "f"))
    metrics = out / "f" / "metrics.jsonl"
    run = forkserver.run(argv, tmp_path / "killed")
    before = line_count(metrics)
    deadline = time.monotonic() + 240
    while not (steps := logged_steps(metrics, before)) or steps[-1] < 4:  # checkpoints 1, 2 and 3 are there
        assert run.running(), f"the run ended before step 4:\n{run.stderr[-3000:]}"
        assert time.monotonic() < deadline, "no step 4 in 240 s"
        time.sleep(0.005)
    run.kill()
    ckpts = out / "f" / "checkpoints"
    names = sorted(p.name for p in ckpts.glob("step-*"))
    assert names[:3] == ["step-00000001", "step-00000002", "step-00000003"] and not (out / "f.safetensors").exists(), (
        names
    )
    newest, oldest = ckpts / names[-1], ckpts / names[0]
    _damage(newest, kind)
    state = oldest / "state.json"
    state.write_text(state.read_text()[:20])  # truncated: not JSON
    record.injections = 2

    again = forkserver.run(argv, tmp_path / "again")
    rc = again.wait()
    assert rc == 0, f"the rerun stopped ({rc}):\n{again.stderr[-3000:]}"
    previous = ckpts / names[-2]
    assert f"resuming stage f from {previous}" in again.stdout, again.stdout[-2000:]
    assert newest.name in again.stderr and "falling back" in again.stderr, again.stderr[-3000:]
    assert oldest.name in again.stderr, "the damaged oldest checkpoint was not reported"
    diffs, left = differences(ref, out, "f"), leftovers(out)
    if diffs or left:
        record(
            FAULT,
            "training run, stage f (torch)",
            2,
            "data lost",
            f"newest: {kind}, oldest: truncated state.json; differs from an uninterrupted run: {diffs}; "
            f"temporaries: {left}",
        )
    record(
        FAULT,
        "training run, stage f (torch)",
        2,
        "identical",
        f"newest ({names[-1]}): {kind}, oldest ({names[0]}): truncated state.json; both reported, resumed from "
        f"{previous.name}, ended bitwise equal to an uninterrupted run",
    )


REMOTE_FAULT = "a digest-less remote checkpoint"


@pytest.mark.slow
def test_a_digest_less_remote_checkpoint(tiny_shards, tmp_path, record):
    """A checkpoint uploaded by a run (tracking.log_checkpoints, a SQLite store), then its state.json's digests
    deleted in the artifact store (what anyone who can write the store can do to swap the weights unseen):
    train.resume_from=runs:/... must stop naming the file, write nothing, and go on only when told to
    (train.resume_unverified=true)."""
    target = "train.resume_from=runs:/ (SQLite store), stage f"
    record.expect(REMOTE_FAULT, target)
    small = {"checkpoint_every": 2, "val_every": 2, "log_every": 1, "keep_last": 1}
    cfg = write_config(
        tmp_path / "a.yaml",
        tiny_shards,
        tmp_path / "a",
        data=TINY_DATA,
        train={**small, "steps": 2},
        tracking={"log_checkpoints": True},
    )
    run_cli("launch/train.py", "--config", cfg, "--stage", "f", check=True)
    run_id = json.loads((tmp_path / "a" / "f_run.json").read_text())["mlflow_run_id"]
    [stored] = (tmp_path / "mlartifacts").glob(f"{run_id}/artifacts/checkpoints/step-00000002/state.json")
    state = json.loads(stored.read_text())
    del state["file_sha256"]
    stored.write_text(json.dumps(state))
    record.injections = 1

    uri = f"runs:/{run_id}/checkpoints/step-00000002"
    cfg = write_config(tmp_path / "b.yaml", tiny_shards, tmp_path / "b", data=TINY_DATA, train={**small, "steps": 4})
    argv = ("launch/train.py", "--config", cfg, "--stage", "f", f"train.resume_from={uri}")
    proc = run_cli(*argv)
    last = (proc.stderr.strip().splitlines() or [""])[-1]
    written = [p.name for p in (tmp_path / "b").rglob("*") if p.name.startswith(("step-", "f.safetensors", ".resume-"))]
    if proc.returncode == 0 or written:
        record(
            REMOTE_FAULT,
            target,
            1,
            "data lost",
            f"exit {proc.returncode}, resumed from a checkpoint nothing verifies or left {written}: {last}",
        )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert last.startswith(
        f"error: train.resume_from={uri}: checkpoint file {uri}/state.json records no file_sha256"
    ), last

    again = run_cli(*argv, "train.resume_unverified=true")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming stage f from {uri} (step 2 of 4)" in again.stdout and "records no sha256" in again.stderr
    record(
        REMOTE_FAULT,
        target,
        1,
        "named error",
        f"exit 1 naming {uri}/state.json, nothing written; with train.resume_unverified=true the same command "
        "resumed (one warning) and finished",
    )
