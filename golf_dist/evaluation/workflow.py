"""golf-evaluate's workflow: F + G of a training output folder evaluated on a split of shards (the validation
in golf_dist/evaluation/validation.py), figures, MLflow run (and, asked for, a registered model), evaluation.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from golf_dist.data.split_check import open_pairs
from golf_dist.evaluation import plots
from golf_dist.evaluation.validation import evaluate_pairs
from golf_dist.files import write_atomic
from golf_dist.inference.engine import AutoIterations, iteration_fields, load_trained
from golf_dist.metrics import SSIM_VARIANT
from golf_dist.perf.speed import FALLBACK_FILE, fallback_json, fallback_tag, fallbacks_of, for_inference


def run_evaluation(
    output_dir: Path,
    shards: str,
    split: str,
    iterations: int | AutoIterations,
    limit: int | None,
    tracking_cfg,
    tile: int | None = None,
    overlap: int = 32,
    ensemble: str = "x1",
    register: str | None = None,
    speed_cfg=None,
    path_root: str | None = None,
    on_bad_sample: str = "error",
    cache_dir: str | None = None,
) -> dict[str, Any] | None:
    """The command line's work: evaluate F + G of `output_dir`, log to MLflow (`register`: also an MLflow model,
    which may read images under `path_root`); the result on rank 0. The split gets the validation split's start-up
    check (golf_dist.data.split_check.open_pairs, every pair evaluated decoded first): a bad sample stops it
    naming the shard and key before any network runs (on_bad_sample=error) or is left out and counted (skip)."""
    from accelerate import Accelerator

    accelerator = Accelerator()
    output_dir = Path(output_dir)
    f, g = load_trained(output_dir, accelerator.device, iterations)
    # golf_dist/perf/speed.py: all off on a CPU; what its first-call check turns off is recorded beside evaluation.json
    f, g = for_inference(
        f,
        g,
        speed_cfg,
        accelerator.device,
        on_fallback=lambda fallbacks: (
            write_atomic(output_dir / f"evaluation_{FALLBACK_FILE}", fallback_json(fallbacks))
            if accelerator.is_main_process
            else None
        ),
    )
    pairs = open_pairs(shards, split, on_bad_sample, cache_dir, decoded=limit or sys.maxsize)
    result = evaluate_pairs(
        f,
        g,
        pairs,
        iterations,
        accelerator.device,
        rank=accelerator.process_index,
        world=accelerator.num_processes,
        reduce_sum=(lambda t: accelerator.reduce(t, "sum")) if accelerator.num_processes > 1 else None,
        limit=limit,
        samples=2 if accelerator.is_main_process else 0,
        progress=accelerator.is_main_process,
        keep_frames=2 if accelerator.is_main_process else 0,
        tile=tile,
        overlap=overlap,
        ensemble=ensemble,
    )
    if not accelerator.is_main_process:
        return None
    samples, frames = result.pop("samples"), result.pop("frames")
    result.update(iteration_fields(iterations))
    result.update(
        split=split,
        shards=str(shards),
        tile=tile,
        overlap=overlap if tile else None,
        ensemble=ensemble,
        bad_samples_skipped=pairs.checked.n_bad,
    )
    result["figures"] = {k: str(v) for k, v in _figures(result, frames, output_dir, split, iterations).items()}
    result["mlflow_run_id"] = _log_run(result, samples, f, g, output_dir, iterations, tracking_cfg, register, path_root)
    write_atomic(output_dir / "evaluation.json", json.dumps(result, indent=2, sort_keys=True).encode())
    result["figures"]["json"] = str(output_dir / "evaluation.json")
    return result


def _figures(result: dict, frames, output_dir: Path, split: str, iterations) -> dict[str, Path]:
    """What a person looks at, beside the numbers: PSNR against G iteration and blur | F | F + N G | sharp."""
    figures = {
        "psnr_by_iteration": plots.psnr_by_iteration(
            result["psnr_per_iteration"],
            result["input_psnr"],
            output_dir / "psnr_by_iteration.png",
            title=f"{result['pairs']} {split} pairs of {output_dir.name}: PSNR against G iteration"
            + (" (auto: a pair that stopped holds its last)" if isinstance(iterations, AutoIterations) else ""),
        )
    }
    if frames:
        figures["comparison"] = plots.comparison(frames, output_dir / "comparison.png", iterations=result["iterations"])
    return figures


def _log_run(result: dict, samples, f, g, output_dir: Path, iterations, tracking_cfg, register, path_root) -> str:
    """The evaluation's MLflow run: params, metrics (per G iteration too), sample images, figures, and with
    `register` the MLflow model; returns the run's id."""
    from golf_dist.tracking import Tracker

    shards, split, tile, ensemble = result["shards"], result["split"], result["tile"], result["ensemble"]
    overlap = result["overlap"]
    figures = {name: Path(path) for name, path in result["figures"].items()}
    tracker = Tracker(True, tracking_cfg.uri, tracking_cfg.experiment)
    fallbacks = fallbacks_of(f, g)
    if fallbacks:
        result["speed_fallback"] = fallbacks
    tracker.start(
        run_name=f"eval-{output_dir.name}",
        tags={"golf.stage": "eval", **({"speed_fallback": fallback_tag(fallbacks)} if fallbacks else {})},
    )
    tracker.log_params(
        {
            "output_dir": str(output_dir.resolve()),
            "shards": str(shards),
            "split": split,
            **iteration_fields(iterations),
            "pairs": result["pairs"],
            "ssim_variant": SSIM_VARIANT,
            "tile": tile or "whole",
            "overlap": overlap if tile else 0,
            "ensemble": ensemble,
        }
    )
    metrics = {k: float(result[k]) for k in ("psnr", "ssim", "input_psnr", "input_ssim", "bad_samples_skipped")}
    metrics["seconds_per_pair"] = result["seconds_per_pair"]
    used = result["iterations_used"]
    metrics.update({f"iterations_used_{k}": float(used[k]) for k in ("mean", "min", "max")})
    tracker.log_metrics({f"test_{k}": v for k, v in metrics.items()}, step=0)
    for value, count in used["counts"].items():  # how many pairs used each number of G iterations
        tracker.log_metrics({"test_pairs_by_iterations_used": float(count)}, step=int(value))
    for i, value in enumerate(result["psnr_per_iteration"]):
        tracker.log_metrics({"test_psnr_by_iteration": value}, step=i)
    for key, image in samples:
        tracker.log_image(image, f"samples/{key}.png")
    for path in figures.values():
        tracker.log_artifact(path, "figures")
    if register:
        from golf_dist.inference.mlflow_model import register_model

        try:
            result["registered"] = register_model(
                tracker, output_dir, iterations, ensemble, register, result["psnr"], path_root
            )
        except BaseException:
            tracker.end("FAILED")  # the run asked for a model it did not get
            raise
    tracker.end()
    return tracker.run_id


def print_result(result: dict) -> None:
    """A readable summary, then the result as one JSON object on the last line."""
    per_iteration = ", ".join(f"{v:.2f}" for v in result["psnr_per_iteration"])
    print(
        f"{result['pairs']} test pairs: PSNR {result['psnr']:.2f} dB (blurred input {result['input_psnr']:.2f} dB, "
        f"gain {result['psnr'] - result['input_psnr']:+.2f} dB), SSIM {result['ssim']:.4f} "
        f"(input {result['input_ssim']:.4f}; {result['ssim_variant']})\n"
        f"PSNR after F and each G iteration: {per_iteration}",
        flush=True,
    )
    used = result["iterations_used"]
    counts = ", ".join(f"{n}: {c}" for n, c in used["counts"].items())
    print(
        f"G iterations used ({result['iterations']}"
        + (f", tolerance {result['tolerance']:g}, at most {result['max_iterations']}" if "tolerance" in result else "")
        + f"): mean {used['mean']:.2f}, {used['min']} to {used['max']} (pairs per count: {counts})",
        flush=True,
    )
    if result.get("figures"):
        print("figures: " + ", ".join(result["figures"].values()), flush=True)
    print(json.dumps(result, sort_keys=True), flush=True)
