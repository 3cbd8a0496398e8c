"""A damaged newest and a damaged oldest checkpoint: a run killed after its fourth checkpoint gets its newest
checkpoint damaged (a kind drawn by a seeded RNG: truncated weights, a zeroed optimizer file, a deleted RNG
file, a state.json that is not an object) and its oldest state.json truncated. The rerun must warn, fall
back to the previous whole checkpoint, go on and end bitwise equal to an uninterrupted run."""

from __future__ import annotations

import json
import random
import time

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


def test_damaged_newest_and_oldest_checkpoints(forkserver, references, tmp_path, record):
    record.expect(FAULT, "training run, stage f (torch)")
    rng = random.Random("damaged-checkpoints")
    kind = rng.choice(["truncated weights", "zeroed optimizer file", "deleted RNG file", "state.json not an object"])
    ref = references.get("torch", "f")
    out = tmp_path / "out"
    cfg = train_config(tmp_path / "cfg.yaml", references.shards, out,
                       train={"keep_last": 4, "checkpoint_every": 1})  # neither changes the weights: the reference holds
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
    assert names[:3] == ["step-00000001", "step-00000002", "step-00000003"] and not (out / "f.safetensors").exists(), names
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
        record(FAULT, "training run, stage f (torch)", 2, "data lost",
               f"newest: {kind}, oldest: truncated state.json; differs from an uninterrupted run: {diffs}; "
               f"temporaries: {left}")
    record(FAULT, "training run, stage f (torch)", 2, "identical",
           f"newest ({names[-1]}): {kind}, oldest ({names[0]}): truncated state.json; both reported, resumed from "
           f"{previous.name}, ended bitwise equal to an uninterrupted run")
