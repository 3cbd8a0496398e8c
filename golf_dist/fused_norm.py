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

import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

try:  # ships with CUDA builds of torch; CPU builds may lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK_HW = 64  # rows (pixels) per tile
BLOCK_C = 16   # channels per program: F has 32 and G 16 channels, the last layers 3


def kernel_available(x: Tensor | None = None) -> bool:
    """Whether the Triton kernel can run (on `x`'s device, when given)."""
    if triton is None:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return x is None or x.is_cuda


if triton is not None:

    @triton.jit
    def _fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, HW, C, s_n, s_hw, s_c, eps,
                    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
        n = tl.program_id(0)
        cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cs < C
        base = n * s_n
        # pass 1: the mean; pass 2: the variance around it (two passes: no cancellation on large frames)
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for start in range(0, HW, BLOCK_HW):
            rows = start + tl.arange(0, BLOCK_HW)
            m = (rows < HW)[:, None] & cmask[None, :]
            offs = base + rows[:, None] * s_hw + cs[None, :] * s_c
            acc += tl.sum(tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32), axis=0)
        mean = acc / HW
        acc2 = tl.zeros([BLOCK_C], dtype=tl.float32)
        for start in range(0, HW, BLOCK_HW):
            rows = start + tl.arange(0, BLOCK_HW)
            m = (rows < HW)[:, None] & cmask[None, :]
            offs = base + rows[:, None] * s_hw + cs[None, :] * s_c
            d = tl.where(m, tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32) - mean[None, :], 0.0)
            acc2 += tl.sum(d * d, axis=0)
        rstd = 1.0 / tl.sqrt(acc2 / HW + eps)
        w = tl.load(w_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
        scale = w * rstd
        shift = b - mean * scale
        for start in range(0, HW, BLOCK_HW):
            rows = start + tl.arange(0, BLOCK_HW)
            m = (rows < HW)[:, None] & cmask[None, :]
            offs = base + rows[:, None] * s_hw + cs[None, :] * s_c
            x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
            y = tl.maximum(x * scale[None, :] + shift[None, :], 0.0)
            tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=m)
        tl.store(mean_ptr + n * C + cs, mean, mask=cmask)
        tl.store(rstd_ptr + n * C + cs, rstd, mask=cmask)

    @triton.jit
    def _bwd_kernel(x_ptr, dy_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_ptr, db_ptr, HW, C,
                    s_n, s_hw, s_c, g_n, g_hw, g_c, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
        n = tl.program_id(0)
        cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cs < C
        mean = tl.load(mean_ptr + n * C + cs, mask=cmask, other=0.0)
        rstd = tl.load(rstd_ptr + n * C + cs, mask=cmask, other=0.0)
        w = tl.load(w_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
        # pass 1: sum(dz) and sum(dz * xhat) over the image, dz = dy where the ReLU let z = w xhat + b through
        s1 = tl.zeros([BLOCK_C], dtype=tl.float32)
        s2 = tl.zeros([BLOCK_C], dtype=tl.float32)
        for start in range(0, HW, BLOCK_HW):
            rows = start + tl.arange(0, BLOCK_HW)
            m = (rows < HW)[:, None] & cmask[None, :]
            x = tl.load(x_ptr + n * s_n + rows[:, None] * s_hw + cs[None, :] * s_c, mask=m, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + n * g_n + rows[:, None] * g_hw + cs[None, :] * g_c, mask=m, other=0.0).to(tl.float32)
            xhat = (x - mean[None, :]) * rstd[None, :]
            dz = tl.where(m & (xhat * w[None, :] + b[None, :] > 0), dy, 0.0)
            s1 += tl.sum(dz, axis=0)
            s2 += tl.sum(dz * xhat, axis=0)
        tl.store(db_ptr + n * C + cs, s1, mask=cmask)  # per image; summed over the batch by the caller
        tl.store(dw_ptr + n * C + cs, s2, mask=cmask)
        mean_dz = s1 / HW
        mean_dzx = s2 / HW
        # pass 2: dx = w rstd (dz - mean(dz) - xhat mean(dz xhat)), written in x's layout
        for start in range(0, HW, BLOCK_HW):
            rows = start + tl.arange(0, BLOCK_HW)
            m = (rows < HW)[:, None] & cmask[None, :]
            offs = n * s_n + rows[:, None] * s_hw + cs[None, :] * s_c
            x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + n * g_n + rows[:, None] * g_hw + cs[None, :] * g_c, mask=m, other=0.0).to(tl.float32)
            xhat = (x - mean[None, :]) * rstd[None, :]
            dz = tl.where(xhat * w[None, :] + b[None, :] > 0, dy, 0.0)
            dx = (w * rstd)[None, :] * (dz - mean_dz[None, :] - xhat * mean_dzx[None, :])
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)


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
        grid = (n, triton.cdiv(c, BLOCK_C))
        _fwd_kernel[grid](x, weight, bias, y, mean, rstd, h * w, c, *_flat_strides(x), eps,
                          BLOCK_HW=BLOCK_HW, BLOCK_C=BLOCK_C)
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
        grid = (n, triton.cdiv(c, BLOCK_C))
        _bwd_kernel[grid](x, dy, weight, bias, mean, rstd, dx, dw, db, h * w, c, *_flat_strides(x),
                          *_flat_strides(dy), BLOCK_HW=BLOCK_HW, BLOCK_C=BLOCK_C)
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
            if type(norm) is nn.InstanceNorm2d and norm.affine and not norm.track_running_stats \
                    and isinstance(act, nn.ReLU):
                new = InstanceNormReLU(norm.num_features, eps=norm.eps, affine=True)
                new.weight, new.bias = norm.weight, norm.bias  # the same Parameters, under the same names
                seq[i], seq[i + 1] = new, nn.Identity()
                fused += 1
    return fused
