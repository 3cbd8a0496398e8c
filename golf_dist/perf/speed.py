"""The speed layer, in one place for training, evaluation, deblurring and the benchmark (config section
`speed:`): torch.compile, channels_last, TF32, cudnn.benchmark, fused Adam and the fused InstanceNorm + ReLU
kernel (golf_dist/perf/fused_norm.py).

Each switch is auto, try, on or off; auto means try where a CUDA GPU runs the work and off on a CPU, so CPU runs
stay exactly what eager PyTorch computes (the tests' bitwise resume, the demo's figures).

Fallback: with any switch on, the networks are checked once before work starts (`settle`): the prepared
network runs on a real batch (forward, and backward in training) and its outputs are compared with eager
PyTorch's at the same precision (TF32 off) within NUMERICS_RTOL (under bf16 autocast NUMERICS_RTOL_LOW_PRECISION)
of the outputs' largest magnitude. When it raises (compilation,
the Triton kernel, a CUDA graph capture) or disagrees, a switch that auto or try turned on is turned off (in
FALLBACK_ORDER), with one warning naming it and the error's first line, and the check runs again; the work goes on
with the switches that pass, and the callers record what was turned off as `speed_fallback` (an MLflow tag and a
speed_fallback.json). A switch set to `on` is never turned off: its failure fails the run, with its error. Fused
Adam is checked the same way before training takes the optimizer (golf_dist/training/speed_check.py: one fused
step on a copy of the weights against the unfused step). cudnn.benchmark
picks convolution algorithms by timing them, which may differ between runs: auto keeps it off in training,
whose kill-and-resume is promised bitwise exact, and on for evaluation, deblurring and benchmarks.
"""

from __future__ import annotations

import copy
import importlib
import json
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from golf_dist.config import Switch, choices_of
from golf_dist.errors import ConfigError, GolfError
from golf_dist.log import get_logger
from golf_dist.perf.fused_norm import fuse_norm_relu, kernel_available, unfuse_norm_relu

SWITCH_VALUES = choices_of(Switch)  # auto | try | on | off (golf_dist.config.SpeedConfig)
# The switches the start-up check may turn off, in the order it turns them off when the prepared network fails
# (CUDA graphs ride on compile; TF32 last: it changes numbers, never fails)
FALLBACK_ORDER = ("cuda_graphs", "compile", "fused_norm", "channels_last", "tf32")
# Prepared against eager outputs at the same precision: |prepared - eager| <= RTOL x max|eager|. fp32 and TF32
# (10 bits of mantissa, eager's reference without it): 1e-2. Under bf16 autocast (8 bits, 2^-8 ~ 4e-3 per rounding)
# compiled or channels_last convolutions round in another order: a random-init F differs from eager bf16 by ~1e-2
# of its scale on a CPU, hence 4e-2 there
NUMERICS_RTOL = 1e-2
NUMERICS_RTOL_LOW_PRECISION = 4e-2


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
    return default if value == "auto" else value in ("on", "try")


def resolve(speed_cfg, device: torch.device, training: bool) -> Speed:
    """The config's switches (golf_dist.config.SpeedConfig) for work on `device`."""
    cuda = device.type == "cuda"
    compile_on = _switch(speed_cfg.compile, cuda)
    if compile_on:
        compile_backend(speed_cfg.compile_backend)  # a custom backend that cannot be imported: a config error now
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
        module = torch.compile(module, backend=compile_backend(speed.compile_backend), mode=mode)
    return module


def compile_backend(name: str):
    """torch.compile's backend: a registered name (inductor, aot_eager, ...) or "module:function", a custom
    backend (a function of the FX graph and example inputs returning a callable) imported from that module."""
    if ":" not in name:
        return name
    module_name, _, attr = name.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"config key 'speed.compile_backend'={name!r}: cannot import it ({err})") from None


def unprepare(module: torch.nn.Module) -> torch.nn.Module:
    """The eager network inside what prepare_module returned: compile's wrapper dropped, the fused norms split
    back, NCHW weights; the same Parameters throughout (an optimizer holding them goes on working)."""
    module = getattr(module, "_orig_mod", module)
    unfuse_norm_relu(module)
    return module.to(memory_format=torch.contiguous_format)


def is_checked(speed: Speed) -> bool:
    """Whether any switch the start-up check looks at is on (none on a CPU by default: no check, no cost)."""
    return any(getattr(speed, name) for name in FALLBACK_ORDER)


def explicit_switches(speed_cfg) -> frozenset[str]:
    """The switches set to `on`: never turned off (CUDA graphs on needs compile, so compile stays too)."""
    on = {name for name in FALLBACK_ORDER if name != "tf32" and getattr(speed_cfg, name) == "on"}
    return frozenset(on | ({"compile"} if "cuda_graphs" in on else set()))


class NumericsMismatch(GolfError):
    """The prepared network's outputs are not eager's within NUMERICS_RTOL."""


def tolerance(x: torch.Tensor) -> float:
    """NUMERICS_RTOL, or NUMERICS_RTOL_LOW_PRECISION where autocast (bf16, fp16) is on for x's device."""
    return NUMERICS_RTOL_LOW_PRECISION if torch.is_autocast_enabled(x.device.type) else NUMERICS_RTOL


def compare_outputs(
    prepared: Sequence[torch.Tensor],
    eager: Sequence[torch.Tensor],
    rtol: float = NUMERICS_RTOL,
    what: str = "outputs differ from eager PyTorch's",
) -> None:
    """Raise NumericsMismatch unless each prepared output is within rtol of eager's scale (`what`: how the
    message names the two sides)."""
    for got, want in zip(prepared, eager):
        got, want = got.detach().float(), want.detach().float()
        scale = want.abs().max().item()
        err = (got - want).abs().max().item() if got.shape == want.shape else float("inf")
        if not err <= rtol * max(scale, 1e-6):  # also catches NaN
            raise NumericsMismatch(f"{what} by {err:.3g}, more than {rtol:g} x their largest magnitude {scale:.3g}")


@contextmanager
def tf32_off():
    """Eager's reference numbers: fp32 convolutions and matmuls without TF32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def settle(
    speed: Speed, explicit: frozenset[str], attempt: Callable[[Speed], None], what: str
) -> tuple[Speed, list[dict[str, str]]]:
    """Call attempt(speed) (prepare, run once, compare_outputs) until it passes, turning off one switch that is
    not in `explicit` after each failure, in FALLBACK_ORDER. Returns the switches that passed and the fallbacks
    ({"switch", "reason", "work"}); re-raises the error when only explicit switches are left to turn off."""
    fallbacks: list[dict[str, str]] = []
    while True:
        try:
            attempt(speed)
            return speed, fallbacks
        except ConfigError:  # the user's mistake, not this machine's: never a fallback
            raise
        except Exception as err:  # noqa: BLE001 - whatever compile, Triton or a graph capture raises
            candidates = [name for name in FALLBACK_ORDER if getattr(speed, name) and name not in explicit]
            if not candidates:
                if isinstance(err, NumericsMismatch):
                    on = ", ".join(f"speed.{name}=on" for name in sorted(explicit) if getattr(speed, name))
                    raise NumericsMismatch(f"{what} with {on}: {err}") from None
                raise
            switch = candidates[0]
            reason = first_line(err)
            get_logger(__name__).warning(f"speed.{switch} turned off for {what}: {reason}")
            fallbacks.append({"switch": switch, "reason": reason, "work": what})
            speed = replace(speed, **{switch: False}, **({"cuda_graphs": False} if switch == "compile" else {}))
            apply_backend_flags(speed)


def _chain(networks: Sequence[torch.nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """Each network's output, each fed the previous one's (F, then G)."""
    outputs = []
    for net in networks:
        x = net(x)
        outputs.append(x)
    return outputs


def settle_training(
    speed: Speed,
    speed_cfg,
    networks: Sequence[torch.nn.Module],
    batch: tuple[torch.Tensor, torch.Tensor],
    loss_of: Callable,
    autocast: Callable,
    what: str,
) -> tuple[Speed, list[dict[str, str]], list[torch.nn.Module]]:
    """The start-up check of a training stage, before an optimizer or DDP holds the networks: `networks` (F,
    then G in stage g; eager, unprepared) prepared with `speed` run loss_of(prepared, blur, sharp) forward and
    backward once on `batch` (compile builds its graphs, the kernels and graphs run first), then their chained
    outputs are compared with eager's (TF32 off, under the same autocast); gradients are dropped after. Returns the
    switches that passed, the fallbacks and the networks prepared with them (compiled once: the steps reuse the
    graphs)."""
    blur, sharp = batch
    with torch.no_grad(), tf32_off(), autocast():  # eager at the steps' precision: bf16 against bf16
        eager = _chain([copy.deepcopy(net) for net in networks], blur)
    checked: list[torch.nn.Module] = []

    def attempt(speed: Speed) -> None:
        prepared = [prepare_module(unprepare(net), speed) for net in networks]
        x, y = prepare_input(blur, speed), prepare_input(sharp, speed)
        try:
            with autocast():
                loss_of(prepared, x, y).backward()
                with torch.no_grad():
                    outputs = _chain(prepared, x)
                rtol = tolerance(x)
        finally:
            for net in networks:
                net.zero_grad(set_to_none=True)
        compare_outputs(outputs, eager, rtol)
        checked[:] = prepared

    speed, fallbacks = settle(speed, explicit_switches(speed_cfg), attempt, what)
    return speed, fallbacks, checked


def first_line(err: BaseException) -> str:
    """ "Type: first line" of the error at the root of `err` (Dynamo wraps a backend's error in
    BackendCompilerFailed, whose own first line names only the backend)."""
    while (inner := getattr(err, "inner_exception", None) or err.__cause__) is not None:
        err = inner
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


FALLBACK_FILE = "speed_fallback.json"  # in the output folder of the work that fell back


def fallback_json(fallbacks: list[dict[str, str]]) -> bytes:
    """speed_fallback.json's content: what the start-up check turned off and why (callers write it atomically)."""
    return json.dumps(fallbacks, indent=2).encode()


def fallback_tag(fallbacks: list[dict[str, str]]) -> str:
    """The MLflow tag speed_fallback: "compile: BackendCompilerFailed: ...; fused_norm: ..." (tags hold 5000 chars)."""
    return "; ".join(f"{f['switch']}: {f['reason']}" for f in fallbacks)[:5000]


def prepare_input(x: torch.Tensor, speed: Speed) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if speed.channels_last and x.dim() == 4 else x


def adam_options(speed: Speed, device: torch.device) -> dict:
    """Extra keyword arguments for torch.optim.Adam: the fused kernel where it is on and the device is CUDA or a
    CPU (torch has a fused CPU kernel too; auto leaves it off there)."""
    return {"fused": True} if speed.fused_adam and device.type in ("cuda", "cpu") else {}


def bf16_is_slow_here(precision: str, device: torch.device) -> bool:
    """bf16 asked for on a CPU whose oneDNN has no bf16 kernels (no AVX-512: an AVX2-only CPU). Autocast still
    works there, but its convolutions take a reference path many times slower than fp32: `launch/benchmark.py
    --precision bf16` against fp32 on such a CPU shows it (docs/benchmark.md)."""
    if precision != "bf16" or device.type != "cpu":
        return False
    return cpu_has_bf16_kernels() is False


def cpu_has_bf16_kernels() -> bool | None:
    """Whether this CPU's oneDNN has bf16 kernels (AVX-512 BF16, AMX); None where torch cannot tell (a build
    without oneDNN, or one that no longer has the query)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return None


def auto_precision(device: torch.device) -> tuple[str, str]:
    """(precision, why) for train.mixed_precision=auto on `device`: bf16 where it has fast bf16 kernels (a CUDA
    GPU that supports bf16; a CPU whose oneDNN has bf16 kernels, AVX-512 BF16 or AMX), else no (fp32). On the
    2-core AVX-512 EPYC a demo F step takes 0.34 s in bf16 against 0.59 s in fp32 (docs/benchmark.md has the
    command); on an AVX2-only CPU bf16 would be many times slower (bf16_is_slow_here)."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", f"{torch.cuda.get_device_name(device)} supports bf16"
        return "no", f"{torch.cuda.get_device_name(device)} has no bf16 support"
    if device.type == "cpu":
        if cpu_has_bf16_kernels():
            return "bf16", "this CPU's oneDNN has bf16 kernels"
        return "no", "this CPU's oneDNN has no bf16 kernels (no AVX-512 BF16), so bf16 would be slower than fp32"
    return "no", f"no bf16 rule for device type {device.type}"


def warn_if_bf16_is_slow(precision: str, device: torch.device) -> None:
    if bf16_is_slow_here(precision, device):
        get_logger(__name__).warning(
            "train.mixed_precision=bf16 on a CPU without oneDNN bf16 kernels (no AVX-512): its convolutions run "
            "many times slower than fp32 here; train.mixed_precision=no is faster"
        )


class CheckedNetwork(torch.nn.Module):
    """A network for evaluation or deblurring whose first call settles the speed switches on that input: the
    prepared network's outputs against eager's (the `settle` check), then every call runs what passed."""

    def __init__(
        self,
        net: torch.nn.Module,
        speed: Speed,
        explicit: frozenset[str],
        what: str,
        on_fallback: Callable[[list[dict[str, str]]], None],
    ):
        super().__init__()
        self.net, self.speed, self.explicit, self.what, self.on_fallback = net, speed, explicit, what, on_fallback
        self.prepared: torch.nn.Module | None = None
        self.fallbacks: list[dict[str, str]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.prepared is None:
            self._settle(x)
        return self.prepared(prepare_input(x, self.speed))

    def _settle(self, x: torch.Tensor) -> None:
        with tf32_off():
            want = _chain([copy.deepcopy(self.net)], x)

        def attempt(speed: Speed) -> None:
            self.prepared = prepare_module(unprepare(self.net), speed)
            compare_outputs(_chain([self.prepared], prepare_input(x, speed)), want, tolerance(x))

        self.speed, self.fallbacks = settle(self.speed, self.explicit, attempt, self.what)
        if self.fallbacks:
            self.on_fallback(self.fallbacks)


def for_inference(
    f: torch.nn.Module,
    g: torch.nn.Module | None,
    speed_cfg,
    device: torch.device,
    on_fallback: Callable[[list[dict[str, str]]], None] | None = None,
):
    """F and G (or None) made ready for evaluation or deblurring with the switches of `speed_cfg` (None: the
    defaults), the process-wide flags set; (f, g) to call. With any switch on, each network's first call
    checks it (CheckedNetwork); on_fallback(all fallbacks so far) is called after each that falls back."""
    if speed_cfg is None:
        from golf_dist.config import SpeedConfig

        speed_cfg = SpeedConfig()
    speed = resolve(speed_cfg, device, training=False)
    apply_backend_flags(speed)
    if not is_checked(speed):
        return prepare_module(f, speed), (prepare_module(g, speed) if g is not None else None)
    found: list[dict[str, str]] = []

    def collect(fallbacks: list[dict[str, str]]) -> None:
        found.extend(fallbacks)
        if on_fallback is not None:
            on_fallback(list(found))

    explicit = explicit_switches(speed_cfg)
    return (
        CheckedNetwork(f, speed, explicit, "F", collect),
        CheckedNetwork(g, speed, explicit, "G", collect) if g is not None else None,
    )


def fallbacks_of(*networks) -> list[dict[str, str]]:
    """What the start-up check turned off in networks for_inference returned (none for unchecked ones)."""
    return [f for net in networks for f in getattr(net, "fallbacks", [])]
