"""PSNR and SSIM per image, in torch (CPU or GPU), on [B,3,H,W] RGB in [0,1].

GoPro convention (docs/facts.md "Metrics"): full RGB frames, no border crop, no Y channel, data
range 1, outputs clamped to [0,1]. Both are computed in float64: SSIM's E[x^2] - E[x]^2 loses
digits in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SSIM_VARIANT = (
    "per-channel 2-D Gaussian window 11x11 sigma 1.5, K1=0.01 K2=0.03, data range 1, population "
    "covariance, mean over the valid region (5-pixel border dropped), channels averaged; equals "
    "skimage structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, "
    "data_range=1, channel_axis=-1)"
)

_WIN = 11
_SIGMA = 1.5
_C1 = (0.01 * 1.0) ** 2
_C2 = (0.03 * 1.0) ** 2


def _check(x: Tensor, y: Tensor) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"expected two [B,C,H,W] tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """PSNR in dB per image, [B] float64; identical images give inf."""
    _check(x, y)
    x = x.detach().clamp(0, 1).double()
    y = y.detach().clamp(0, 1).double()
    mse = (x - y).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse)


def _gaussian_1d(device: torch.device) -> Tensor:
    # scipy.ndimage's kernel as skimage calls it: truncate 3.5 -> radius int(3.5*1.5+0.5) = 5.
    r = _WIN // 2
    t = torch.arange(-r, r + 1, dtype=torch.float64, device=device)
    k = torch.exp(-0.5 * (t / _SIGMA) ** 2)
    return k / k.sum()


def ssim(x: Tensor, y: Tensor) -> Tensor:
    """SSIM per image, [B] float64 (see SSIM_VARIANT). H and W must be at least 11."""
    _check(x, y)
    b, c, h, w = x.shape
    if h < _WIN or w < _WIN:
        raise ValueError(f"SSIM needs images of at least {_WIN}x{_WIN}, got {h}x{w}")
    x = x.detach().clamp(0, 1).double()
    y = y.detach().clamp(0, 1).double()
    k = _gaussian_1d(x.device)
    kh = k.view(1, 1, _WIN, 1).repeat(c, 1, 1, 1)
    kw = k.view(1, 1, 1, _WIN).repeat(c, 1, 1, 1)

    def blur(t: Tensor) -> Tensor:
        # Separable depthwise filter without padding: exactly skimage's cropped 'valid' region,
        # where its reflect padding never reaches.
        return F.conv2d(F.conv2d(t, kh, groups=c), kw, groups=c)

    maps = blur(torch.cat([x, y, x * x, y * y, x * y]))
    ux, uy, uxx, uyy, uxy = maps.split(b)
    vx = uxx - ux * ux
    vy = uyy - uy * uy
    vxy = uxy - ux * uy
    s = ((2 * ux * uy + _C1) * (2 * vxy + _C2)) / ((ux * ux + uy * uy + _C1) * (vx + vy + _C2))
    return s.flatten(1).mean(1)
