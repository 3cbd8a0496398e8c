"""Full-frame evaluation: F, then G iterated, PSNR and SSIM per iteration, exact across ranks (the trainer's
validation; golf-evaluate's workflow around it: golf_dist/evaluation/workflow.py).

Pair i of the split goes to rank i % world (as NAFNet's dist_validation does); every rank sums its
metrics in float64 and the sums and counts are all-reduced, so the mean is the same as one process's.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from golf_dist.data.torch_loader import ShardPairs, full_frame_loader, unwrapped_errors
from golf_dist.inference.engine import AutoIterations, most_iterations, restore, to_uint8
from golf_dist.metrics import SSIM_VARIANT, psnr, ssim


def to_float_hwc(image: torch.Tensor) -> np.ndarray:
    """3xHxW float -> HxWx3 float32 in [0, 1] (clamped), unrounded: for figures that quote PSNR."""
    return image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def triplet(blur: torch.Tensor, output: torch.Tensor, sharp: torch.Tensor) -> np.ndarray:
    """blur | output | sharp side by side, for a look at what the model does."""
    return np.concatenate([to_uint8(blur), to_uint8(output), to_uint8(sharp)], axis=1)


def iterations_used(counts: list[float]) -> dict[str, Any]:
    """The G iterations the pairs used, from how many used 0, 1, 2, ...: mean, min, max and the count per value."""
    by_value = {n: int(round(c)) for n, c in enumerate(counts) if round(c) > 0}
    pairs = sum(by_value.values())
    return {
        "mean": sum(n * c for n, c in by_value.items()) / pairs,
        "min": min(by_value),
        "max": max(by_value),
        "counts": {str(n): c for n, c in by_value.items()},
    }


def evaluate_pairs(
    f: torch.nn.Module,
    g: torch.nn.Module | None,
    pairs: ShardPairs,
    iterations: int | AutoIterations,
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
    final, sharp). `tile`: run on overlapping tiles of that side (golf_dist.inference.tiling); None: whole frames.
    `ensemble`: average over flips and transposes (golf_dist.inference.ensemble; x1: none). `seconds_per_pair`: the
    mean wall time of one frame's restoration (F, the G iterations, tiles and ensemble; not the metrics).
    `iterations` may be AutoIterations (G until each frame's update is small, golf_dist.inference.engine.restore):
    a frame that stopped keeps its estimate in the later entries of psnr_per_iteration (0..the maximum), and
    `iterations_used` gives the iterations the frames ran (mean, min, max, count per value) in either case.
    """
    steps = most_iterations(iterations) if g is not None else 0
    # sums: count, psnr, ssim, input psnr, input ssim, seconds, psnr after iteration 0..steps, frames that used
    # 0..steps G iterations
    sums = torch.zeros(6 + 2 * (steps + 1), dtype=torch.float64)
    shown, kept = [], []
    loader = full_frame_loader(pairs, rank, world, limit=limit, num_workers=1)
    frames = tqdm(unwrapped_errors(loader), total=len(loader), desc="evaluate", disable=not progress, leave=False)
    for blur, sharp, key, _ in frames:
        blur = blur.unsqueeze(0).to(device)
        sharp = sharp.unsqueeze(0).to(device)
        started = time.perf_counter()
        with autocast() if autocast is not None else contextlib.nullcontext():
            restored = restore(f, g, blur, iterations if g is not None else 0, tile, overlap, ensemble)
        estimates = [e.float() for e in restored.iterates]
        if estimates[-1].is_cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        final = estimates[-1]
        estimates += estimates[-1:] * (steps + 1 - len(estimates))  # stopped early (auto): held at its last
        sums += _frame_sums(blur, sharp, estimates, int(restored.used[0]), seconds, with_ssim)
        if len(shown) < samples:
            shown_estimate = estimates[-1 if sample_iteration is None else sample_iteration]
            shown.append((key, triplet(blur[0], shown_estimate[0], sharp[0])))
        scene = key.rsplit("-", 1)[0]  # keys are <scene>-<frame>: keep frames of different scenes
        if len(kept) < keep_frames and all(k["key"].rsplit("-", 1)[0] != scene for k in kept):
            kept.append(
                {
                    "key": key,
                    "blur": to_float_hwc(blur[0]),
                    "f": to_float_hwc(estimates[0][0]),
                    "final": to_float_hwc(final[0]),
                    "sharp": to_float_hwc(sharp[0]),
                }
            )
    if reduce_sum is not None:
        sums = reduce_sum(sums.to(device)).cpu()
    return _summary(sums, steps, shown, kept, with_ssim)


def _frame_sums(
    blur: torch.Tensor, sharp: torch.Tensor, estimates: list[torch.Tensor], used: int, seconds: float, with_ssim: bool
) -> torch.Tensor:
    """One frame's row of evaluate_pairs' sums: count, psnr, ssim, input psnr, input ssim, seconds, the psnr of
    each estimate (after iteration 0..N) and a one-hot of the G iterations `used`."""
    per_estimate = [psnr(e, sharp).item() for e in estimates]
    row = [1.0, per_estimate[-1], 0.0, psnr(blur, sharp).item(), 0.0, seconds]
    if with_ssim:
        row[2] = ssim(estimates[-1], sharp).item()
        row[4] = ssim(blur, sharp).item()
    row += per_estimate
    row += [float(n == used) for n in range(len(estimates))]
    return torch.tensor(row, dtype=torch.float64)


def _summary(sums: torch.Tensor, steps: int, shown: list, kept: list, with_ssim: bool) -> dict[str, Any]:
    """evaluate_pairs' result from the sums over every frame (of every rank)."""
    count = int(sums[0].item())
    if count == 0:
        raise RuntimeError("evaluation saw no pairs")
    mean = (sums / count).tolist()
    result = {
        "pairs": count,
        "psnr": mean[1],
        "input_psnr": mean[3],
        "psnr_per_iteration": mean[6 : 6 + steps + 1],
        "iterations_used": iterations_used(sums[6 + steps + 1 :].tolist()),
        "seconds_per_pair": mean[5],
        "samples": shown,
        "frames": kept,
    }
    if with_ssim:
        result.update(ssim=mean[2], input_ssim=mean[4], ssim_variant=SSIM_VARIANT)
    return result
