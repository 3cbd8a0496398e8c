"""The Triton kernels behind golf_dist/perf/fused_norm.py: InstanceNorm + ReLU forward and backward over one image's
channels per program. Imported only when a kernel is about to run (fused_norm._kernels), so processes that
never run one (every CPU run) do not import Triton.

Fault injection: with GOLF_FUSED_NORM_FAULT=build in the environment when this module is imported, each kernel
raises at its launch, where Triton builds a kernel the first time and where a failed build (no C compiler, a
PTX assembler error) raises: how tests/test_speed_fallback.py checks the speed layer's fallback on a CPU."""

import os

import triton
import triton.language as tl

FAULT_ENV = "GOLF_FUSED_NORM_FAULT"


@triton.jit
def fwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    mean_ptr,
    rstd_ptr,
    HW,
    C,
    s_n,
    s_hw,
    s_c,
    eps,
    BLOCK_HW: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
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
def bwd_kernel(
    x_ptr,
    dy_ptr,
    w_ptr,
    b_ptr,
    mean_ptr,
    rstd_ptr,
    dx_ptr,
    dw_ptr,
    db_ptr,
    HW,
    C,
    s_n,
    s_hw,
    s_c,
    g_n,
    g_hw,
    g_c,
    BLOCK_HW: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
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


class _FailingBuild:
    """A kernel whose launch raises as a failed Triton build does (GOLF_FUSED_NORM_FAULT=build)."""

    def __init__(self, name: str):
        self.name = name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise RuntimeError(f"injected Triton build failure of {self.name} ({FAULT_ENV}=build)")

        return launch


if os.environ.get(FAULT_ENV) == "build":
    fwd_kernel, bwd_kernel = _FailingBuild("fwd_kernel"), _FailingBuild("bwd_kernel")
