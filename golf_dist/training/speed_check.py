"""The speed layer for a training stage: its networks prepared with the switches of `speed:`, and, with any
switch on, the start-up check first (golf_dist.perf.speed.settle_training: the prepared networks against eager on a
real batch, a failing switch that auto or try turned on turned off), fused Adam's step checked the same way
(make_optimizer), and the record of what it turned off."""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from golf_dist.data.torch_loader import ShardPairs, to_tensor
from golf_dist.errors import ConfigError
from golf_dist.files import write_atomic
from golf_dist.log import get_logger
from golf_dist.perf.speed import (
    FALLBACK_FILE,
    NumericsMismatch,
    Speed,
    adam_options,
    compare_outputs,
    fallback_json,
    fallback_tag,
    first_line,
    is_checked,
    prepare_module,
    settle_training,
)
from golf_dist.training.stages import FStage, GStage


def check_batch(pairs: ShardPairs, crop: int, per_device: int, device: torch.device):
    """(blur, sharp) of a training batch's shape (compile's graphs are reused by the steps): the first
    validation pairs, their top-left crop x crop squares."""
    loaded = [pairs.load(i % len(pairs)) for i in range(per_device)]
    return tuple(torch.stack([to_tensor(pair[k][:crop, :crop]) for pair in loaded]).to(device) for k in (0, 1))


def prepare_stage(
    trainer, speed: Speed, networks: list[torch.nn.Module], loss_fn
) -> tuple[Speed, list[dict[str, str]], list[torch.nn.Module]]:
    """`networks` (F, then G in stage g) prepared for the trainer's stage; (switches, fallbacks, networks)."""
    if not is_checked(speed):  # never on a CPU by default: eager runs stay bitwise what they were
        return speed, [], [prepare_module(net, speed) for net in networks]
    t = trainer.t

    def loss_of(prepared, blur, sharp):  # the stage's own loss: unrolled and checkpointed as the steps are
        stage = (
            FStage(loss_fn)
            if len(prepared) == 1
            else GStage(loss_fn, prepared[0], t.unroll, t.gradient_checkpointing, 0, t.unroll_weighting)
        )
        return stage.loss(prepared[-1], blur, sharp)["total"]

    batch = check_batch(trainer.val_pairs, trainer.cfg.data.crop, trainer.per_device, trainer.device)
    return settle_training(
        speed,
        trainer.cfg.speed,
        networks,
        batch,
        loss_of,
        trainer.accelerator.autocast,
        f"training stage {trainer.stage_name}",
    )


# The optimizer class fused Adam is built from: torch.optim.Adam(fused=True), or "module:Class" named by this
# environment variable, a torch.optim.Adam subclass: the hook by which the tests make the fused step fail on a
# CPU (tests/speed_backends.py), as speed.compile_backend=module:function does for compile (golf_dist/perf/speed.py)
FUSED_ADAM_CLASS_ENV = "GOLF_FUSED_ADAM_CLASS"


def fused_adam_class() -> type[torch.optim.Adam]:
    name = os.environ.get(FUSED_ADAM_CLASS_ENV, "")
    if not name:
        return torch.optim.Adam
    module_name, _, attr = name.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"environment variable {FUSED_ADAM_CLASS_ENV}={name!r}: cannot import it ({err})") from None


def make_adam(parameters, speed: Speed, device: torch.device, **kwargs) -> torch.optim.Optimizer:
    """torch.optim.Adam over `parameters` (lr, betas... in kwargs), fused where adam_options says so."""
    if adam_options(speed, device):
        return fused_adam_class()(parameters, fused=True, **kwargs)
    return torch.optim.Adam(parameters, **kwargs)


def check_fused_adam(parameters: Sequence[torch.Tensor], **kwargs) -> None:
    """One fused Adam step on a throwaway copy of `parameters` with made-up gradients against the unfused step
    (foreach on CUDA, the for-loop on a CPU) from the same start. Raises what the fused step raises, or
    NumericsMismatch unless each parameter's update is within NUMERICS_RTOL of the unfused update's largest
    magnitude (the updates, not the weights: one step moves a weight by about lr, far below rtol x its size).
    The parameters, their gradients and the global RNG are left as they were."""
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=generator).to(p.device, p.dtype) for p in parameters]
    updates = []
    for fused in (True, False):
        copies = [p.detach().clone().requires_grad_(True) for p in parameters]
        for copy_, grad in zip(copies, grads):
            copy_.grad = grad.clone()
        optimizer = fused_adam_class()(copies, fused=True, **kwargs) if fused else torch.optim.Adam(copies, **kwargs)
        optimizer.step()
        updates.append([c.detach() - p.detach() for c, p in zip(copies, parameters)])
    compare_outputs(*updates, what="fused Adam's updates differ from the unfused step's")


def settle_fused_adam(
    speed: Speed, speed_cfg, parameters: Sequence[torch.Tensor], device: torch.device, what: str, **kwargs
) -> tuple[Speed, list[dict[str, str]]]:
    """The start-up check of fused Adam (check_fused_adam), before DDP or DeepSpeed take the optimizer: when it
    raises or disagrees, fused Adam that auto or try turned on is turned off with one warning, as `settle` does
    for the other switches; set to `on`, its error fails the run. Returns (switches, fallbacks)."""
    if not adam_options(speed, device):
        return speed, []
    try:
        check_fused_adam(parameters, **kwargs)
        return speed, []
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - whatever the fused kernel raises on this machine
        if speed_cfg.fused_adam == "on":
            if isinstance(err, NumericsMismatch):
                raise NumericsMismatch(f"{what} with speed.fused_adam=on: {err}") from None
            raise
        reason = first_line(err)
        get_logger(__name__).warning(f"speed.fused_adam turned off for {what}: {reason}")
        return replace(speed, fused_adam=False), [{"switch": "fused_adam", "reason": reason, "work": what}]


def make_optimizer(trainer, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Adam over `model`'s parameters as train: configures it, made before DDP or DeepSpeed take it; with fused
    Adam on, its step is checked first (settle_fused_adam): a fallback turns it off in
    trainer.speed and joins trainer.speed_fallbacks."""
    t = trainer.t
    parameters, options = list(model.parameters()), {"lr": t.lr, "betas": (t.beta1, t.beta2)}
    trainer.speed, fallbacks = settle_fused_adam(
        trainer.speed, trainer.cfg.speed, parameters, trainer.device, f"training stage {trainer.stage_name}", **options
    )
    trainer.speed_fallbacks = [*trainer.speed_fallbacks, *fallbacks]
    return make_adam(parameters, trainer.speed, trainer.device, **options)


def record_fallbacks(fallbacks: list[dict[str, str]], stage_dir: Path, is_main: bool) -> dict[str, str]:
    """speed_fallback.json in the stage's folder (main process); the MLflow tags that say the same."""
    if not fallbacks:
        return {}
    if is_main:
        write_atomic(stage_dir / FALLBACK_FILE, fallback_json(fallbacks))
    return {"speed_fallback": fallback_tag(fallbacks)}
