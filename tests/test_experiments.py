"""The paper's experiments as commands (golf_dist/experiments/): each at a tiny size, its numbers checked
against what the experiment is about, its figure and JSON written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_cli

from golf_dist.experiments import two_pixel


def test_the_toy_networks_have_table_6s_96_parameters():
    assert sum(p.numel() for p in two_pixel.mlp().parameters()) == two_pixel.TABLE6_PARAMETERS == 96


def test_blurred_points_and_their_mirror_images():
    u = two_pixel.blurred_points(500, torch.Generator().manual_seed(0))
    assert (u.sum(dim=1) <= 0).all() and (u.abs() <= 1).all()
    truth = two_pixel.mirror(u)
    assert torch.allclose(truth.sum(dim=1), -u.sum(dim=1)) and torch.equal(two_pixel.mirror(truth), u)
    # the optimal prior's gradient step lands on the ground truth: u - grad p*(u) = u - (u1 + u2)(1, 1)
    assert torch.allclose(u - u.sum(dim=1, keepdim=True), truth)


def test_integrating_the_optimal_gradient_gives_the_optimal_prior():
    """integrate_prior on f(u) = -grad p*(u) reproduces p* = (u1 + u2)^2 / 2 (trapezoids are exact on it
    up to the grid's second-order error)."""

    def optimal_update(u):
        return -u.sum(dim=1, keepdim=True).expand(-1, 2)

    grid = np.linspace(-1, 1, 41)
    u1, u2 = np.meshgrid(grid, grid, indexing="xy")
    assert np.abs(two_pixel.integrate_prior(optimal_update, grid) - 0.5 * (u1 + u2) ** 2).max() < 2e-3


@pytest.mark.slow
def test_toy_accuracy_and_the_two_mses_at_a_small_size():
    """The classifier separates blurred from sharp; the learned gradient restores far better than a step
    along the classifier's gradient does (seed 0 at this size: accuracy 0.99, MSEs 1.0 and 0.002)."""
    metrics = two_pixel.run_seed(0, two_pixel.ToyConfig(train_pairs=400, test_points=200, steps=800))["metrics"]
    assert metrics["accuracy"] > 0.95
    assert not metrics["gradient_prior_dead"]
    assert metrics["mse_gradient_learning"] < 0.01 * metrics["mse_input"]
    assert metrics["mse_ratio"] > 50 and metrics["mse_discriminative_best_step"] > 0.5 * metrics["mse_input"]


@pytest.mark.slow
def test_two_pixel_command_writes_its_figure_json_and_run(tmp_path):
    out = tmp_path / "toy"
    proc = run_cli(
        "launch/experiment.py",
        "two-pixel",
        "--out",
        out,
        "--seeds",
        "0",
        "3",
        "--train-pairs",
        "400",
        "--test-points",
        "200",
        "--steps",
        "800",
        check=True,
    )
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    result = json.loads((out / "two_pixel.json").read_text())
    assert [row["seed"] for row in result["seeds"]] == [0, 3]
    assert summary["median"]["mse_gradient_learning"] == result["median"]["mse_gradient_learning"] < 0.01
    assert (out / "two_pixel.png").stat().st_size > 20_000
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("golf-paper").experiment_id])[0]
    assert run.data.tags["golf.experiment"] == "two-pixel" and "median_mse_gradient_learning" in run.data.metrics
    bad = run_cli("launch/experiment.py", "two-pixel", "--out", tmp_path / "bad", "--steps", "0")
    assert bad.returncode == 2 and "--steps" in bad.stderr and not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_forgetting_command_runs_the_four_schedules(shards, tmp_path):
    """Figure 5 at a tiny size: four schedules, each validated at its start, its phase change and its end."""
    out = tmp_path / "forgetting"
    run_cli(
        "launch/experiment.py",
        "forgetting",
        "--out",
        out,
        "--shards",
        shards,
        "--steps-per-phase",
        "2",
        "--val-every",
        "2",
        "--crop",
        "32",
        "--batch",
        "2",
        "--train-pairs",
        "4",
        "--val-crops",
        "2",
        "--no-tracking",
        check=True,
    )
    result = json.loads((out / "forgetting.json").read_text())
    assert len(result["curves"]) == 4
    for curve in result["curves"].values():
        assert curve["step"] == [0, 2, 4] and len(curve["task1_psnr"]) == len(curve["task2_gain"]) == 3
        assert all(np.isfinite(curve["task1_psnr"])) and all(np.isfinite(curve["task2_gain"]))
    # the schedules share their first phase where their first task is the same: same weights, same stream
    b, c = result["curves"]["b: task 2 alone"], result["curves"]["c: task 2 then task 1"]
    assert b["task2_gain"][:2] == c["task2_gain"][:2]
    assert (out / "forgetting.png").stat().st_size > 20_000


@pytest.mark.slow
def test_g_convergence_command(small_run, shards, tmp_path):
    out = tmp_path / "conv"
    proc = run_cli(
        "launch/experiment.py",
        "g-convergence",
        "--output-dir",
        small_run["out"],
        "--shards",
        shards,
        "--iterations",
        "5",
        "--limit",
        "1",
        "--out",
        out,
        check=True,
    )
    result = json.loads((out / "g_convergence.json").read_text())
    assert len(result["psnr_per_iteration"]) == 6 and len(result["change_per_iteration"]) == 5
    assert json.loads(proc.stdout.strip().splitlines()[-1])["best_iteration"] == result["best_iteration"]
    from PIL import Image

    plotted = json.loads(Image.open(out / "g_convergence.png").info["golf:series"])
    assert plotted["iterations"] == list(range(6))


@pytest.mark.slow
def test_lambda_sweep_trains_one_f_per_weight_with_a_vgg_file_made_here(shards, tmp_path):
    """The harness with a VGG-11-BN file in torchvision's layout (random values, made here): one F per lambda,
    each scored; without the file it stops before any training, saying where the file goes."""
    from conftest import write_config

    from golf_dist.losses import VGG_WEIGHTS_FILE, VGGFeatures

    cfg = write_config(
        tmp_path / "c.yaml", shards, tmp_path / "unused", train={"steps": 2, "val_every": 2, "checkpoint_every": 2}
    )
    missing = run_cli(
        "launch/experiment.py",
        "lambda-sweep",
        "--config",
        cfg,
        "--out",
        tmp_path / "none",
        "--lambdas",
        "0",
        "1e-3",
        env={"TORCH_HOME": str(tmp_path / "empty_home")},
    )
    assert missing.returncode == 1 and VGG_WEIGHTS_FILE in missing.stderr and not (tmp_path / "none").exists()

    weights = tmp_path / "vgg.pth"
    torch.manual_seed(0)
    torch.save(VGGFeatures().state_dict(), weights)
    out = tmp_path / "sweep"
    run_cli(
        "launch/experiment.py",
        "lambda-sweep",
        "--config",
        cfg,
        "--out",
        out,
        "--lambdas",
        "0",
        "1e-3",
        "--limit",
        "1",
        f"loss.vgg_weights={weights}",
        check=True,
    )
    rows = json.loads((out / "lambda_sweep.json").read_text())["rows"]
    assert [row["lambda"] for row in rows] == [0.0, 1e-3] and all(np.isfinite(row["psnr"]) for row in rows)
    assert rows[0]["psnr"] != rows[1]["psnr"]  # the perceptual term changed what F learnt
    assert (out / "lambda_0" / "f.safetensors").is_file() and (out / "lambda_0.001" / "f.safetensors").is_file()
    assert (out / "lambda_sweep.png").stat().st_size > 10_000


def test_forgetting_crop_bank_cuts_paired_windows_and_refuses_frames_smaller_than_the_crop(shards):
    """The fast loop's unit of golf_dist.experiments.forgetting (its command runs in the slow test above)."""
    from golf_dist.errors import DataError
    from golf_dist.experiments.forgetting import CropBank

    bank = CropBank(str(shards), "train", pairs=3, crop=32)
    blur, sharp = bank.sample(5, np.random.default_rng(0))
    assert blur.shape == sharp.shape == (5, 3, 32, 32) and len(bank.frames) == 3
    again, _ = bank.sample(5, np.random.default_rng(0))
    assert torch.equal(blur, again) and not torch.equal(blur, sharp)
    with pytest.raises(DataError, match="smaller than the 128-pixel crop"):
        CropBank(str(shards), "train", pairs=1, crop=128)


def test_lambda_sweep_and_convergence_refuse_what_they_cannot_run(shards, tmp_path):
    """The fast loop's units of golf_dist.experiments.lambda_sweep and .convergence: bad input named, nothing run."""
    from golf_dist.errors import ConfigError, DataError
    from golf_dist.experiments import convergence, lambda_sweep

    with pytest.raises(ConfigError, match="--lambdas must be 0 or more"):
        lambda_sweep.run_experiment("demo", [], [0.0, -1.0], tmp_path / "sweep", None, None)
    assert not (tmp_path / "sweep").exists()
    with pytest.raises(DataError, match="no trained F at"):
        convergence.run_experiment(tmp_path / "untrained", str(shards), 2, tmp_path / "out", 1, None)
