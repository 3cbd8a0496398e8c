"""The training recipe (warm-up, schedules, clipping, EMA), the overfit-one-batch check, the two loaders'
streams side by side, the evaluation's plots, and the recipe configs' checks."""

import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, run_cli, start_cli, wait_for_first_checkpoint, write_config
from PIL import Image
from safetensors.torch import load_file

from golf_dist.config import load_config
from golf_dist.errors import ConfigError
from golf_dist.training.optim import EMA, clip_gradients, lr_factor

# ---- schedules ---------------------------------------------------------------------------------------


def test_warmup_is_linear_then_the_schedule_starts_at_one():
    # LambdaLR's step s is the lr of optimizer step s + 1: step 1 gets 1/warmup, step `warmup` the full lr
    assert [lr_factor(s, 100, warmup=4, schedule="constant") for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    for schedule in ("exp", "cosine", "constant"):
        assert lr_factor(4, 100, 0.3, 11, warmup=4, schedule=schedule) == pytest.approx(1.0)


def test_each_schedule_at_known_steps():
    # exp without warm-up is the paper's gamma ** (decays * step / steps)
    assert lr_factor(50, 100, 0.3, 11, schedule="exp") == pytest.approx(0.3**5.5)
    assert lr_factor(100, 100, 0.3, 11, schedule="exp") == pytest.approx(0.3**11)
    # with warm-up the decay runs over the remaining steps
    assert lr_factor(60, 110, 0.3, 2, warmup=10, schedule="exp") == pytest.approx(0.3**1)
    assert lr_factor(0, 100, schedule="cosine") == pytest.approx(1.0)
    assert lr_factor(50, 100, schedule="cosine") == pytest.approx(0.5)
    assert lr_factor(25, 100, schedule="cosine") == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    assert lr_factor(100, 100, schedule="cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(77, 100, schedule="constant") == 1.0
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor(1, 10, schedule="linear")


# ---- clipping and EMA --------------------------------------------------------------------------------


def _with_grads(values):
    params = [torch.nn.Parameter(torch.zeros(len(v))) for v in values]
    for p, v in zip(params, values):
        p.grad = torch.tensor(v)
    return params


def test_clipping_caps_the_norm_it_reports():
    params = _with_grads([[3.0, 0.0], [0.0, 4.0]])  # global norm 5
    norm = clip_gradients(params, 1.0)
    assert norm.item() == pytest.approx(5.0)  # the norm before clipping
    after = torch.cat([p.grad for p in params]).norm().item()
    assert after == pytest.approx(1.0, rel=1e-5)
    assert torch.allclose(torch.cat([p.grad for p in params]), torch.tensor([0.6, 0.0, 0.0, 0.8]), atol=1e-6)


def test_clipping_off_measures_and_leaves_the_gradients():
    params = _with_grads([[3.0, 0.0], [0.0, 4.0]])
    assert clip_gradients(params, 0.0).item() == pytest.approx(5.0)
    assert torch.equal(torch.cat([p.grad for p in params]), torch.tensor([3.0, 0.0, 0.0, 4.0]))
    params = _with_grads([[0.3, 0.4]])  # below the cap: untouched
    assert clip_gradients(params, 1.0).item() == pytest.approx(0.5)
    assert torch.allclose(params[0].grad, torch.tensor([0.3, 0.4]))


def test_ema_arithmetic():
    net = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema = EMA(net, 0.9)
    expected = 0.0
    for n, value in enumerate([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0] * 3, start=1):
        with torch.no_grad():
            net.weight.fill_(value)
        ema.update(net)
        d = min(0.9, (1 + n) / (10 + n))  # the decay's warm-up, then the configured decay
        expected = d * expected + (1 - d) * value
        assert ema.module.weight.item() == pytest.approx(expected, rel=1e-6)
    assert ema.decay_at(1) == pytest.approx(2 / 11) and ema.decay_at(1000) == 0.9
    assert not ema.module.weight.requires_grad and net.weight.item() == 10.0  # the trained weights untouched


# ---- the configs --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value",
    [
        ("train.warmup_steps", "500"),  # more than train.steps
        ("train.grad_clip", "-1"),
        ("train.ema_decay", "1.0"),
        ("train.ema_decay", "-0.1"),
        ("train.schedule", "linear"),
        ("train.unroll_weighting", "quadratic"),
    ],
)
def test_bad_recipe_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(ROOT / "configs/demo.yaml", "f", [f"{key}={value}", "train.steps=400"])


def test_a_bad_recipe_value_stops_the_trainer_before_any_work(shards, tmp_path):
    store = tmp_path / "store" / "mlflow.db"  # not the suite's pre-made store: none must appear
    store.parent.mkdir()
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "out", tracking={"uri": f"sqlite:///{store}"})
    proc = run_cli("launch/train.py", "--config", cfg, "--stage", "f", "train.warmup_steps=6")
    assert proc.returncode == 2 and "train.warmup_steps" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() and not store.exists()


@pytest.mark.parametrize("name", ["demo.yaml", "gpu_quick.yaml", "gopro.yaml"])
def test_recipe_configs_pass_the_checks(name):
    for stage in ("f", "g"):
        cfg = load_config(ROOT / "configs" / name, stage)
        assert cfg.train.warmup_steps < cfg.train.steps


# ---- overfit one batch --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_batch(shards):
    from golf_dist.data.crop_plan import CropPlan
    from golf_dist.data.torch_loader import ShardPairs, TrainCrops

    pairs = ShardPairs(shards, "train")
    crops = TrainCrops(pairs, CropPlan(len(pairs), 32, True, 0))
    items = [crops[i] for i in range(3)]
    return torch.stack([b for b, _, _ in items]), torch.stack([s for _, s, _ in items])


@pytest.mark.slow
@pytest.mark.parametrize("stage, steps", [("f", 150), ("g", 200)])
def test_overfit_one_batch(one_batch, stage, steps):
    """F, and G on a fixed F, bring the loss on one fixed batch down by 10x within a bounded number of steps
    (on the demo data, 4 crops of 32x32: F reaches 0.1 of its first loss by step 91, G by step 130)."""
    from golf_dist.evaluation.diagnostics import overfit_one_batch

    history = overfit_one_batch(stage, *one_batch, steps=steps, lr=1e-3, stop_below=0.1)
    assert history[0] > 1e-4  # a batch with something to learn (blurred differs from sharp)
    assert min(history) <= history[0] / 10, [round(h / history[0], 3) for h in history[:: steps // 10]]
    assert history[-1] <= history[0] / 10 and all(h > history[0] / 10 for h in history[:-1])  # stopped there


@pytest.mark.slow
def test_overfit_command_reports_pass(shards, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "out")
    # the command's plumbing (the 10x check itself is test_overfit_one_batch): pass at a 2x target ...
    proc = run_cli(
        "launch/diagnose.py",
        "overfit",
        "--config",
        cfg,
        "--stage",
        "f",
        "--steps",
        "40",
        "--batch",
        "2",
        "--factor",
        "2",
        check=True,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["reached_at"] is not None and result["last"] < result["first"] / 2
    # ... and exit 1 saying so when the target is out of reach
    proc = run_cli(
        "launch/diagnose.py",
        "overfit",
        "--config",
        cfg,
        "--stage",
        "f",
        "--steps",
        "3",
        "--batch",
        "2",
        "--factor",
        "1000",
    )
    assert proc.returncode == 1 and "did NOT fall 1000x" in proc.stdout


# ---- the two loaders' streams ------------------------------------------------------------------------


def test_dali_and_torch_streams_are_the_same_stream(shards, tmp_path):
    """The first 24 training crops of each loader: every crop equals the crop of its source pair (decoded by
    the shard reader) at its window; an epoch visits every one of the 12 pairs once; the two streams are one
    (equal digests), so their statistics agree."""
    cfg_path = write_config(tmp_path / "c.yaml", shards, tmp_path / "out", data={"num_workers": 1})
    proc = run_cli("launch/diagnose.py", "loaders", "--config", cfg_path, "--crops", "24", check=True)
    dali, torch_ = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (dali["loader"], torch_["loader"]) == ("dali", "torch")
    for row in (dali, torch_):
        assert row["crops"] == 24 and row["crops_not_matching_their_source"] == 0
        assert row["distinct_pairs"] == 12 == row["pairs_in_split"]
        assert row["aligned_share"] >= 0.75
    assert dali["stream_sha256"] == torch_["stream_sha256"]
    assert dali["blur_sharp_psnr"] == torch_["blur_sharp_psnr"] and dali["sharp_mean"] == torch_["sharp_mean"]


# ---- EMA in training: exports, checkpoints, exact resume ---------------------------------------------


EMA_TRAIN = {
    "steps": 16,
    "checkpoint_every": 4,
    "val_every": 8,
    "log_every": 4,
    "ema_decay": 0.9,
    "warmup_steps": 3,
    "schedule": "cosine",
    "grad_clip": 0.05,
}


LAUNCH_ENV = {"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}


def _torchrun(cfg, nproc):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(PYTHONUNBUFFERED="1", **LAUNCH_ENV)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        str(ROOT / "launch/train.py"),
        "--config",
        str(cfg),
        "--stage",
        "f",
    ]
    return cmd, env


def _run_to_end(cfg, nproc):
    if nproc == 1:
        return run_cli("launch/train.py", "--config", cfg, "--stage", "f", env=LAUNCH_ENV, check=True)
    cmd, env = _torchrun(cfg, nproc)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _kill_after_first_checkpoint(cfg, out, nproc):
    if nproc == 1:
        run = start_cli("launch/train.py", "--config", cfg, "--stage", "f", env=LAUNCH_ENV)
        wait_for_first_checkpoint(run, out / "f" / "checkpoints")
        run.kill()  # SIGKILL to its process group
    else:
        cmd, env = _torchrun(cfg, nproc)
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        wait_for_first_checkpoint(proc, out / "f" / "checkpoints")
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank, as a node failure would
        proc.wait()
    assert not (out / "f.safetensors").exists(), "the run finished before it was killed"


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_kill_and_resume_with_ema_is_bitwise_exact(shards, tmp_path, nproc):
    """With EMA, warm-up, cosine and clipping on, a run killed after its first checkpoint and started again
    ends with the same trained weights and the same EMA, bit for bit, as an uninterrupted one. The one-process
    run also has the speed layer's switches that promise exact resume forced on (channels_last and the fused
    InstanceNorm + ReLU, its PyTorch fallback on a CPU)."""
    sections = {"train": EMA_TRAIN, "data": {"loader": "torch"}}
    if nproc == 1:
        sections["speed"] = {"channels_last": "on", "fused_norm": "on"}
    ref = write_config(tmp_path / "ref.yaml", shards, tmp_path / "ref", **sections)
    _run_to_end(ref, nproc)
    cut_cfg = write_config(tmp_path / "cut.yaml", shards, tmp_path / "cut", **sections)
    _kill_after_first_checkpoint(cut_cfg, tmp_path / "cut", nproc)
    resumed = _run_to_end(cut_cfg, nproc)
    assert "resuming stage f from" in resumed.stdout
    for name in (
        "f.safetensors",
        "f/checkpoints/step-00000016/model.safetensors",
        "f/checkpoints/step-00000016/ema.safetensors",
    ):
        a, b = load_file(str(tmp_path / "ref" / name)), load_file(str(tmp_path / "cut" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    # the export is the EMA (what validation scored), not the last trained weights
    final = tmp_path / "ref" / "f/checkpoints/step-00000016"
    exported, ema, trained = (
        load_file(str(p))
        for p in (tmp_path / "ref" / "f.safetensors", final / "ema.safetensors", final / "model.safetensors")
    )
    assert all(torch.equal(exported[k], ema[k]) for k in ema)
    assert any(not torch.equal(ema[k], trained[k]) for k in ema)
    state = json.loads((final / "state.json").read_text())
    assert state["ema_updates"] == 16


def test_grad_norm_and_per_iteration_validation_are_logged(small_run):
    from golf_dist.evaluation.plots import read_metrics

    out = small_run["out"]
    f, g = read_metrics(out / "f" / "metrics.jsonl"), read_metrics(out / "g" / "metrics.jsonl")
    assert [s for s, _ in f["grad_norm"]] == [2, 4] and all(v > 0 for _, v in f["grad_norm"])
    assert all(mx >= mean for (_, mean), (_, mx) in zip(f["grad_norm"], f["grad_norm_max"]))
    assert "val_psnr_iter_0" in f and "val_psnr_iter_1" not in f
    # stage g: F alone (0) and each of max(unroll, eval.iterations) = 3 G iterations, each its own series
    assert {f"val_psnr_iter_{i}" for i in range(4)} <= set(g) and "val_psnr_iter_4" not in g
    # val_psnr is the PSNR after eval.iterations (2 in the test config)
    assert g["val_psnr"] == g["val_psnr_iter_2"]


# ---- evaluation figures ------------------------------------------------------------------------------


def test_evaluation_writes_the_iteration_plot_and_the_comparison(small_run):
    out = small_run["out"]
    result = json.loads((out / "evaluation.json").read_text())
    assert len(result["psnr_per_iteration"]) == 5
    plot = Image.open(out / "psnr_by_iteration.png")
    plotted = json.loads(plot.info["golf:series"])  # the points drawn, as the plot recorded them
    assert plotted["iterations"] == [0, 1, 2, 3, 4] and plotted["psnr"] == result["psnr_per_iteration"]
    comparison = Image.open(out / "comparison.png")
    assert comparison.width > 600 and comparison.height > 200
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{small_run['db']}")
    figures = {a.path for a in client.list_artifacts(result["mlflow_run_id"], "figures")}
    assert figures == {"figures/psnr_by_iteration.png", "figures/comparison.png"}
    series = client.get_metric_history(result["mlflow_run_id"], "test_psnr_by_iteration")
    assert [m.step for m in series] == [0, 1, 2, 3, 4]


def test_training_curves_figure(small_run, tmp_path):
    proc = run_cli("launch/diagnose.py", "curves", small_run["out"], "--out", tmp_path / "curves.png", check=True)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["runs"].keys() == {"out/f", "out/g"}
    assert Image.open(tmp_path / "curves.png").width > 800


def test_a_run_records_where_it_ran(small_run):
    """golf_dist.training.run_info: versions, git commit and topology as the run's params."""
    import torch
    from mlflow.tracking import MlflowClient

    run_id = json.loads((small_run["out"] / "f_run.json").read_text())["mlflow_run_id"]
    params = MlflowClient(tracking_uri=f"sqlite:///{small_run['db']}").get_run(run_id).data.params
    assert params["world_size"] == "1" and params["distributed_type"] == "NO"
    assert params["version.torch"] == torch.__version__ and len(params["git_commit"]) in (40, len("unknown"))


def test_gain_on_crops_and_frames_measures_each_iteration():
    """Identity G gains nothing anywhere; a G that halves its input loses more at each iteration."""
    import numpy as np

    from golf_dist.evaluation.diagnostics import gain_on_crops_and_frames

    rng = np.random.default_rng(0)
    sharp = rng.integers(60, 200, (40, 48, 3), dtype=np.uint8)
    frames = [(np.clip(sharp.astype(int) + rng.integers(-20, 20, sharp.shape), 0, 255).astype(np.uint8), sharp)]
    identity, halve = torch.nn.Identity(), torch.nn.Identity()
    halve.forward = lambda x: x * 0.5
    same = gain_on_crops_and_frames(identity, identity, frames, crop=32, iterations=3)
    assert same == {"crops": [0.0, 0.0, 0.0], "frames": [0.0, 0.0, 0.0]}
    worse = gain_on_crops_and_frames(identity, halve, frames, crop=32, iterations=3, crops_per_frame=2)
    for where in ("crops", "frames"):
        assert len(worse[where]) == 3 and 0 > worse[where][0] > worse[where][1] > worse[where][2], worse


def test_crops_command_on_a_trained_run(small_run, shards):
    proc = run_cli(
        "launch/diagnose.py",
        "crops",
        "--output-dir",
        small_run["out"],
        "--pairs",
        "2",
        "--crop",
        "32",
        "--crops-per-frame",
        "1",
        "--iterations",
        "2",
        check=True,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["pairs"] == 2 and len(result["crops"]) == len(result["frames"]) == 2
    assert all(math.isfinite(v) for v in result["crops"] + result["frames"])

    def headroom(*flags):  # 5x5 filters fitted on 4 training frames, scored on 2 test frames
        return run_cli(
            "launch/diagnose.py",
            "headroom",
            "--output-dir",
            small_run["out"],
            *("--train-pairs", "4", "--test-pairs", "2", "--samples", "500", "--kernel", "5"),
            *flags,
            check=True,
        )

    # the headroom instrument on the same run: the linear filter and G side by side
    proc = headroom("--iterations", "2", "--instance-norm")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["train_frames"] == 4 and result["test_frames"] == 2 and result["samples"] == 2000
    assert (
        len(result["g_gains"]) == 2
        and math.isfinite(result["linear_gain"])
        and math.isfinite(result["normalised_gain"])
    )
    assert "best linear 5x5 correction of F's output" in proc.stdout and "through an InstanceNorm" in proc.stdout

    # --on-input: the same fit on the blurred input itself (F the identity, no G), the linear baseline
    proc = headroom("--shards", shards, "--on-input")
    baseline = json.loads(proc.stdout.strip().splitlines()[-1])
    from golf_dist.data.torch_loader import ShardPairs
    from golf_dist.evaluation.diagnostics import linear_headroom

    train, test = ShardPairs(shards, "train"), ShardPairs(shards, "test")
    expected = linear_headroom(
        torch.nn.Identity(),
        None,
        [train.load(i)[:2] for i in range(4)],
        [test.load(i)[:2] for i in range(2)],
        kernel=5,
        samples_per_frame=500,
    )
    assert "g_gains" not in baseline and "correction of the blurred input" in proc.stdout
    assert baseline["linear_gain"] == pytest.approx(expected["linear_gain"], abs=1e-9)


def test_deblur_on_tiles_writes_the_whole_image(small_run, tmp_path):
    import numpy as np

    src = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(src)
    run_cli(
        "launch/deblur.py",
        "--output-dir",
        small_run["out"],
        src,
        "--out",
        tmp_path / "out",
        "--tile",
        "32",
        "--overlap",
        "8",
        check=True,
    )
    assert Image.open(tmp_path / "out" / "photo.png").size == (70, 50)
    bad = run_cli(
        "launch/deblur.py",
        "--output-dir",
        small_run["out"],
        src,
        "--out",
        tmp_path / "bad",
        "--tile",
        "32",
        "--overlap",
        "20",
    )
    assert bad.returncode == 2 and "--overlap" in bad.stderr and not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_gpu_recipe_runs_at_a_small_size_on_cpu(shards, tmp_path):
    """configs/gpu_quick.yaml as it is, shrunk by overrides only (crop, batch, steps, fp32): both stages train,
    with its warm-up, cosine schedule, EMA and two crops per decoded frame."""
    from safetensors import safe_open

    out = tmp_path / "gpu"
    small = [
        f"data.shards={shards}",
        f"output_dir={out}",
        "data.crop=32",
        "data.batch_size=4",
        "data.num_workers=0",
        "train.steps=3",
        "train.warmup_steps=1",
        "train.val_every=3",
        "train.checkpoint_every=3",
        "train.mixed_precision=no",
        "val.max_pairs=2",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    for stage in ("f", "g"):
        run_cli("launch/train.py", "--config", ROOT / "configs/gpu_quick.yaml", "--stage", stage, *small, check=True)
        with safe_open(str(out / f"{stage}.safetensors"), "pt") as weights:
            assert weights.metadata()["weights"] == "ema"
    resolved = (out / "g" / "config.yaml").read_text()
    assert "schedule: cosine" in resolved and "crops_per_frame: 2" in resolved and "ema_decay: 0.995" in resolved


def test_linear_headroom_finds_a_known_blur_and_nothing_where_there_is_none():
    """The headroom instrument on frames with a known answer: with F the identity and blur a 3x3 box filter of
    the sharp frame, a least-squares 7x7 filter undoes much of it (several dB); where the sharp frame differs
    from the blurred one by independent noise, nothing a filter of the blurred frame does predicts it."""
    from golf_dist.evaluation.diagnostics import linear_headroom

    rng = np.random.default_rng(0)

    def frame():
        sharp = rng.random((40, 48, 3))
        sharp = (sharp + np.roll(sharp, 1, 0) + np.roll(sharp, 1, 1)) / 3  # some structure between pixels
        padded = np.pad(sharp, ((1, 1), (1, 1), (0, 0)), mode="reflect")
        blur = sum(padded[dy : dy + 40, dx : dx + 48] for dy in range(3) for dx in range(3)) / 9
        return (blur * 255).round().astype(np.uint8), (sharp * 255).round().astype(np.uint8)

    train, test = [frame() for _ in range(4)], [frame() for _ in range(2)]
    identity = torch.nn.Identity()
    blurred = linear_headroom(identity, None, train, test, kernel=7, samples_per_frame=1500)
    assert blurred["linear_gain"] > 3.0, blurred
    assert blurred["samples"] == 4 * 1500 and "g_gains" not in blurred

    def noisy(pair):
        sharp = pair[1].astype(float) + rng.normal(0, 8, pair[1].shape)
        return pair[1], sharp.clip(0, 255).round().astype(np.uint8)

    unpredictable = linear_headroom(
        identity,
        identity,
        [noisy(p) for p in train],
        [noisy(p) for p in test],
        kernel=7,
        samples_per_frame=1500,
        iterations=2,
    )
    assert -0.5 < unpredictable["linear_gain"] < 0.05, unpredictable  # at most what fitting noise costs
    assert unpredictable["g_gains"] == [0.0, 0.0]  # an identity G changes nothing
    with pytest.raises(ValueError, match="odd"):
        linear_headroom(identity, None, train, test, kernel=4)


def test_headroom_through_an_instance_norm_loses_what_follows_each_frames_contrast():
    """`instance_norm=True` scores the filter's correction as an InstanceNorm leaves it (zero mean, unit deviation
    per frame and channel, one fitted factor per channel). Frames of one contrast lose nothing by it; frames
    whose contrasts differ tenfold lose much of the gain, as the correction's amplitude can no longer follow
    them."""
    from golf_dist.evaluation.diagnostics import linear_headroom

    rng = np.random.default_rng(1)

    def frame(contrast):
        sharp = rng.random((40, 48, 3))
        sharp = (sharp + np.roll(sharp, 1, 0) + np.roll(sharp, 1, 1)) / 3
        sharp = 0.5 + contrast * (sharp - 0.5)
        padded = np.pad(sharp, ((1, 1), (1, 1), (0, 0)), mode="reflect")
        blur = sum(padded[dy : dy + 40, dx : dx + 48] for dy in range(3) for dx in range(3)) / 9
        return (blur * 255).round().astype(np.uint8), (sharp * 255).round().astype(np.uint8)

    identity = torch.nn.Identity()
    same = linear_headroom(
        identity,
        None,
        [frame(1.0) for _ in range(4)],
        [frame(1.0) for _ in range(2)],
        kernel=7,
        samples_per_frame=1500,
        instance_norm=True,
    )
    assert same["normalised_gain"] > 0.9 * same["linear_gain"] > 2.7, same
    mixed = linear_headroom(
        identity,
        None,
        [frame(c) for c in (0.1, 1.0, 0.1, 1.0)],
        [frame(0.1), frame(1.0)],
        kernel=7,
        samples_per_frame=1500,
        instance_norm=True,
    )
    assert mixed["linear_gain"] > 2.0 and mixed["normalised_gain"] < mixed["linear_gain"] - 1.0, mixed
    assert "normalised_gain" not in linear_headroom(identity, None, [frame(1.0)], [frame(1.0)], kernel=3)
