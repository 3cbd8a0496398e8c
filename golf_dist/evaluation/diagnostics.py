"""Instruments for when training does not learn: can the model fit one batch, and do the two loaders hand
out the same data?

  overfit_one_batch   trains F (or G on a fixed F) on one fixed batch and returns the loss per step: a
                      model, loss and optimizer that work bring it down by 10x or more within a few hundred
                      steps; one that cannot has a bug (wrong target, detached graph, frozen weights ...).
  loader_stream       the first crops a training loader hands out, with statistics that would show a loader
                      defect: how many distinct pairs, value range, blur-to-sharp error, blur/sharp alignment,
                      for every crop whether it equals the crop of its source pair decoded independently, and
                      a digest of the crops in order (the DALI and PyTorch loaders' must be equal).
  linear_headroom     the least-squares linear filter (fit_linear_correction) on F's output, or on the blurred
                      input: what a simple corrector gains, beside G's gain.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from golf_dist.losses import GolfLoss, unrolled_loss
from golf_dist.models import f_net, g_net, golf_iterates, unroll


def overfit_one_batch(
    stage: str,
    blur: torch.Tensor,
    sharp: torch.Tensor,
    *,
    steps: int = 200,
    lr: float = 1e-3,
    f_model: torch.nn.Module | None = None,
    unroll_steps: int = 3,
    seed: int = 0,
    stop_below: float | None = None,
) -> list[float]:
    """The content loss at every step of Adam on one fixed (blur, sharp) batch, first value before any step;
    with `stop_below`, it stops at the first loss below that fraction of the first.

    Stage f trains a fresh F; stage g a fresh G on top of `f_model` (frozen; a fresh, untrained F when None,
    which is a fixed map all the same), with the Eq. 4 mean over `unroll_steps` iterates."""
    if stage not in ("f", "g"):
        raise ValueError(f"stage must be f or g, got {stage!r}")
    torch.manual_seed(seed)
    loss_fn = GolfLoss(0.0, None)
    net = f_net() if stage == "f" else g_net()
    x0 = None
    if stage == "g":
        f_model = (f_model or f_net()).eval().requires_grad_(False)
        with torch.no_grad():
            x0 = f_model(blur)
    opt = torch.optim.Adam(net.parameters(), lr=lr)

    def loss() -> torch.Tensor:
        if stage == "f":
            return loss_fn(net(blur), sharp)["content"]
        return unrolled_loss(loss_fn, unroll(net, x0, unroll_steps, checkpoint=False), sharp, checkpoint=False)[
            "content"
        ]

    history = []
    for _ in range(steps):
        value = loss()
        history.append(value.item())
        if stop_below is not None and history[-1] <= history[0] * stop_below:
            return history
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
    with torch.no_grad():
        history.append(loss().item())
    return history


def _best_shift(blur: np.ndarray, sharp: np.ndarray, radius: int = 2) -> tuple[int, int]:
    """The integer shift (dy, dx) of `blur` within +-radius that best matches `sharp` (MSE on the interior)."""
    h, w = sharp.shape[1:]
    inner = sharp[:, radius : h - radius, radius : w - radius]
    best, where = np.inf, (0, 0)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            moved = blur[:, radius + dy : h - radius + dy, radius + dx : w - radius + dx]
            err = float(((moved - inner) ** 2).mean())
            if err < best - 1e-12:
                best, where = err, (dy, dx)
    return where


def loader_stream(cfg, loader_kind: str, crops: int) -> dict[str, Any]:
    """Statistics of the first `crops` training crops `loader_kind` ('dali' or 'torch') gives for `cfg`
    (one process), each crop checked against its source pair decoded by the shard reader."""
    from golf_dist.data.crop_plan import CropPlan, paired_crop
    from golf_dist.data.loaders import make_train_loader
    from golf_dist.data.split_check import open_pairs
    from golf_dist.data.torch_loader import to_tensor

    pairs = open_pairs(
        cfg.data.shards, cfg.data.train_split, cfg.data.on_bad_sample, cfg.data.cache_dir, min_side=cfg.data.crop
    )
    batch = cfg.data.batch_size
    loader = make_train_loader(
        cfg,
        pairs,
        global_batch=batch,
        accum=1,
        world=1,
        rank=0,
        start_step=0,
        device=torch.device("cpu"),
        loader=loader_kind,
    )
    index_of = {ref.key: i for i, ref in enumerate(pairs.refs)}
    plan = CropPlan(len(pairs), cfg.data.crop, cfg.data.flips, cfg.seed, cfg.data.crops_per_frame)
    seen: list[int] = []
    mse, means, mismatched, aligned = [], [], 0, 0
    stream = hashlib.sha256()  # of the crops' float32 bytes, in order: equal digests, equal streams
    position = 0
    try:
        while len(seen) < crops:
            blur, sharp = next(loader)
            for j in range(blur.shape[0]):
                if loader_kind == "dali":  # the loader records each crop's source sample and window
                    key = loader.last_sources[j].rsplit(" ", 1)[-1]
                    index = index_of[key]
                    top, left, hflip, vflip = (int(v) for v in loader.last_windows[j])
                else:  # the torch loader's sample at a position is a pure function of it
                    index = plan.pair_index(position)
                    h, w = pairs.frame_size or pairs.load(index)[0].shape[:2]
                    top, left, hflip, vflip = plan.window(position, h, w)
                position += 1
                full_blur, full_sharp, _ = pairs.load(index)
                b, s = paired_crop(full_blur, full_sharp, top, left, cfg.data.crop, bool(hflip), bool(vflip))
                if not (torch.equal(to_tensor(b), blur[j]) and torch.equal(to_tensor(s), sharp[j])):
                    mismatched += 1
                bj, sj = blur[j].numpy(), sharp[j].numpy()
                stream.update(bj.tobytes() + sj.tobytes())
                mse.append(float(((bj - sj) ** 2).mean()))
                means.append(float(sj.mean()))
                aligned += _best_shift(bj, sj) == (0, 0)
                seen.append(index)
                if len(seen) == crops:
                    break
    finally:
        loader.close()
    mse_arr = np.asarray(mse)
    return {
        "loader": loader_kind,
        "crops": len(seen),
        "distinct_pairs": len(set(seen)),
        "pairs_in_split": len(pairs),
        "sharp_mean": float(np.mean(means)),
        "blur_sharp_mse_mean": float(mse_arr.mean()),
        "blur_sharp_psnr": float(10 * np.log10(1.0 / mse_arr.mean())),
        "blur_sharp_mse_p10_p90": [float(np.percentile(mse_arr, 10)), float(np.percentile(mse_arr, 90))],
        "aligned_share": aligned / len(seen),
        "crops_not_matching_their_source": mismatched,
        "stream_sha256": stream.hexdigest(),
    }


@torch.no_grad()
def gain_on_crops_and_frames(
    f: torch.nn.Module,
    g: torch.nn.Module,
    frames: list[tuple[np.ndarray, np.ndarray]],
    *,
    crop: int,
    iterations: int,
    crops_per_frame: int = 1,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Mean PSNR gain over F alone after each of `iterations` G steps, measured two ways on the same frames:
    on random `crop`-sided windows with F run on the window (as stage g trains), and on the whole frames
    (as evaluation measures). G that gains on crops and not on frames learnt to correct F's estimate near
    a crop's border, which a whole frame does not have. `frames`: (blur, sharp) HxWx3 uint8 pairs."""
    from golf_dist.data.torch_loader import to_tensor
    from golf_dist.metrics import psnr

    rng = np.random.default_rng(seed)

    def gains(blur: np.ndarray, sharp: np.ndarray) -> np.ndarray:
        target = to_tensor(sharp)[None]
        values = [psnr(x.clamp(0, 1), target) for x in golf_iterates(f, g, to_tensor(blur)[None], iterations)]
        return np.array([float(v) - float(values[0]) for v in values[1:]])

    on_crops, on_frames = [], []
    for blur, sharp in frames:
        height, width = blur.shape[:2]
        for _ in range(crops_per_frame):
            top, left = int(rng.integers(height - crop + 1)), int(rng.integers(width - crop + 1))
            window = (slice(top, top + crop), slice(left, left + crop))
            on_crops.append(gains(blur[window], sharp[window]))
        on_frames.append(gains(blur, sharp))
    return {"crops": np.mean(on_crops, axis=0).tolist(), "frames": np.mean(on_frames, axis=0).tolist()}


def _patches(image: torch.Tensor, kernel: int) -> torch.Tensor:
    """(H*W) x (3*k*k + 1): each pixel's k x k neighbourhood in every channel (reflected at the border, as the
    networks pad) and a constant 1, in float64."""
    pad = kernel // 2
    padded = torch.nn.functional.pad(image[None].double(), (pad, pad, pad, pad), mode="reflect")
    cols = torch.nn.functional.unfold(padded, kernel)[0].T
    return torch.cat([cols, torch.ones(len(cols), 1, dtype=cols.dtype)], 1)


@dataclass(frozen=True)
class LinearCorrection:
    """A k x k linear filter, 3 -> 3 channels plus an offset, applied to a 3xHxW image (reflected at its border):
    a (3k^2 + 1) x 3 weight matrix, applied in float64."""

    weights: torch.Tensor
    kernel: int
    samples: int  # pixels it was fitted on

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return (_patches(image, self.kernel) @ self.weights).T.reshape(image.shape)


@torch.no_grad()
def fit_linear_correction(
    inputs: list[torch.Tensor], targets: list[torch.Tensor], kernel: int, samples_per_frame: int, seed: int
) -> LinearCorrection:
    """The least-squares LinearCorrection from 3xHxW `inputs` to `targets`, fitted on `samples_per_frame` random
    pixels of each frame."""
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"kernel must be an odd number >= 1, got {kernel}")
    gen = torch.Generator().manual_seed(seed)
    rows, picked = [], []
    for image, target in zip(inputs, targets):
        feats = _patches(image, kernel)
        pick = torch.randperm(len(feats), generator=gen)[:samples_per_frame]
        rows.append(feats[pick])
        picked.append(target.double().reshape(3, -1).T[pick])
    solution = torch.linalg.lstsq(torch.cat(rows), torch.cat(picked)).solution
    return LinearCorrection(solution, kernel, int(sum(len(r) for r in rows)))


@torch.no_grad()
def linear_headroom(
    f: torch.nn.Module,
    g: torch.nn.Module | None,
    train_frames: list[tuple[np.ndarray, np.ndarray]],
    test_frames: list[tuple[np.ndarray, np.ndarray]],
    *,
    kernel: int = 7,
    samples_per_frame: int = 6000,
    iterations: int = 3,
    seed: int = 0,
    instance_norm: bool = False,
) -> dict[str, Any]:
    """How much is left for G to correct, measured with the simplest corrector there is: the least-squares
    linear filter (k x k, 3 -> 3 channels, plus an offset) from F's estimate x0 to the residual sharp - x0,
    fitted on `samples_per_frame` random pixels of each training frame and applied to the test frames.

    Returns the filter's mean PSNR gain over F alone on the test frames ("linear_gain") and, with `g`, G's
    gain after each iteration on the same frames ("g_gains"). A G that gains far less than the filter has an
    optimisation problem; a filter that gains little says F's estimate leaves little that a local linear
    correction (a sharpening, a deconvolution of what blur is left) could undo. Frames: (blur, sharp) HxWx3
    uint8 pairs.

    With `instance_norm`, also "normalised_gain": the same filter's correction passed through what an
    InstanceNorm does (per frame and channel: zero mean, unit standard deviation), then scaled by one factor
    per channel fitted by least squares on the training frames. Every path through G passes an InstanceNorm,
    so this is what G's linear part can make of the filter: its amplitude cannot follow each frame's
    contrast."""
    from golf_dist.data.torch_loader import to_tensor
    from golf_dist.metrics import psnr

    estimates = [f(to_tensor(blur)[None])[0] for blur, _ in train_frames]
    residuals = [to_tensor(sharp) - x0 for x0, (_, sharp) in zip(estimates, train_frames)]
    correction = fit_linear_correction(estimates, residuals, kernel, samples_per_frame, seed)
    if instance_norm:
        scale = _instance_norm_scale([correction(x0) for x0 in estimates], residuals)
    linear, normalised, by_iteration = [], [], []
    for blur, sharp in test_frames:
        target = to_tensor(sharp)[None]
        iterates = golf_iterates(f, g, to_tensor(blur)[None], iterations if g is not None else 0)
        x0 = iterates[0][0]
        base, fix = float(psnr(x0[None].clamp(0, 1), target)), correction(x0)
        linear.append(float(psnr((x0 + fix.float())[None].clamp(0, 1), target)) - base)
        if instance_norm:
            fixed = x0 + (scale * _instance_normalised(fix)).float()
            normalised.append(float(psnr(fixed[None].clamp(0, 1), target)) - base)
        by_iteration.append([float(psnr(x.clamp(0, 1), target)) - base for x in iterates[1:]])
    result: dict[str, Any] = {
        "kernel": kernel,
        "train_frames": len(train_frames),
        "test_frames": len(test_frames),
        "samples": correction.samples,
        "linear_gain": float(np.mean(linear)),
    }
    if instance_norm:
        result["normalised_gain"] = float(np.mean(normalised))
    if g is not None:
        result["g_gains"] = np.mean(by_iteration, axis=0).tolist()
    return result


def _instance_normalised(correction: torch.Tensor) -> torch.Tensor:
    """A 3xHxW correction as an InstanceNorm leaves it: each channel at zero mean and unit deviation."""
    centred = correction - correction.mean((1, 2), keepdim=True)
    return centred / centred.std((1, 2), keepdim=True).clamp_min(1e-12)


def _instance_norm_scale(corrections: list[torch.Tensor], residuals: list[torch.Tensor]) -> torch.Tensor:
    """Per channel, the factor a minimising sum over frames of |a * normalised(correction) - residual|^2."""
    normalised = [_instance_normalised(c) for c in corrections]
    num = sum((n * r).sum((1, 2)) for n, r in zip(normalised, residuals))
    den = sum((n * n).sum((1, 2)) for n in normalised)
    return (num / den)[:, None, None]
