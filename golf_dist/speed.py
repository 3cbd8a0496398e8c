"""The speed layer, in one place for training, evaluation, deblurring and the benchmark (config section
`speed:`): torch.compile, channels_last, TF32, cudnn.benchmark, fused Adam and the fused InstanceNorm + ReLU
kernel (golf_dist/fused_norm.py).

Each switch is auto, on or off; auto means on where a CUDA GPU runs the work and off on a CPU, so CPU runs
stay exactly what eager PyTorch computes (the tests' bitwise resume, the demo's figures). cudnn.benchmark
picks convolution algorithms by timing them, which may differ between runs: auto keeps it off in training,
whose kill-and-resume is promised bitwise exact, and on for evaluation, deblurring and benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from golf_dist.fused_norm import fuse_norm_relu, kernel_available
from golf_dist.log import get_logger


@dataclass(frozen=True)
class Speed:
    """The switches resolved for one device and one kind of work."""

    compile: bool = False
    compile_backend: str = "inductor"
    channels_last: bool = False
    tf32: bool = False
    cudnn_benchmark: bool = False
    fused_adam: bool = False
    fused_norm: bool = False
    cuda_graphs: bool = False  # compile's "reduce-overhead" mode: each shape's launches recorded once, replayed

    def describe(self) -> str:
        names = ("compile", "channels_last", "tf32", "cudnn_benchmark", "fused_adam", "fused_norm", "cuda_graphs")
        on = [name for name in names if getattr(self, name)]
        if self.compile:
            on[0] = f"compile ({self.compile_backend})"
        return ", ".join(on) or "eager, no speed options"


EAGER = Speed()


def _switch(value: str, default: bool) -> bool:
    return default if value == "auto" else value == "on"


def resolve(speed_cfg, device: torch.device, training: bool) -> Speed:
    """The config's switches (golf_dist.config.SpeedConfig) for work on `device`."""
    cuda = device.type == "cuda"
    compile_on = _switch(speed_cfg.compile, cuda)
    return Speed(
        compile=compile_on,
        compile_backend=speed_cfg.compile_backend,
        channels_last=_switch(speed_cfg.channels_last, cuda),
        tf32=bool(speed_cfg.tf32) and cuda,
        cudnn_benchmark=_switch(speed_cfg.cudnn_benchmark, cuda and not training),
        fused_adam=_switch(speed_cfg.fused_adam, cuda),
        # auto: where Triton runs it and torch.compile does not already generate its own fused kernels
        fused_norm=_switch(speed_cfg.fused_norm, cuda and kernel_available() and not compile_on),
        # CUDA graphs ride on torch.compile (inductor's reduce-overhead mode, which keeps static input buffers and
        # copies each batch into them; each input shape is recorded once). auto stays off until the path has been
        # measured on a GPU (docs/benchmark.md); on: for any work on CUDA with compile on
        cuda_graphs=compile_on and cuda and _switch(speed_cfg.cuda_graphs, False),
    )


def apply_backend_flags(speed: Speed) -> None:
    """Process-wide switches: TF32 for fp32 matmuls and convolutions, cudnn.benchmark."""
    torch.backends.cuda.matmul.allow_tf32 = speed.tf32
    torch.backends.cudnn.allow_tf32 = speed.tf32
    torch.backends.cudnn.benchmark = speed.cudnn_benchmark


def prepare_module(module: torch.nn.Module, speed: Speed) -> torch.nn.Module:
    """The fused InstanceNorm + ReLU (in place), channels_last weights, then torch.compile; returns the module to
    call (the compiled wrapper keeps the original's parameters, so optimizers, EMA and state dicts see the same
    tensors under the same names)."""
    if speed.fused_norm:
        fuse_norm_relu(module)
    if speed.channels_last:
        module = module.to(memory_format=torch.channels_last)
    if speed.compile:
        mode = "reduce-overhead" if speed.cuda_graphs and speed.compile_backend == "inductor" else None
        module = torch.compile(module, backend=speed.compile_backend, mode=mode)
    return module


def prepare_input(x: torch.Tensor, speed: Speed) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if speed.channels_last and x.dim() == 4 else x


def adam_options(speed: Speed, device: torch.device) -> dict:
    """Extra keyword arguments for torch.optim.Adam: the fused kernel where it is on and the device is CUDA."""
    return {"fused": True} if speed.fused_adam and device.type == "cuda" else {}


def bf16_is_slow_here(precision: str, device: torch.device) -> bool:
    """bf16 asked for on a CPU whose oneDNN has no bf16 kernels (no AVX-512: an AVX2-only CPU). Autocast still
    works there, but its convolutions take a reference path many times slower than fp32: `launch/benchmark.py
    --precision bf16` against fp32 on such a CPU shows it (docs/benchmark.md)."""
    if precision != "bf16" or device.type != "cpu":
        return False
    try:
        return not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):  # a build without oneDNN, or one that no longer has the query
        return False


def warn_if_bf16_is_slow(precision: str, device: torch.device) -> None:
    if bf16_is_slow_here(precision, device):
        get_logger(__name__).warning(
            "train.mixed_precision=bf16 on a CPU without oneDNN bf16 kernels (no AVX-512): its convolutions run "
            "many times slower than fp32 here; train.mixed_precision=no is faster")


def for_inference(f: torch.nn.Module, g: torch.nn.Module | None, speed_cfg, device: torch.device):
    """F and G (or None) made ready for evaluation or deblurring with the switches of `speed_cfg` (None: the
    defaults), the process-wide flags set; (f, g) to call."""
    if speed_cfg is None:
        from golf_dist.config import SpeedConfig

        speed_cfg = SpeedConfig()
    speed = resolve(speed_cfg, device, training=False)
    apply_backend_flags(speed)
    return prepare_module(f, speed), (prepare_module(g, speed) if g is not None else None)
