"""The balance of the loss (the paper's Figure 8): F trained once per perceptual weight lambda of
L = L_c + lambda L_p, then scored on the test split, with one test region per lambda in one figure (blurred
input, each lambda's output, sharp). The paper: too little perceptual weight blurs, too much brings ghost
artefacts and wrong colours; it settles on lambda = 5e-6, which puts both terms in [1e-2, 1e-1].

It needs torchvision's ImageNet VGG-11-BN weights (vgg11_bn-6002323d.pth; nothing is downloaded here): the
check runs before any training, and the error says where the file goes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from golf_dist.config import load_config
from golf_dist.data.torch_loader import ShardPairs
from golf_dist.errors import ConfigError, DataError
from golf_dist.evaluation.validation import evaluate_pairs
from golf_dist.inference.engine import load_trained
from golf_dist.losses import find_vgg_weights, vgg_weights_missing_message
from golf_dist.training.trainer import train_stage


def run_experiment(
    config: str,
    overrides: list[str],
    lambdas: list[float],
    out: Path,
    limit: int | None,
    tracking_uri: str | None,
    experiment: str = "golf-paper",
) -> dict:
    from golf_dist.evaluation import plots
    from golf_dist.experiments import record

    if any(value < 0 for value in lambdas):
        raise ConfigError(f"--lambdas must be 0 or more, got {lambdas}")
    base = load_config(config, stage="f", overrides=overrides)
    if any(value > 0 for value in lambdas) and find_vgg_weights(base.loss.vgg_weights) is None:
        raise DataError(vgg_weights_missing_message())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tracking = [f"tracking.uri={tracking_uri}", f"tracking.experiment={experiment}"] if tracking_uri else []
    rows, frames = [], []
    for value in lambdas:
        run_dir = out / f"lambda_{value:g}"
        cfg = load_config(
            config,
            stage="f",
            overrides=[*overrides, *tracking, f"loss.perceptual_weight={value}", f"output_dir={run_dir}"],
        )
        trained = train_stage(cfg, "f")
        f, _ = load_trained(run_dir, torch.device("cpu"), 0)
        measured = evaluate_pairs(
            f, None, ShardPairs(cfg.data.shards, "test"), 0, torch.device("cpu"), limit=limit, keep_frames=1
        )
        rows.append(
            {
                "lambda": value,
                "psnr": measured["psnr"],
                "ssim": measured["ssim"],
                "input_psnr": measured["input_psnr"],
                "f_run_id": (trained or {}).get("mlflow_run_id"),
            }
        )
        frames.append({**measured["frames"][0], "label": f"lambda {value:g}"})
    figure = plots.lambda_sweep(frames, out / "lambda_sweep.png")
    result = {"config": str(config), "overrides": overrides, "rows": rows, "figure": str(figure)}
    params = {"config": str(config), "lambdas": ",".join(f"{v:g}" for v in lambdas)}
    metrics = (
        ({"lambda": row["lambda"], "test_psnr": row["psnr"], "test_ssim": row["ssim"]}, index)
        for index, row in enumerate(rows)
    )
    record("lambda-sweep", out, result, params, metrics, figure, tracking_uri, experiment)
    return result
