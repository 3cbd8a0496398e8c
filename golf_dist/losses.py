"""The Golf loss L = Lc + lambda * Lp (paper Section 5.2) and its unrolled mean for G (Eq. 4).

Lc is the pixel MSE; Lp the squared error of VGG-11-BN features at the 5th max-pool divided by
w*h*d. The VGG weights are torchvision's ImageNet file, read without importing torchvision.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint as _checkpoint

from golf_dist.errors import GolfError

VGG_WEIGHTS_FILE = "vgg11_bn-6002323d.pth"
VGG_WEIGHTS_URL = f"https://download.pytorch.org/models/{VGG_WEIGHTS_FILE}"

# torchvision's cfg "A" (VGG-11); "M" is a 2x2 max-pool. With batch norm every conv becomes
# conv, BN, ReLU, which puts the five pools at indices 3, 7, 14, 21, 28 of `features`.
_VGG11_CFG = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]
_LAST_INDEX = 28
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class VGGFeatures(nn.Module):
    """torchvision's `vgg11_bn().features[0..28]`: [B,3,H,W] in [0,1] -> [B,512,H/32,W/32].

    Frozen and always in eval mode (BN uses the ImageNet running statistics).
    """

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in _VGG11_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        # The torchvision weights were trained on ImageNet-normalised input, so [0,1] RGB is
        # normalised here. Not persistent: the state dict keeps torchvision's exact key layout.
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> VGGFeatures:
        # A parent's .train() must not switch BN to batch statistics.
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.features((x - self.mean) / self.std)


def find_vgg_weights(path: str | os.PathLike | None) -> Path | None:
    """The VGG weights file: `path` if given (it must exist), else torch hub's cache copy, else None."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise GolfError(f"VGG weights file {p} does not exist. {vgg_weights_missing_message()}")
        return p
    cached = Path(os.path.join(torch.hub.get_dir(), "checkpoints", VGG_WEIGHTS_FILE))
    return cached if cached.is_file() else None


def vgg_weights_missing_message() -> str:
    """What to do when the perceptual loss is on and no VGG weights file is found."""
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", VGG_WEIGHTS_FILE)
    return (
        f"The perceptual loss needs torchvision's ImageNet VGG-11-BN weights, {VGG_WEIGHTS_FILE}. "
        f"Fetch {VGG_WEIGHTS_URL} on a machine with network access and put it at {cached} "
        f"(torch hub's cache; TORCH_HOME moves it) or pass loss.vgg_weights=/path/to/{VGG_WEIGHTS_FILE}. "
        "To train without it, set loss.perceptual_weight=0."
    )


def load_vgg_features(path: str | os.PathLike) -> VGGFeatures:
    """VGGFeatures with the `features.0..28` tensors of a torchvision vgg11_bn state dict."""
    expected = f"a torchvision vgg11_bn state dict ({VGG_WEIGHTS_FILE}) with features.N.* tensors"
    try:
        # weights_only: a .pth file is a pickle, and only tensors may come out of it.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise GolfError(f"cannot read VGG weights {path}: expected {expected} ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict):
        raise GolfError(f"VGG weights {path} hold a {type(state).__name__}, expected {expected}")
    kept = {}
    for key, value in state.items():
        m = re.match(r"features\.(\d+)\.", str(key))
        if m and int(m.group(1)) <= _LAST_INDEX:
            kept[key] = value
    model = VGGFeatures()
    missing = [k for k in model.state_dict() if k not in kept]
    if missing:
        raise GolfError(
            f"VGG weights {path} lack {len(missing)} tensors ({', '.join(missing[:3])}, ...): expected {expected}"
        )
    try:
        model.load_state_dict(kept, strict=True)
    except RuntimeError as err:  # a wrong shape; torch's message spans lines
        detail = " ".join(str(err).split())
        raise GolfError(f"VGG weights {path} do not fit: expected {expected}; {detail}") from err
    return model


CONTENT_LOSSES = ("mse", "psnr")
# PSNR loss's floor on an image's MSE (of a [0, 1] image): 100 dB, far below any 8-bit image's error
_PSNR_LOSS_EPS = 1e-10


def psnr_loss(output: Tensor, target: Tensor, keep: Tensor | None = None) -> Tensor:
    """The batch mean of each image's -PSNR in dB (peak 1), i.e. of 10 log10(MSE of the image): NAFNet's and
    HINet's PSNRLoss. Its gradient on an image is the MSE's divided by that image's MSE, so every image of a
    batch counts by its relative error, as the mean PSNR gain it is judged by does; with the plain MSE a
    strongly blurred image outweighs a lightly blurred one by their errors' ratio (10x at 17 dB against 27).
    `keep`: the mean over those images only (kept_mean)."""
    per_image_loss = 10.0 * torch.log10(per_image_mse(output, target) + _PSNR_LOSS_EPS)
    return per_image_loss.mean() if keep is None else kept_mean(per_image_loss, keep)


def per_image_mse(output: Tensor, target: Tensor) -> Tensor:
    """[B]: each image's mean squared error, in fp32."""
    return (output.float() - target.float()).pow(2).flatten(1).mean(1)


def one_colour(images: Tensor) -> Tensor:
    """[B] bool: which images of a [B,C,H,W] batch are one colour, every channel constant over the image.

    Such a crop (a patch of clipped sky, a flat region of a noise-free synthetic pair) is a degenerate input
    for the Golf networks: every layer's features stay constant over it, each InstanceNorm divides by
    sqrt(0 + eps), and the gradient grows by 1/sqrt(1e-5) = 316 per norm on its way back. Measured once: one
    such crop among 8 gave the demo's F a gradient norm of 7e15 (fp32; 3e18 in bf16) against 0.004 without it
    (tests/test_flat_crops.py checks a factor above 1e8), and a single such step leaves Adam's second moments
    inflated for the rest of a run. A crop differing by one pixel of
    1/255 is harmless. The trainer leaves these crops out of the loss (golf_dist.training.stages)."""
    return (images.amax(dim=(2, 3)) == images.amin(dim=(2, 3))).all(dim=1)


def kept_mean(per_image: Tensor, keep: Tensor) -> Tensor:
    """The mean of `per_image` ([B]) over the images `keep` marks; 0 (with a zero gradient) when none is kept.
    The others get a gradient of exactly 0, so nothing of them reaches the network's weights."""
    weights = keep.to(per_image.dtype)
    return (per_image * weights).sum() / weights.sum().clamp(min=1.0)


class GolfLoss(nn.Module):
    """Lc + w * Lp. forward returns {"total", "content", "perceptual"} (scalars). Lc is the pixel MSE (the
    paper's), or with content="psnr" psnr_loss (then Lc is in dB, negative, and lower is better too)."""

    def __init__(self, perceptual_weight: float, vgg: VGGFeatures | None, content: str = "mse"):
        super().__init__()
        if perceptual_weight < 0:
            raise ValueError(f"perceptual_weight must be >= 0, got {perceptual_weight}")
        if perceptual_weight > 0 and vgg is None:
            raise ValueError("perceptual_weight > 0 needs a VGGFeatures network")
        if content not in CONTENT_LOSSES:
            raise ValueError(f"unknown content loss {content!r}: use {' or '.join(CONTENT_LOSSES)}")
        self.perceptual_weight = float(perceptual_weight)
        self.vgg = vgg if perceptual_weight > 0 else None
        self.content = content

    def target_features(self, target: Tensor) -> Tensor | None:
        """VGG features of the target (no grad), or None when the perceptual term is off."""
        if self.vgg is None:
            return None
        with torch.no_grad():
            return self.vgg(target)

    def forward(
        self, output: Tensor, target: Tensor, target_feats: Tensor | None = None, keep: Tensor | None = None
    ) -> dict[str, Tensor]:
        """`target_feats` lets a caller pass `target_features(target)` computed once for many outputs. `keep`
        ([B] bool): each term is the mean over those images only (kept_mean); None: over all, the batch means
        of every earlier run, bit for bit."""
        if self.content == "psnr":
            content = psnr_loss(output, target, keep)
        elif keep is None:
            content = F.mse_loss(output, target)
        else:
            content = kept_mean(per_image_mse(output, target), keep)
        if self.vgg is None:
            perceptual = torch.zeros((), dtype=content.dtype, device=content.device)
            total = content
        else:
            if target_feats is None:
                target_feats = self.target_features(target)
            feats = self.vgg(output)
            # mean over B*d*h*w elements == the batch mean of ||P(x)-P(x~)||^2 / (w h d)
            if keep is None:
                perceptual = F.mse_loss(feats.float(), target_feats.float())
            else:
                perceptual = kept_mean(per_image_mse(feats, target_feats), keep)
            total = content + self.perceptual_weight * perceptual
        return {"total": total, "content": content, "perceptual": perceptual}


def iterate_weights(n: int, weighting: str = "uniform") -> list[float]:
    """The weights of iterates 1..n in Eq. 4, summing to 1: uniform is the paper's mean; linear weighs
    iterate i by i, so the later iterates, the ones test time keeps, count more; last scores iterate n
    alone, so G learns steps whose n-th lands on the target (the earlier iterates are on the way there)."""
    if weighting == "uniform":
        raw = [1.0] * n
    elif weighting == "linear":
        raw = [float(i) for i in range(1, n + 1)]
    elif weighting == "last":
        raw = [0.0] * (n - 1) + [1.0]
    else:
        raise ValueError(f"unknown iterate weighting {weighting!r}: use uniform, linear or last")
    return [w / sum(raw) for w in raw]


def unrolled_loss(
    loss_fn: Callable[..., dict[str, Tensor]],
    iterates: list[Tensor],
    target: Tensor,
    checkpoint: bool,
    weighting: str = "uniform",
    keep: Tensor | None = None,
) -> dict[str, Tensor]:
    """Eq. 4: the mean over i = 1..N of loss_fn(iterate_i, target), for each key (`weighting` linear: the
    mean weighted by i; last: iterate N alone; see iterate_weights). Iterates of weight 0 are not scored.
    `keep` ([B] bool, or None for all) goes to each loss_fn call: the images it scores.

    With `checkpoint` (and grad enabled) each loss call is checkpointed, so VGG activations are
    not held for all N iterates at once. A GolfLoss gets the target's VGG features once.
    """
    if not iterates:
        raise ValueError("unrolled_loss needs at least one iterate")
    extra: tuple = ()
    if isinstance(loss_fn, GolfLoss):
        extra = (loss_fn.target_features(target),)
    use_ckpt = checkpoint and torch.is_grad_enabled()
    weights = iterate_weights(len(iterates), weighting)
    kw = {} if keep is None else {"keep": keep}
    sums: dict[str, Tensor] = {}
    for x, weight in zip(iterates, weights):
        if weight == 0.0:
            continue
        if use_ckpt:
            terms = _checkpoint(loss_fn, x, target, *extra, use_reentrant=False, **kw)
        else:
            terms = loss_fn(x, target, *extra, **kw)
        for k, v in terms.items():
            # uniform keeps the plain sum / N, the arithmetic of every earlier run (bitwise resume of old runs)
            term = v if weighting == "uniform" else v * weight
            sums[k] = sums[k] + term if k in sums else term
    n = len(iterates)
    return {k: (v / n if weighting == "uniform" else v) for k, v in sums.items()}
