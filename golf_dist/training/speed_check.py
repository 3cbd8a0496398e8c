"""The speed layer for a training stage: its networks prepared with the switches of `speed:`, and, with any
switch on, the start-up check first (golf_dist.speed.settle_training: the prepared networks against eager on a
real batch, a failing switch that auto or try turned on turned off), fused Adam's step checked the same way
(make_optimizer), and the record of what it turned off."""

from __future__ import annotations

from pathlib import Path

import torch

from golf_dist.data.loader import ShardPairs, to_tensor
from golf_dist.data.storage import write_atomic
from golf_dist.speed import (
    FALLBACK_FILE, Speed, fallback_json, fallback_tag, is_checked, make_adam, prepare_module, settle_fused_adam,
    settle_training,
)
from golf_dist.training.stages import FStage, GStage


def check_batch(pairs: ShardPairs, crop: int, per_device: int, device: torch.device):
    """(blur, sharp) of a training batch's shape (compile's graphs are reused by the steps): the first
    validation pairs, their top-left crop x crop squares."""
    loaded = [pairs.load(i % len(pairs)) for i in range(per_device)]
    return tuple(torch.stack([to_tensor(pair[k][:crop, :crop]) for pair in loaded]).to(device) for k in (0, 1))


def prepare_stage(trainer, speed: Speed, networks: list[torch.nn.Module], loss_fn
                  ) -> tuple[Speed, list[dict[str, str]], list[torch.nn.Module]]:
    """`networks` (F, then G in stage g) prepared for the trainer's stage; (switches, fallbacks, networks)."""
    if not is_checked(speed):  # never on a CPU by default: eager runs stay bitwise what they were
        return speed, [], [prepare_module(net, speed) for net in networks]
    t = trainer.t

    def loss_of(prepared, blur, sharp):  # the stage's own loss: unrolled and checkpointed as the steps are
        stage = FStage(loss_fn) if len(prepared) == 1 else GStage(
            loss_fn, prepared[0], t.unroll, t.gradient_checkpointing, 0, t.unroll_weighting)
        return stage.loss(prepared[-1], blur, sharp)["total"]

    batch = check_batch(trainer.val_pairs, trainer.cfg.data.crop, trainer.per_device, trainer.device)
    return settle_training(speed, trainer.cfg.speed, networks, batch, loss_of, trainer.accelerator.autocast,
                           f"training stage {trainer.stage_name}")


def make_optimizer(trainer, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Adam over `model`'s parameters as train: configures it, made before DDP or DeepSpeed take it; with fused
    Adam on, its step is checked first (golf_dist.speed.settle_fused_adam): a fallback turns it off in
    trainer.speed and joins trainer.speed_fallbacks."""
    t = trainer.t
    parameters, options = list(model.parameters()), {"lr": t.lr, "betas": (t.beta1, t.beta2)}
    trainer.speed, fallbacks = settle_fused_adam(trainer.speed, trainer.cfg.speed, parameters, trainer.device,
                                                 f"training stage {trainer.stage_name}", **options)
    trainer.speed_fallbacks = [*trainer.speed_fallbacks, *fallbacks]
    return make_adam(parameters, trainer.speed, trainer.device, **options)


def record_fallbacks(fallbacks: list[dict[str, str]], stage_dir: Path, is_main: bool) -> dict[str, str]:
    """speed_fallback.json in the stage's folder (main process); the MLflow tags that say the same."""
    if not fallbacks:
        return {}
    if is_main:
        write_atomic(stage_dir / FALLBACK_FILE, fallback_json(fallbacks))
    return {"speed_fallback": fallback_tag(fallbacks)}
