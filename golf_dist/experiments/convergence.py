"""G's convergence (the paper: F + G converges after 2 to 4 iterations): PSNR on the test split after F and
after each G iteration 1..N, N beyond what training unrolled, for a trained output folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from golf_dist.data.torch_loader import ShardPairs
from golf_dist.evaluation.validation import evaluate_pairs
from golf_dist.inference.engine import load_trained


def run_experiment(
    output_dir: Path,
    shards: str,
    iterations: int,
    out: Path,
    limit: int | None,
    tracking_uri: str | None,
    experiment: str = "golf-paper",
) -> dict:
    from golf_dist.evaluation import plots
    from golf_dist.experiments import record

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    f, g = load_trained(Path(output_dir), device, iterations)
    measured = evaluate_pairs(
        f, g, ShardPairs(shards, "test"), iterations, device, limit=limit, with_ssim=False, progress=True
    )
    series = measured["psnr_per_iteration"]
    changes = np.diff(series).tolist()
    result = {
        "output_dir": str(output_dir),
        "shards": str(shards),
        "pairs": measured["pairs"],
        "input_psnr": measured["input_psnr"],
        "psnr_per_iteration": series,
        "change_per_iteration": changes,
        "best_iteration": int(np.argmax(series)),
        # the first iteration after which no later one moves PSNR by 0.01 dB or more
        "settled_after": next((i for i in range(len(changes) + 1) if all(abs(c) < 0.01 for c in changes[i:])), None),
    }
    figure = plots.psnr_by_iteration(
        series,
        measured["input_psnr"],
        out / "g_convergence.png",
        title=f"{measured['pairs']} test pairs of {Path(output_dir).name}: PSNR against G iteration 0..{iterations}",
    )
    result["figure"] = str(figure)
    params = {
        "output_dir": str(Path(output_dir).resolve()),
        "shards": str(shards),
        "iterations": iterations,
        "pairs": measured["pairs"],
    }
    record(
        "g-convergence",
        out,
        result,
        params,
        (({"test_psnr_by_iteration": value}, i) for i, value in enumerate(series)),
        figure,
        tracking_uri,
        experiment,
    )
    return result
