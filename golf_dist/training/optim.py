"""The optimisation recipe around Adam: the learning-rate schedule (warm-up, then exp | cosine | constant),
gradient clipping by global norm, and an exponential moving average (EMA) of the weights.

The schedule is a pure function of the optimizer step, so a resumed run continues it exactly; the EMA is
saved in every checkpoint (`ema.safetensors`) for the same reason.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def lr_factor(
    step: int, steps: int, gamma: float = 0.3, decays: float = 11.0, *, warmup: int = 0, schedule: str = "exp"
) -> float:
    """The multiplier of the base lr for optimizer step `step + 1` (LambdaLR counts from 0).

    Warm-up: (step + 1) / warmup for the first `warmup` steps, so the full lr is reached at step `warmup`.
    Then, with progress p = (step - warmup) / (steps - warmup) running from 0 to 1:
      exp       gamma ** (decays * p)        the paper's "decays exponentially to gamma^11", spread smoothly
      cosine    (1 + cos(pi * p)) / 2        from 1 to 0 at the last step
      constant  1
    With warmup = 0 the exp schedule is gamma ** (decays * step / steps), as before warm-up existed.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    if schedule == "exp":
        return gamma ** (decays * progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {schedule!r} (exp, cosine or constant)")


def make_scheduler(optimizer: torch.optim.Optimizer, t) -> torch.optim.lr_scheduler.LambdaLR:
    """The LambdaLR of a TrainConfig `t` (train.steps, warmup_steps, schedule, lr_gamma, lr_decays)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, t.steps, t.lr_gamma, t.lr_decays, warmup=t.warmup_steps, schedule=t.schedule)
    )


def clip_gradients(parameters, max_norm: float) -> torch.Tensor:
    """Clip the global L2 norm of the gradients to `max_norm` (0: leave them) and return the norm before.

    Call it after gradients are reduced across ranks (after DDP's backward), so every rank sees the same
    norm and clips alike. With max_norm = 0 the gradients are not touched at all.
    """
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)  # scales each p.grad
    return norm


class EMA:
    """An exponential moving average of a network's parameters, kept in float32 in its own module copy.

    After optimizer step n (1-based) the average moves towards the weights by 1 - d_n with
        d_n = min(decay, (1 + n) / (10 + n)),
    the usual warm-up of the decay (as in TensorFlow's ExponentialMovingAverage with num_updates): early
    on the average follows the weights closely instead of staying stuck near the initialisation, which
    matters for runs of a few hundred steps. The networks here have no buffers (InstanceNorm keeps no
    running statistics), so the parameters are the whole state.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).float().eval().requires_grad_(False)
        self.updates = 0

    def decay_at(self, update: int) -> float:
        return min(self.decay, (1 + update) / (10 + update))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards `model`'s current parameters (one call per optimizer step)."""
        self.updates += 1
        d = self.decay_at(self.updates)
        ema = list(self.module.parameters())
        new = [p.detach().float() for p in model.parameters()]
        torch._foreach_lerp_(ema, new, 1.0 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, weights: dict[str, torch.Tensor], updates: int) -> None:
        self.module.load_state_dict(weights)
        self.updates = int(updates)
