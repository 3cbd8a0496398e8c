"""Throughput, latency and memory of the two training stages and of inference, on one device, eager and
with the speed layer (golf_dist/perf/speed.py) side by side. The data path: golf_dist/perf/benchmark_data.py.

Random tensors stand in for data: the figures are the networks' cost, not the loader's. Stage g is
the real recipe: frozen F under no_grad gives x0, G is unrolled N times (checkpointed per step),
Eq. 4's mean loss, one Adam step.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from golf_dist.config import SpeedConfig
from golf_dist.errors import ConfigError, GolfError
from golf_dist.losses import GolfLoss, VGGFeatures, find_vgg_weights, load_vgg_features
from golf_dist.models import f_net, g_net
from golf_dist.perf.profiling import top_operators, write_profile
from golf_dist.perf.speed import EAGER, Speed, adam_options, apply_backend_flags, prepare_input, prepare_module, resolve
from golf_dist.training.stages import FStage, GStage

PAPER_PERCEPTUAL_WEIGHT = 5e-6

# Defaults per device. The CPU ones finish in about two minutes on a 2-core machine; the CUDA ones
# are the settings of the H100 figures in docs/facts.md.
DEFAULTS = {
    "cuda": dict(
        batch=16,
        crop=256,
        unroll=8,
        steps=10,
        warmup=3,
        memory_unrolls=(4, 8, 16, 32),
        infer_repeats_256=20,
        infer_repeats_720p=10,
    ),
    "cpu": dict(
        batch=4,
        crop=64,
        unroll=8,
        steps=5,
        warmup=1,
        memory_unrolls=(4, 8, 16, 32),
        infer_repeats_256=3,
        infer_repeats_720p=1,
    ),
}

MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated over one stage-g training step (after a warm-up step, "
    "so Adam state exists) minus memory_allocated before it",
    "cpu": "peak of live bytes from the CPU allocator over one stage-g training step (after a "
    "warm-up step, so Adam state exists), above what was allocated before it: torch.profiler "
    "allocation/free events (profile_memory=True) summed in time order",
}


@dataclass
class Settings:
    """What one benchmark run does; make_settings fills it from DEFAULTS and the command line."""

    device: str
    batch: int
    crop: int
    unroll: int
    steps: int
    warmup: int
    memory_unrolls: tuple[int, ...]
    infer_repeats_256: int
    infer_repeats_720p: int
    precision: str = "fp32"
    skip_memory: bool = False
    skip_720p: bool = False
    perceptual: bool = False
    vgg_weights: str | None = None
    # the speed layer's column (golf_dist/perf/speed.py): compile on by default, so a CPU run shows it too
    skip_speed: bool = False
    compile: str = "on"
    compile_backend: str = "inductor"
    channels_last: str = "auto"
    fused_norm: str = "auto"
    # a folder: also write the top operators (kernels on a GPU) of each measured step there
    profile: str | None = None


def make_settings(device: str = "cpu", **overrides) -> Settings:
    """Settings for `device` ("cpu" or "cuda"): that device's defaults, then the non-None overrides."""
    if device not in DEFAULTS:
        raise ConfigError(f"unknown device {device!r}: use cpu or cuda")
    values = dict(DEFAULTS[device])
    values.update({k: v for k, v in overrides.items() if v is not None})
    s = Settings(device=device, **values)
    s.memory_unrolls = tuple(s.memory_unrolls)
    for name in ("batch", "crop", "unroll", "steps", "infer_repeats_256", "infer_repeats_720p"):
        if getattr(s, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(s, name)}")
    if s.warmup < 0:
        raise ConfigError(f"warmup must be >= 0, got {s.warmup}")
    if any(n < 1 for n in s.memory_unrolls):
        raise ConfigError(f"memory unrolls must be >= 1, got {list(s.memory_unrolls)}")
    for name in ("compile", "channels_last"):
        if getattr(s, name) not in ("auto", "on", "off"):
            raise ConfigError(f"--{name.replace('_', '-')} must be auto, on or off, got {getattr(s, name)!r}")
    if s.precision not in ("fp32", "bf16"):
        raise ConfigError(f"precision must be fp32 or bf16, got {s.precision!r}")
    if s.perceptual and s.crop < 32:
        raise ConfigError(f"the perceptual term needs crops of at least 32 pixels (VGG pools 5 times), got {s.crop}")
    if device == "cuda" and not torch.cuda.is_available():
        raise GolfError("--device cuda: no CUDA device is visible to torch")
    return s


def device_name(device: str) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo and torch's thread count."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    return f"{model} ({torch.get_num_threads()} threads)"


def _autocast(device: str, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _median_ms(fn: Callable[[], None], device: str, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def make_loss(perceptual: bool, vgg_weights: str | None, device: str) -> tuple[GolfLoss, str | None]:
    """The paper's loss (lambda 5e-6) or content only; the second value says which VGG weights.

    Without a weights file the VGG is randomly initialised: its cost is the same, so the timings
    stand, but the values mean nothing.
    """
    if not perceptual:
        return GolfLoss(0.0, None), None
    path = find_vgg_weights(vgg_weights)
    vgg = load_vgg_features(path) if path is not None else VGGFeatures()
    return GolfLoss(PAPER_PERCEPTUAL_WEIGHT, vgg.to(device)), str(path) if path else "random init (timing only)"


def f_train_step(f: nn.Module, opt: torch.optim.Optimizer, loss_fn: GolfLoss, blur, sharp, precision: str) -> None:
    """One stage-f step: L(F(blur), sharp), backward, Adam."""
    with _autocast(blur.device.type, precision):
        loss = FStage(loss_fn).loss(f, blur, sharp)["total"]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def g_train_step(
    f: nn.Module,
    g: nn.Module,
    opt: torch.optim.Optimizer,
    loss_fn: GolfLoss,
    blur,
    sharp,
    steps: int,
    checkpoint: bool,
    precision: str,
) -> None:
    """One stage-g step: x0 = F(blur) with F frozen, Eq. 4 over `steps` iterates of G, backward, Adam."""
    with _autocast(blur.device.type, precision):
        loss = GStage(loss_fn, f, steps, checkpoint).loss(g, blur, sharp)["total"]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _cpu_peak_bytes(fn: Callable[[], None]) -> int:
    """Peak of live CPU allocator bytes while fn runs, above the level at its start."""
    from torch._C._profiler import _EventType  # the event tree is how torch's own memory profiler reads allocations

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocs = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        ev = stack.pop()
        if ev.tag == _EventType.Allocation and ev.extra_fields.device.type == "cpu":
            allocs.append((ev.start_time_ns, ev.extra_fields.alloc_size))
        stack.extend(ev.children)
    allocs.sort()
    live = peak = 0
    for _, size in allocs:  # size is negative for a free
        live += size
        peak = max(peak, live)
    return peak


def peak_bytes(fn: Callable[[], None], device: str) -> int:
    """Peak bytes allocated while fn runs, above what was allocated before (see MEMORY_METHOD)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return _cpu_peak_bytes(fn)


def _batch(batch: int, crop: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    sharp = torch.rand(batch, 3, crop, crop, generator=gen)
    blur = (sharp + 0.05 * torch.randn(sharp.shape, generator=gen)).clamp(0, 1)
    return blur.to(device), sharp.to(device)


def stage_g_peak_bytes(
    steps: int,
    checkpoint: bool,
    batch: int = 1,
    crop: int = 32,
    device: str = "cpu",
    precision: str = "fp32",
    loss_fn: GolfLoss | None = None,
) -> int:
    """Peak memory of one stage-g training step with `steps` unrolled applications of G."""
    torch.manual_seed(0)
    f, g = f_net().to(device).requires_grad_(False), g_net().to(device)
    loss_fn = loss_fn or GolfLoss(0.0, None)
    opt = torch.optim.Adam(g.parameters(), lr=1e-3)
    blur, sharp = _batch(batch, crop, device)

    def step() -> None:
        g_train_step(f, g, opt, loss_fn, blur, sharp, steps, checkpoint, precision)

    step()  # Adam allocates its state on the first step: keep that out of the figure
    return peak_bytes(step, device)


def checkpoint_memory_ratio(steps: int = 16, batch: int = 1, crop: int = 32, device: str = "cpu") -> float:
    """Peak memory of a stage-g step with per-step checkpointing divided by the figure without it."""
    return stage_g_peak_bytes(steps, True, batch, crop, device) / stage_g_peak_bytes(steps, False, batch, crop, device)


THROUGHPUT_KEYS = (
    "train_f_crops_per_s",
    "train_g_crops_per_s",
    "train_f_step_ms",
    "train_g_step_ms",
    "infer_ms_256",
    "infer_ms_720p",
)


def _throughput(
    s: Settings, speed: Speed, loss_fn: GolfLoss, blur: torch.Tensor, sharp: torch.Tensor, column: str = "eager"
) -> dict:
    """Stage f and stage g training steps and F + 3 G inference with the switches of `speed` (EAGER: none);
    with `s.profile`, each one's top operators too (files profile_<step>_<column>.txt, key "profile")."""
    dev = s.device
    apply_backend_flags(speed)
    torch.manual_seed(0)
    blur, sharp = prepare_input(blur, speed), prepare_input(sharp, speed)
    f = prepare_module(f_net().to(dev), speed)
    opt_f = torch.optim.Adam(f.parameters(), lr=1e-3, **adam_options(speed, torch.device(dev)))
    profiled: dict[str, list[dict]] = {}

    def profiled_step(name: str, fn: Callable[[], None]) -> None:
        if s.profile:
            rows, table = top_operators(fn, dev, warmup=0, repeats=max(1, min(3, s.steps)))
            write_profile(
                Path(s.profile),
                f"{name}_{column}",
                rows,
                table,
                f"{name}, {column} ({speed.describe()}), {device_name(dev)}, {s.precision}, "
                f"batch {s.batch} of {s.crop}x{s.crop}, unroll {s.unroll}",
            )
            profiled[name] = rows

    step_f = lambda: f_train_step(f, opt_f, loss_fn, blur, sharp, s.precision)  # noqa: E731
    f_ms = _median_ms(step_f, dev, s.warmup, s.steps)
    profiled_step("train_f", step_f)
    f.requires_grad_(False)
    g = prepare_module(g_net().to(dev), speed)
    opt_g = torch.optim.Adam(g.parameters(), lr=1e-3, **adam_options(speed, torch.device(dev)))
    step_g = lambda: g_train_step(f, g, opt_g, loss_fn, blur, sharp, s.unroll, True, s.precision)  # noqa: E731
    g_ms = _median_ms(step_g, dev, s.warmup, s.steps)
    profiled_step("train_g", step_g)
    f.eval()
    g.eval()

    def infer(x: torch.Tensor) -> None:
        with torch.no_grad(), _autocast(dev, s.precision):
            y = f(x)
            for _ in range(3):
                y = g(y)

    x256 = prepare_input(torch.rand(1, 3, 256, 256, device=dev), speed)
    infer_256 = _median_ms(lambda: infer(x256), dev, 1, s.infer_repeats_256)
    profiled_step("infer_256", lambda: infer(x256))
    infer_720 = None
    if not s.skip_720p:
        # One full frame: on a 2-core CPU a single eager run takes ~20 s, so no warm-up there (except to compile).
        x720 = prepare_input(torch.rand(1, 3, 720, 1280, device=dev), speed)
        warm = 1 if dev == "cuda" or speed.compile else 0
        infer_720 = round(_median_ms(lambda: infer(x720), dev, warm, s.infer_repeats_720p), 2)
    return {
        "train_f_crops_per_s": round(s.batch / (f_ms / 1e3), 3),
        "train_g_crops_per_s": round(s.batch / (g_ms / 1e3), 3),
        "train_f_step_ms": round(f_ms, 2),
        "train_g_step_ms": round(g_ms, 2),
        "infer_ms_256": round(infer_256, 2),
        "infer_ms_720p": infer_720,
        **({"profile": profiled} if s.profile else {}),
    }


def run_benchmark(s: Settings) -> dict:
    """All figures for settings `s`, as one JSON-ready dict: eager at the top level, the speed layer's
    under "speed_layer" and their ratios (speed layer / eager for rates, eager / speed layer for times)."""
    dev = s.device
    torch.manual_seed(0)
    loss_fn, vgg_used = make_loss(s.perceptual, s.vgg_weights, dev)
    blur, sharp = _batch(s.batch, s.crop, dev)
    eager = _throughput(s, EAGER, loss_fn, blur, sharp)
    speed_layer, speedup = None, None
    if not s.skip_speed:
        speed = resolve(
            SpeedConfig(
                compile=s.compile,
                compile_backend=s.compile_backend,
                channels_last=s.channels_last,
                fused_norm=s.fused_norm,
            ),
            torch.device(dev),
            training=False,
        )
        speed_layer = {"options": speed.describe(), **_throughput(s, speed, loss_fn, blur, sharp, "speed_layer")}
        speedup = {
            key: round(speed_layer[key] / eager[key] if "per_s" in key else eager[key] / speed_layer[key], 3)
            for key in THROUGHPUT_KEYS
            if eager[key] and speed_layer[key]
        }
    apply_backend_flags(EAGER)

    memory = []
    if not s.skip_memory:
        for n in s.memory_unrolls:
            ck = stage_g_peak_bytes(n, True, s.batch, s.crop, dev, s.precision, loss_fn)
            plain = stage_g_peak_bytes(n, False, s.batch, s.crop, dev, s.precision, loss_fn)
            memory.append(
                {"unroll": n, "peak_bytes_checkpointed": ck, "peak_bytes_plain": plain, "ratio": round(ck / plain, 4)}
            )

    return {
        "device": device_name(dev),
        "torch": torch.__version__,
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items()},
        "vgg_weights": vgg_used,
        **eager,
        "speed_layer": speed_layer,
        "speedup": speedup,
        "memory": memory,
        "memory_method": MEMORY_METHOD[dev],
        "cpu_threads": torch.get_num_threads(),
    }
