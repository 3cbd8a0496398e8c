"""Full-frame evaluation: F, then G iterated, PSNR and SSIM per iteration, exact across ranks.

Pair i of the split goes to rank i % world (as NAFNet's dist_validation does); every rank sums its
metrics in float64 and the sums and counts are all-reduced, so the mean is the same as one process's.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from golf_dist import plots
from golf_dist.data.loader import ShardPairs, full_frame_loader, unwrapped_errors
from golf_dist.data.split_check import open_pairs
from golf_dist.data.storage import write_atomic
from golf_dist.inference import restore_iterates, to_uint8
from golf_dist.log import get_logger
from golf_dist.metrics import SSIM_VARIANT, psnr, ssim
from golf_dist.speed import FALLBACK_FILE, fallback_json, fallback_tag, fallbacks_of, for_inference

log = get_logger(__name__)


def to_float_hwc(image: torch.Tensor) -> np.ndarray:
    """3xHxW float -> HxWx3 float32 in [0, 1] (clamped), unrounded: for figures that quote PSNR."""
    return image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def triplet(blur: torch.Tensor, output: torch.Tensor, sharp: torch.Tensor) -> np.ndarray:
    """blur | output | sharp side by side, for a look at what the model does."""
    return np.concatenate([to_uint8(blur), to_uint8(output), to_uint8(sharp)], axis=1)


def evaluate_pairs(
    f: torch.nn.Module,
    g: torch.nn.Module | None,
    pairs: ShardPairs,
    iterations: int,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
    reduce_sum=None,
    limit: int | None = None,
    with_ssim: bool = True,
    samples: int = 0,
    progress: bool = False,
    autocast=None,
    sample_iteration: int | None = None,
    keep_frames: int = 0,
    tile: int | None = None,
    overlap: int = 32,
    ensemble: str = "x1",
) -> dict[str, Any]:
    """Metrics of F (+ G iterations) on full frames of `pairs`, reduced over ranks.

    `reduce_sum(tensor) -> tensor` sums a float64 tensor over ranks (None on one process).
    Returns psnr/ssim of the final estimate, of the blurred input, PSNR after each iteration
    0..N, the pair count, and up to `samples` (key, blur|output|sharp image) triplets from this rank, the
    output being the estimate after `sample_iteration` G iterations (default: the last), and the first
    `keep_frames` frames of this rank from different scenes, as HxWx3 float arrays (key, blur, f: F's estimate,
    final, sharp). `tile`: run on overlapping tiles of that side (golf_dist.tiling); None: whole frames.
    `ensemble`: average over flips and transposes (golf_dist.ensemble; x1: none). `seconds_per_pair`: the
    mean wall time of one frame's restoration (F, the G iterations, tiles and ensemble; not the metrics).
    """
    steps = iterations if g is not None else 0
    # sums: count, psnr, ssim, input psnr, input ssim, seconds, psnr after iteration 0..steps
    sums = torch.zeros(6 + steps + 1, dtype=torch.float64)
    shown, kept = [], []
    loader = full_frame_loader(pairs, rank, world, limit=limit, num_workers=1)
    frames = tqdm(unwrapped_errors(loader), total=len(loader), desc="evaluate", disable=not progress, leave=False)
    for blur, sharp, key, _ in frames:
        blur = blur.unsqueeze(0).to(device)
        sharp = sharp.unsqueeze(0).to(device)
        started = time.perf_counter()
        with autocast() if autocast is not None else contextlib.nullcontext():
            estimates = restore_iterates(f, g, blur, steps, tile, overlap, ensemble)
        estimates = [e.float() for e in estimates]
        if estimates[-1].is_cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        final = estimates[-1]
        row = [1.0, psnr(final, sharp).item(), 0.0, psnr(blur, sharp).item(), 0.0, seconds]
        if with_ssim:
            row[2] = ssim(final, sharp).item()
            row[4] = ssim(blur, sharp).item()
        row += [psnr(e, sharp).item() for e in estimates]
        sums += torch.tensor(row, dtype=torch.float64)
        if len(shown) < samples:
            shown_estimate = estimates[-1 if sample_iteration is None else sample_iteration]
            shown.append((key, triplet(blur[0], shown_estimate[0], sharp[0])))
        scene = key.rsplit("-", 1)[0]  # keys are <scene>-<frame>: keep frames of different scenes
        if len(kept) < keep_frames and all(k["key"].rsplit("-", 1)[0] != scene for k in kept):
            kept.append({"key": key, "blur": to_float_hwc(blur[0]), "f": to_float_hwc(estimates[0][0]),
                         "final": to_float_hwc(final[0]), "sharp": to_float_hwc(sharp[0])})
    if reduce_sum is not None:
        sums = reduce_sum(sums.to(device)).cpu()
    count = int(sums[0].item())
    if count == 0:
        raise RuntimeError("evaluation saw no pairs")
    mean = (sums / count).tolist()
    result = {
        "pairs": count,
        "psnr": mean[1],
        "input_psnr": mean[3],
        "psnr_per_iteration": mean[6:],
        "seconds_per_pair": mean[5],
        "samples": shown,
        "frames": kept,
    }
    if with_ssim:
        result.update(ssim=mean[2], input_ssim=mean[4], ssim_variant=SSIM_VARIANT)
    return result


def load_trained(output_dir: Path, device: torch.device, iterations: int):
    """F (and G when iterations > 0) from a training output folder, in eval mode on `device`."""
    from golf_dist.checkpoints import load_into
    from golf_dist.errors import DataError
    from golf_dist.models import f_net, g_net

    f_path, g_path = Path(output_dir) / "f.safetensors", Path(output_dir) / "g.safetensors"
    if not f_path.is_file():
        raise DataError(f"no trained F at {f_path}: train stage f with --output-dir {output_dir} first")
    f = load_into(f_net(), f_path, "F")
    g = None
    if iterations > 0:
        if not g_path.is_file():
            raise DataError(
                f"no trained G at {g_path}: train stage g with --output-dir {output_dir} first, "
                "or use F alone with --iterations 0"
            )
        g = load_into(g_net(), g_path, "G").to(device).eval()
    return f.to(device).eval(), g


def run_evaluation(output_dir: Path, shards: str, split: str, iterations: int, limit: int | None,
                   tracking_cfg, tile: int | None = None, overlap: int = 32, ensemble: str = "x1",
                   register: str | None = None, speed_cfg=None, path_root: str | None = None,
                   on_bad_sample: str = "error", cache_dir: str | None = None) -> dict[str, Any] | None:
    """The command line's work: evaluate F + G of `output_dir`, log to MLflow (`register`: also an MLflow model,
    which may read images under `path_root`); the result on rank 0. The split gets the validation split's start-up
    check (golf_dist.data.split_check.open_pairs, every pair evaluated decoded first): a bad sample stops it
    naming the shard and key before any network runs (on_bad_sample=error) or is left out and counted (skip)."""
    from accelerate import Accelerator

    from golf_dist.tracking import Tracker

    accelerator = Accelerator()
    output_dir = Path(output_dir)
    f, g = load_trained(output_dir, accelerator.device, iterations)
    # golf_dist/speed.py: all off on a CPU; what its first-call check turns off is recorded beside evaluation.json
    f, g = for_inference(f, g, speed_cfg, accelerator.device, on_fallback=lambda fallbacks: write_atomic(
        output_dir / f"evaluation_{FALLBACK_FILE}", fallback_json(fallbacks)) if accelerator.is_main_process else None)
    pairs = open_pairs(shards, split, on_bad_sample, cache_dir, decoded=limit or sys.maxsize)
    result = evaluate_pairs(
        f, g, pairs, iterations, accelerator.device,
        rank=accelerator.process_index, world=accelerator.num_processes,
        reduce_sum=(lambda t: accelerator.reduce(t, "sum")) if accelerator.num_processes > 1 else None,
        limit=limit, samples=2 if accelerator.is_main_process else 0,
        progress=accelerator.is_main_process, keep_frames=2 if accelerator.is_main_process else 0,
        tile=tile, overlap=overlap, ensemble=ensemble,
    )
    if not accelerator.is_main_process:
        return None
    samples, frames = result.pop("samples"), result.pop("frames")
    result.update(iterations=iterations, split=split, shards=str(shards), tile=tile, overlap=overlap if tile else None,
                  ensemble=ensemble, bad_samples_skipped=pairs.checked.n_bad)
    # what a person looks at, beside the numbers: PSNR against G iteration and blur | F | F + N G | sharp
    figures = {"psnr_by_iteration": plots.psnr_by_iteration(
        result["psnr_per_iteration"], result["input_psnr"], output_dir / "psnr_by_iteration.png",
        title=f"{result['pairs']} {split} pairs of {output_dir.name}: PSNR against G iteration")}
    if frames:
        figures["comparison"] = plots.comparison(frames, output_dir / "comparison.png", iterations=iterations)
    result["figures"] = {k: str(v) for k, v in figures.items()}
    tracker = Tracker(True, tracking_cfg.uri, tracking_cfg.experiment)
    fallbacks = fallbacks_of(f, g)
    if fallbacks:
        result["speed_fallback"] = fallbacks
    tracker.start(run_name=f"eval-{output_dir.name}", tags={
        "golf.stage": "eval", **({"speed_fallback": fallback_tag(fallbacks)} if fallbacks else {})})
    tracker.log_params({"output_dir": str(output_dir.resolve()), "shards": str(shards), "split": split,
                        "iterations": iterations, "pairs": result["pairs"], "ssim_variant": SSIM_VARIANT,
                        "tile": tile or "whole", "overlap": overlap if tile else 0, "ensemble": ensemble})
    metrics = {k: result[k] for k in ("psnr", "ssim", "input_psnr", "input_ssim")}
    metrics.update(seconds_per_pair=result["seconds_per_pair"], bad_samples_skipped=float(pairs.checked.n_bad))
    tracker.log_metrics({f"test_{k}": v for k, v in metrics.items()}, step=0)
    for i, value in enumerate(result["psnr_per_iteration"]):
        tracker.log_metrics({"test_psnr_by_iteration": value}, step=i)
    for key, image in samples:
        tracker.log_image(image, f"samples/{key}.png")
    for path in figures.values():
        tracker.log_artifact(path, "figures")
    if register:
        try:
            result["registered"] = register_model(tracker, output_dir, iterations, ensemble, register, result["psnr"],
                                                  path_root)
        except BaseException:
            tracker.end("FAILED")  # the run asked for a model it did not get
            raise
    tracker.end()
    result["mlflow_run_id"] = tracker.run_id
    write_atomic(output_dir / "evaluation.json", json.dumps(result, indent=2, sort_keys=True).encode())
    result["figures"]["json"] = str(output_dir / "evaluation.json")
    return result


def register_model(tracker, output_dir: Path, iterations: int, ensemble: str, name: str,
                   test_psnr: float, path_root: str | None = None) -> dict[str, str]:
    """Log F + G (run as evaluated: `iterations`, `ensemble`; reading the `path` column under `path_root` only)
    as a pyfunc model into the evaluation's MLflow run and register it as NAME, its test PSNR a tag of the new
    version. Unlike metrics, this does not survive an unreachable store: it is what was asked for."""
    import mlflow

    from golf_dist.errors import TrackingError
    from golf_dist.mlflow_model import log_model
    from golf_dist.tracking import fluent_tracking_uri

    if tracker.run_id is None:
        raise TrackingError(f"--register {name}: the MLflow store at {tracker.display_uri} did not take the "
                            "evaluation's run, so there is no run to log the model into")
    with fluent_tracking_uri(tracker.uri):
        with mlflow.start_run(run_id=tracker.run_id):
            info = log_model(output_dir, iterations, ensemble, path_root=path_root)
        version = mlflow.register_model(info.model_uri, name, tags={"test_psnr": f"{test_psnr:.4f}"})
    log.info(f"registered model {name} version {version.version} ({info.model_uri}; test PSNR {test_psnr:.2f} dB)")
    return {"name": name, "version": str(version.version), "model_uri": info.model_uri}


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
    if result.get("figures"):
        print("figures: " + ", ".join(result["figures"].values()), flush=True)
    print(json.dumps(result, sort_keys=True), flush=True)
