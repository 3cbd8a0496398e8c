"""InstanceNorm + ReLU as one Triton kernel, forward and backward, for the pre-activation pairs of the basic
blocks (IN -> ReLU -> Conv, twice per block), with a pure-PyTorch fallback.

Why: on a GPU the small-channel convolutions of F and G are memory-bound and InstanceNorm took 13% of a
step in the team's H100 profile (docs/benchmark.md), as several passes over the activations (statistics,
normalise, ReLU, and layout copies around cuDNN's NHWC convolutions). The kernel reads a channels-last
(or NCHW) activation in place, keeps the statistics in registers and writes the ReLU'd output once.

`fuse_norm_relu(model)` swaps every IN -> ReLU pair of a ResidualCNN for one `InstanceNormReLU`
(a subclass of nn.InstanceNorm2d holding the same weight and bias) and an Identity, so the state dict,
EMA, optimizers and checkpoints see the same parameters under the same names. The kernel runs where
Triton can run it: a CUDA tensor, or any tensor under Triton's interpreter (TRITON_INTERPRET=1, how the
CPU tests check it); everywhere else the module computes F.instance_norm then F.relu, eager's own ops.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

BLOCK_HW = 64  # rows (pixels) per tile
BLOCK_C = 16  # channels per program: F has 32 and G 16 channels, the last layers 3


@functools.cache
def _kernels():
    """The kernel module (golf_dist/perf/fused_norm_kernels.py), imported on first use (Triton costs ~0.2 s to import),
    or None where Triton cannot be imported (it ships with CUDA builds of torch; CPU builds may lack it)."""
    try:
        from golf_dist.perf import fused_norm_kernels
    except ImportError:
        return None
    return fused_norm_kernels


def kernel_available(x: Tensor | None = None) -> bool:
    """Whether the Triton kernel can run (on `x`'s device, when given). A CPU tensor outside Triton's
    interpreter answers False without importing Triton."""
    if x is not None and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return _kernels() is not None


def _flat_strides(t: Tensor) -> tuple[int, int, int]:
    """(image, pixel, channel) strides of an N x C x H x W tensor whose H and W flatten into one pixel index
    (true of NCHW- and NHWC-contiguous tensors; anything else is copied to channels-last first)."""
    return t.stride(0), t.stride(3), t.stride(1)


def _flattenable(t: Tensor) -> bool:
    return t.stride(2) == t.stride(3) * t.shape[3]


def _dense(t: Tensor) -> Tensor:
    return t if _flattenable(t) else t.contiguous(memory_format=torch.channels_last)


class _InstanceNormReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        x = _dense(x)
        n, c, h, w = x.shape
        y = torch.empty_like(x)  # keeps x's layout
        mean = torch.empty(n, c, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        k = _kernels()
        grid = (n, k.triton.cdiv(c, BLOCK_C))
        k.fwd_kernel[grid](
            x, weight, bias, y, mean, rstd, h * w, c, *_flat_strides(x), eps, BLOCK_HW=BLOCK_HW, BLOCK_C=BLOCK_C
        )
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dy = _dense(dy)
        n, c, h, w = x.shape
        dx = torch.empty_like(x)
        dw = torch.empty(n, c, device=x.device, dtype=torch.float32)
        db = torch.empty_like(dw)
        k = _kernels()
        grid = (n, k.triton.cdiv(c, BLOCK_C))
        k.bwd_kernel[grid](
            x,
            dy,
            weight,
            bias,
            mean,
            rstd,
            dx,
            dw,
            db,
            h * w,
            c,
            *_flat_strides(x),
            *_flat_strides(dy),
            BLOCK_HW=BLOCK_HW,
            BLOCK_C=BLOCK_C,
        )
        return dx, dw.sum(0).to(weight.dtype), db.sum(0).to(bias.dtype), None


def instance_norm_relu(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """relu(instance_norm(x) * weight + bias) for N x C x H x W: the kernel where it can run, else eager's ops."""
    if kernel_available(x):
        return _InstanceNormReLU.apply(x, weight, bias, eps)
    return F.relu(F.instance_norm(x, weight=weight, bias=bias, eps=eps))


class InstanceNormReLU(nn.InstanceNorm2d):
    """nn.InstanceNorm2d(C, affine=True) followed by ReLU, computed by `instance_norm_relu`."""

    def forward(self, x: Tensor) -> Tensor:
        return instance_norm_relu(x, self.weight, self.bias, self.eps)


def fuse_norm_relu(model: nn.Module) -> int:
    """Replace, in place, every InstanceNorm2d(affine) directly followed by a ReLU inside an nn.Sequential
    with an InstanceNormReLU sharing its parameters, and the ReLU with an Identity. Returns how many."""
    fused = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            norm, act = seq[i], seq[i + 1]
            if (
                type(norm) is nn.InstanceNorm2d
                and norm.affine
                and not norm.track_running_stats
                and isinstance(act, nn.ReLU)
            ):
                new = InstanceNormReLU(norm.num_features, eps=norm.eps, affine=True)
                new.weight, new.bias = norm.weight, norm.bias  # the same Parameters, under the same names
                seq[i], seq[i + 1] = new, nn.Identity()
                fused += 1
    return fused


def unfuse_norm_relu(model: nn.Module) -> int:
    """Undo fuse_norm_relu in place: each InstanceNormReLU back to an InstanceNorm2d and ReLU holding the same
    Parameters (what the speed layer's fallback runs when the kernel fails). Returns how many."""
    unfused = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            fused, gap = seq[i], seq[i + 1]
            if type(fused) is InstanceNormReLU and isinstance(gap, nn.Identity):
                norm = nn.InstanceNorm2d(fused.num_features, eps=fused.eps, affine=True)
                norm.weight, norm.bias = fused.weight, fused.bias
                seq[i], seq[i + 1] = norm, nn.ReLU(inplace=False)
                unfused += 1
    return unfused
