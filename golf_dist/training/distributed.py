"""What training across processes needs beyond Accelerate's defaults: the mixed precision a launcher asks
for, process-group timeouts and DeepSpeed ZeRO-2 specifics (the launcher itself: golf_dist/commands/launch.py).

DeepSpeed and checkpoints: under ZeRO-2 each rank holds only its slice of Adam's state, and with
bf16 the model's parameters are bf16 copies of fp32 master weights held by the optimizer.
`full_state` gathers the fp32 weights and the whole Adam state from every rank into the layout
`torch.optim.Adam.state_dict()` has, so a checkpoint is the same file whether DDP or DeepSpeed wrote
it, and `load_full_state` puts such a checkpoint back into a DeepSpeed engine (resume works across
DDP <-> DeepSpeed and across world sizes).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch

from golf_dist.errors import ConfigError

TIMEOUT_ENV = "GOLF_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800


# ---- Accelerator construction --------------------------------------------------------------------


def resolve_mixed_precision(configured: str, launcher: str | None = None) -> str:
    """The mixed precision to run with: the golf config's train.mixed_precision, or the launcher's.

    `accelerate launch --config_file configs/accelerate/one_node.yaml` asks for bf16 through
    ACCELERATE_MIXED_PRECISION; an explicit Accelerator(mixed_precision=...) would silently override
    it. Rule: whichever of the two is not "no" wins (the launcher's over the config's auto); both set and
    different is a ConfigError. auto that no launcher overrides comes back as auto (make_accelerator resolves it).
    """
    launcher = (launcher if launcher is not None else os.environ.get("ACCELERATE_MIXED_PRECISION", "no")).lower()
    configured = configured.lower()
    if launcher in ("", "no"):
        return configured
    if configured in ("no", "auto") or configured == launcher:
        return launcher
    raise ConfigError(
        f"config key 'train.mixed_precision'={configured} disagrees with the launcher's mixed precision "
        f"{launcher} (accelerate launch --mixed_precision or the config file's mixed_precision); set one of them"
    )


def process_group_timeout() -> timedelta:
    """How long a collective may wait for the other ranks before the run fails (GOLF_DIST_TIMEOUT_S).

    A rank that hangs (not one that dies: torchrun ends the others then) would otherwise block the
    rest for PyTorch's default (10 min NCCL, 30 min gloo). Long enough for a checkpoint or a
    validation on the main process while the others wait at the barrier.
    """
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ConfigError(f"environment variable {TIMEOUT_ENV}={raw!r} must be a positive number of seconds")
    return timedelta(seconds=seconds)


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def configure_deepspeed(
    accelerator, per_device: int, accum: int, global_batch: int, grad_clip: float = 0.0
) -> dict[str, Any]:
    """Fill the DeepSpeed config's batch sizes (and gradient clipping) from the golf config, before `prepare()`.

    Accelerate takes `train_micro_batch_size_per_gpu` from a prepared DataLoader; our loader is not
    prepared (its sharding is ours), so it is set here. A JSON with explicit batch values that
    disagree with data.batch_size / train.grad_accum is a ConfigError.
    """
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    wanted = {
        "train_micro_batch_size_per_gpu": per_device,
        "gradient_accumulation_steps": accum,
        "train_batch_size": global_batch,
    }
    for key, value in wanted.items():
        current = ds.get(key, "auto")
        if current != "auto" and int(current) != value:
            raise ConfigError(
                f"DeepSpeed config sets {key}={current}, but data.batch_size={global_batch} and "
                f'train.grad_accum={accum} give {value}; set it to "auto" in the JSON'
            )
        ds[key] = value
    # the engine clips inside its step: train.grad_clip goes into its config (0 = off, as in DeepSpeed)
    current = ds.get("gradient_clipping", "auto")
    if current not in ("auto", None) and float(current) != grad_clip:
        raise ConfigError(
            f"DeepSpeed config sets gradient_clipping={current}, but train.grad_clip={grad_clip}; "
            'set it to "auto" in the JSON'
        )
    ds["gradient_clipping"] = grad_clip
    zero = ds.get("zero_optimization", {}).get("stage", 0)
    if zero not in (0, 1, 2):
        raise ConfigError(
            f"DeepSpeed ZeRO stage {zero}: this trainer supports stages 0-2 (stage 3 partitions the weights, "
            "which full_state does not gather)"
        )
    return ds


def deepspeed_autocast(ds_config: dict[str, Any], device: torch.device) -> Callable[[], Any] | None:
    """With DeepSpeed bf16 the trained network's weights are bf16 while the data, the frozen F and
    the loss are fp32: run forward passes under bf16 autocast (Accelerate's autocast is off under
    DeepSpeed). None when DeepSpeed runs in fp32."""
    if str(ds_config.get("bf16", {}).get("enabled", False)).lower() == "true":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    if str(ds_config.get("fp16", {}).get("enabled", False)).lower() == "true":
        raise ConfigError("DeepSpeed fp16 is not supported here (InstanceNorm overflows); use bf16 in the JSON")
    return None


# ---- DeepSpeed: checkpoints in the plain Adam layout ---------------------------------------------


def _zero_optimizer(optimizer):
    """The DeepSpeedZeroOptimizer behind Accelerate's wrapper (or the one deepspeed.initialize returned)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner if hasattr(inner, "single_partition_of_fp32_groups") else optimizer


def full_state(module: torch.nn.Module, optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """fp32 weights and Adam's state of a DeepSpeed ZeRO-1/2 model, whole, in torch.optim.Adam's layout.

    A collective: every rank must call it (each contributes its partition). Returns CPU tensors.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    zero = _zero_optimizer(optimizer)
    base = zero.optimizer  # the torch.optim.Adam whose params are the flat fp32 partitions
    names = [n for n, _ in module.named_parameters()]
    params = [p for _, p in module.named_parameters()]
    weights = {}
    for name, p in zip(names, params):
        full = safe_get_full_fp32_param(p)
        if full is None:
            raise RuntimeError(f"parameter {name} is not managed by a DeepSpeed ZeRO-1/2 optimizer")
        weights[name] = full.detach().float().cpu().clone()
    for name, buf in module.named_buffers():
        weights[name] = buf.detach().cpu().clone()
    state: dict[int, dict[str, torch.Tensor]] = {}
    steps = [s["step"] for s in base.state.values() if "step" in s]
    if steps:
        step = torch.as_tensor(steps[0], dtype=torch.float32).detach().cpu().clone()
        for i, p in enumerate(params):
            entry = {"step": step.clone()}
            for key in ("exp_avg", "exp_avg_sq"):
                entry[key] = safe_get_full_optimizer_state(p, key).detach().float().cpu().clone()
            state[i] = entry
    group = {k: v for k, v in base.param_groups[0].items() if k != "params"}
    return weights, {"state": state, "param_groups": [{**group, "params": list(range(len(params)))}]}


def load_full_state(module: torch.nn.Module, optimizer, weights: dict[str, torch.Tensor], adam: dict[str, Any]) -> None:
    """Put a checkpoint in Adam's layout (`full_state`'s, or one DDP wrote) into a DeepSpeed ZeRO-1/2
    model: the fp32 master weights, their bf16/fp32 working copies, Adam's moments and step."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    zero = _zero_optimizer(optimizer)
    base = zero.optimizer
    named = dict(module.named_parameters())
    missing = sorted(set(named) - set(weights))
    if missing:
        raise ConfigError(f"checkpoint has no weights for {missing[:3]}...: it belongs to another network")
    with torch.no_grad():
        for name, p in named.items():
            value = weights[name].to(p.device)
            safe_set_full_fp32_param(p, value.float())
            p.data.copy_(value.to(p.dtype))
        for name, buf in module.named_buffers():
            if name in weights:
                buf.copy_(weights[name])
    params = list(named.values())
    state = adam.get("state", {})
    if state:
        first = state[0] if 0 in state else state[str(0)]
        step = first["step"]
        if not base.state:
            # a fresh engine: Adam creates its state at the first step, and ZeRO links each parameter
            # to its fragment of that state only then; create both now, then overwrite the values
            for flat in zero.single_partition_of_fp32_groups:
                base.state[flat] = {
                    "step": torch.tensor(float(step)),
                    "exp_avg": torch.zeros_like(flat),
                    "exp_avg_sq": torch.zeros_like(flat),
                }
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()
        for i, p in enumerate(params):
            entry = state[i] if i in state else state[str(i)]
            for key in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(p, entry[key].to(p.device).float(), key)
        for s in base.state.values():
            if "step" in s:
                s["step"] = (
                    torch.as_tensor(step, dtype=torch.float32).clone() if torch.is_tensor(s["step"]) else float(step)
                )
    for key in ("lr", "initial_lr"):
        for group in adam.get("param_groups", []):
            if key in group:
                for g in base.param_groups:
                    g[key] = group[key]
