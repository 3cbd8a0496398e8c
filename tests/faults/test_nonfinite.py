"""Non-finite steps, injected through config and data, never through a test hook: a learning rate that diverges
(train.lr=1e6: steps 1 and 2 are finite, step 3's loss is Inf) for stage f, and an F whose weights hold a NaN
for stage g (every step's loss is NaN). Pixels cannot carry an Inf: every shard format decodes to uint8
(golf_dist/data/formats.py). A NaN/Inf step must never reach the weights, Adam, the EMA, a checkpoint or the
export: skipped and counted (train.nonfinite=skip), or a named error (stop, or nonfinite_patience in a row),
after which the last checkpoint is whole and resumes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from golf_dist.checkpoints import load_weights

from .conftest import leftovers, tensors_of, train_argv, train_config

# constant: the lr of steps 1 and 2 does not depend on train.steps, so a 2-step run is the reference of them
DIVERGING = ("train.lr=1e6", "train.schedule=constant", "train.ema_decay=0.9", "data.loader=torch")


def _skipped_per_step(metrics) -> dict[int, float]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return {r["step"]: r["nonfinite_steps_skipped"] for r in rows if "nonfinite_steps_skipped" in r}


def _assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{what}: {different[:3]}"
    assert all(torch.isfinite(v).all() for v in a.values() if v.is_floating_point()), f"{what}: not finite"


@pytest.mark.slow
def test_diverging_lr_stops_named_and_the_last_checkpoint_resumes_skipping(forkserver, references, tmp_path, record):
    record.expect("non-finite steps: a diverging learning rate", "training run, stage f (torch)")
    out, ref_out = tmp_path / "out", tmp_path / "ref" / "out"
    cfg = train_config(tmp_path / "cfg.yaml", references.shards, out)
    ref_cfg = train_config(tmp_path / "ref" / "cfg.yaml", references.shards, ref_out)
    reference = forkserver.run(train_argv(ref_cfg, "f", *DIVERGING, "train.steps=2"), tmp_path / "ref-run")
    stopped = forkserver.run(train_argv(cfg, "f", *DIVERGING, "train.nonfinite=stop"), tmp_path / "stopped")
    reference.check()
    assert stopped.wait() == 1, stopped.stderr[-3000:]
    error = stopped.stderr.strip().splitlines()[-1]
    assert error.startswith("error: step 3: the loss") and "train.nonfinite=stop" in error, error
    assert "Traceback" not in stopped.stderr
    ckpts = out / "f" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002"] and not (out / "f.safetensors").exists()
    assert not leftovers(out)
    step2, ref_step2 = ckpts / "step-00000002", ref_out / "f" / "checkpoints" / "step-00000002"
    # the checkpoint before the Inf step is whole: bitwise what a run that ended at step 2 wrote
    tensors2, ema2 = tensors_of(step2), load_file(str(step2 / "ema.safetensors"))  # kept: the resume prunes step 2
    _assert_same(tensors2, tensors_of(ref_step2), "step 2's weights and Adam")
    _assert_same(ema2, load_file(str(ref_step2 / "ema.safetensors")), "step 2's EMA")
    record(
        "non-finite steps: a diverging learning rate, train.nonfinite=stop",
        "training run, stage f (torch)",
        1,
        "named error",
        f"{error[len('error: ') :][:90]}...; checkpoint step 2 bitwise that of a 2-step run",
    )

    # resumed with the default train.nonfinite=skip: steps 3 to 6 are all Inf/NaN, each skipped (4 < patience 10)
    resumed = forkserver.run(train_argv(cfg, "f", *DIVERGING), tmp_path / "resumed").check()
    assert "resuming stage f from" in resumed.stdout
    assert _skipped_per_step(out / "f" / "metrics.jsonl") == {1: 0, 2: 0, 3: 1, 4: 1, 5: 1, 6: 1}
    step6 = ckpts / "step-00000006"
    _assert_same(tensors_of(step6), tensors2, "step 6's weights and Adam against step 2's")
    _assert_same(load_file(str(step6 / "ema.safetensors")), ema2, "step 6's EMA against step 2's")
    _assert_same(load_file(str(out / "f.safetensors")), ema2, "the export (the EMA) against step 2's EMA")
    record(
        "non-finite steps: skipped (train.nonfinite=skip)",
        "training run, stage f (torch), resumed",
        4,
        "identical",
        "steps 3-6 skipped and counted (nonfinite_steps_skipped); weights, Adam, EMA and export bitwise step 2's",
    )


@pytest.mark.slow
def test_nan_in_f_skips_g_steps_then_stops_after_the_patience(forkserver, references, tmp_path, record):
    record.expect("non-finite steps: an F with a NaN weight", "training run, stage g (torch)")
    f_weights = load_weights(references.f_weights())
    first = next(iter(f_weights))
    f_weights[first] = f_weights[first].clone()
    f_weights[first].view(-1)[0] = float("nan")
    nan_f = tmp_path / "f-nan.safetensors"
    save_file(f_weights, str(nan_f))
    out = tmp_path / "out"
    cfg = train_config(tmp_path / "cfg.yaml", references.shards, out)
    run = forkserver.run(
        train_argv(cfg, "g", "data.loader=torch", f"train.f_weights={nan_f}", "train.nonfinite_patience=3"),
        tmp_path / "run",
    )
    assert run.wait() == 1, run.stderr[-3000:]
    error = run.stderr.strip().splitlines()[-1]
    assert error.startswith("error: step 3:") and "3 non-finite steps in a row" in error, error
    assert "train.nonfinite_patience=3" in error and "Traceback" not in run.stderr
    assert _skipped_per_step(out / "g" / "metrics.jsonl") == {1: 1, 2: 1}
    ckpts = out / "g" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002"] and not (out / "g.safetensors").exists()
    # two steps skipped before it: Adam never stepped, the weights are the finite initial ones
    optimizer = torch.load(ckpts / "step-00000002" / "optimizer.pt", map_location="cpu", weights_only=True)
    assert optimizer["optimizer"]["state"] == {}
    weights = load_file(str(ckpts / "step-00000002" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    record(
        "non-finite steps: an F with a NaN weight (stage g loss NaN at every step)",
        "training run, stage g (torch)",
        3,
        "named error",
        "steps 1-2 skipped and counted, stopped at step 3 (train.nonfinite_patience=3); "
        "checkpoint step 2 finite, Adam never stepped",
    )
