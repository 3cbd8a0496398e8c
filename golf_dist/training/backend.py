"""What differs between training with plain Accelerate (DDP, or one process) and with DeepSpeed, behind
one interface, so the training loop has no DeepSpeed branches.

DeepSpeed's engine divides by the accumulation count, reduces and steps at its own accumulation boundary,
clips (gradient_clipping in its config) and partitions Adam's state across ranks (ZeRO-2); checkpoints
hold Adam's plain layout either way (golf_dist.training.distributed.full_state / load_full_state), so a
checkpoint is the same file whether DDP or DeepSpeed wrote it.

A step whose loss or gradient norm is NaN or Inf on any rank is found by both (`finish_step` returns whether
the step was finite, the same answer on every rank). The plain backend then leaves the weights and Adam
untouched (`skips_nonfinite`); DeepSpeed's engine has already stepped by then, so the trainer stops instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from golf_dist.errors import GolfError
from golf_dist.log import get_logger
from golf_dist.perf.speed import auto_precision
from golf_dist.training import distributed as dist_utils
from golf_dist.training.optim import clip_gradients

LossOf = Callable[[], dict[str, torch.Tensor]]
log = get_logger(__name__)


class NonFiniteError(GolfError):
    """Training stopped at a step whose loss or gradient norm was NaN or Inf (train.nonfinite)."""


class NonFiniteSteps:
    """train.nonfinite for the steps `finish_step` found not finite (the same on every rank): count a skipped one,
    or stop with NonFiniteError (`stop`, `patience` in a row, or a backend that cannot skip: DeepSpeed)."""

    def __init__(self, t, can_skip: bool, checkpoints: Path, rank: int):  # t: the config's TrainConfig
        self.policy, self.patience, self.can_skip = t.nonfinite, t.nonfinite_patience, can_skip
        self.checkpoints, self.rank = checkpoints, rank
        self.in_a_row = 0

    def check(self, step: int, finite: bool, step_loss: torch.Tensor, norm: torch.Tensor) -> None:
        if finite:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        what = (
            f"step {step}: the loss ({step_loss.item():.4g} on rank {self.rank}) or the gradient norm "
            f"({norm.item():.4g}) is not finite"
        )
        resume = (
            f"the checkpoints under {self.checkpoints} hold finite weights and resume as they are; a resume "
            "keeps their learning-rate schedule, so for a lower train.lr (or train.warmup_steps, train.grad_clip) "
            "start again in a new --output-dir"
        )
        if not self.can_skip:
            raise NonFiniteError(
                f"{what}; DeepSpeed has taken the step already, so the run stops here (no checkpoint "
                f"or export is written after it); {resume}"
            )
        advice = f"the weights, Adam and the EMA are those of step {step - self.in_a_row}; {resume}"
        if self.policy == "stop":
            raise NonFiniteError(f"{what} (train.nonfinite=stop); {advice}")
        if self.in_a_row >= self.patience:
            raise NonFiniteError(
                f"{what}: {self.in_a_row} non-finite steps in a row, each skipped "
                f"(train.nonfinite_patience={self.patience}); {advice}"
            )
        log.info(
            f"{what}: step skipped ({self.in_a_row} in a row; the run stops at "
            f"train.nonfinite_patience={self.patience})"
        )


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP, DeepSpeed-engine and torch.compile wrappers. Not accelerator.unwrap_model: it
    imports DeepSpeed whenever DeepSpeed is installed, and DeepSpeed's import prints its "Setting accelerator
    to CPU" warning into every CPU run, DeepSpeed or not."""
    while True:
        # DDP and DeepSpeed's engine both hold the wrapped network as `.module`
        if isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


class AccelerateBackend:
    """DDP (or one process) through Accelerate: backward with no_sync on all but the last micro-batch, then
    clip, step and zero the gradients."""

    def __init__(self, accelerator, model: torch.nn.Module, optimizer, accum: int, grad_clip: float):
        self.accelerator, self.accum, self.grad_clip = accelerator, accum, grad_clip
        self.autocast = accelerator.autocast
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.raw_model = unwrap(self.model)

    def describe(self) -> str | None:
        return None

    def micro_step(self, loss_of: LossOf, last: bool) -> dict[str, torch.Tensor]:
        """Forward and backward of one micro-batch; gradients are all-reduced on the `last` of the step."""
        with self.autocast():
            if last:
                losses = loss_of()
                self.accelerator.backward(losses["total"] / self.accum)
            else:
                with self.accelerator.no_sync(self.model):
                    losses = loss_of()
                    self.accelerator.backward(losses["total"] / self.accum)
        return losses

    # a non-finite step is skipped here before it reaches the weights (DeepSpeed's engine steps on its own)
    skips_nonfinite = True

    def finish_step(self, step_loss: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Clip, step, zero the gradients. Returns the global gradient norm before clipping (float64) and whether
        the step was finite; a non-finite one (`step_loss`, this rank's summed loss, or the norm NaN/Inf on any
        rank) is not taken: the gradients are dropped and the weights and Adam's state stay as they were."""
        scaler = self.accelerator.scaler
        if scaler is not None:  # fp16: clip and measure the true gradients
            self.accelerator.unscale_gradients()
        norm = clip_gradients(self.model.parameters(), self.grad_clip).double()
        finite = self.all_finite(norm, step_loss)
        if finite:
            self.optimizer.step()
        elif scaler is not None:
            scaler.update()  # fp16: the loss scale still shrinks after an overflow, as GradScaler.step would do
        self.optimizer.zero_grad(set_to_none=True)
        return norm, finite

    def all_finite(self, norm: torch.Tensor, step_loss: torch.Tensor) -> bool:
        """Whether the norm and the loss are finite on every rank: one all-reduce of a one-element flag (the
        norm is already global after DDP's all-reduce, the loss is this rank's). A host sync per step."""
        bad = (~torch.isfinite(norm.to(step_loss.device)) | ~torch.isfinite(step_loss)).double().reshape(1)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, "sum")
        return bad.item() == 0

    def load(self, model_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any]) -> None:
        self.raw_model.load_state_dict(model_state)
        self.optimizer.load_state_dict(optimizer_state)

    def full_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The weights and Adam's state as a checkpoint holds them. Every rank calls it."""
        return self.raw_model.state_dict(), self.optimizer.state_dict()

    def final_weights(self) -> dict[str, torch.Tensor]:
        return self.raw_model.state_dict()


class DeepSpeedBackend(AccelerateBackend):
    """DeepSpeed's engine through Accelerate; configured before `prepare` from the run's batch and clipping."""

    def __init__(
        self,
        accelerator,
        model: torch.nn.Module,
        optimizer,
        accum: int,
        grad_clip: float,
        per_device: int,
        global_batch: int,
        device: torch.device,
    ):
        self.ds_config = dist_utils.configure_deepspeed(accelerator, per_device, accum, global_batch, grad_clip)
        super().__init__(accelerator, model, optimizer, accum, grad_clip)
        # under DeepSpeed bf16: torch's bf16 autocast
        self.autocast = dist_utils.deepspeed_autocast(self.ds_config, device) or accelerator.autocast

    def describe(self) -> str:
        return (
            f"DeepSpeed ZeRO stage {self.ds_config['zero_optimization'].get('stage', 0)} "
            f"({type(self.optimizer.optimizer).__name__}), mixed precision {self.accelerator.mixed_precision}"
        )

    def micro_step(self, loss_of: LossOf, last: bool) -> dict[str, torch.Tensor]:
        # the engine divides by accum, reduces and steps at its own accumulation boundary (every accum-th
        # call); Accelerate's no_sync does not apply to it
        with self.autocast():
            losses = loss_of()
        self.model.backward(losses["total"])
        self.model.step()
        return losses

    # the engine clipped and stepped inside micro_step; with bf16 or fp32 nothing there skips a NaN/Inf step
    # (DeepSpeed's overflow skip is fp16's, which is refused here), so the trainer stops at one instead
    skips_nonfinite = False

    def finish_step(self, step_loss: torch.Tensor) -> tuple[torch.Tensor, bool]:
        # the engine clipped and stepped at the boundary; its norm is the one before clipping
        norm = torch.as_tensor(float(self.model.get_global_grad_norm() or 0.0), dtype=torch.float64)
        return norm, self.all_finite(norm, step_loss)

    def load(self, model_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any]) -> None:
        dist_utils.load_full_state(self.raw_model, self.optimizer, model_state, optimizer_state)

    def full_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        # ZeRO-2: each rank holds a slice of Adam's state (and bf16 copies of the weights); gather the fp32
        # weights and the whole state into the plain layout (a collective: every rank)
        return dist_utils.full_state(self.raw_model, self.optimizer)

    def final_weights(self) -> dict[str, torch.Tensor]:
        return self.full_state()[0]  # fp32, a collective


def make_accelerator(cfg):
    """Accelerate's Accelerator for the run, its mixed precision train.mixed_precision or what the launcher asks
    for (Accelerator.mixed_precision; the config is left as written)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    # bf16 asked for by the launch config (configs/accelerate/*.yaml) counts as well as train.mixed_precision
    precision = dist_utils.resolve_mixed_precision(cfg.train.mixed_precision)
    if precision == "auto":
        # the device Accelerate will pick: this process's GPU where there is one, else the CPU
        cuda = torch.cuda.is_available()
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
        precision, why = auto_precision(device)
        get_logger(__name__).info(f"train.mixed_precision=auto: {precision} ({why})")
    return Accelerator(
        mixed_precision=precision,
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=False),
            # a hung rank fails the collectives after GOLF_DIST_TIMEOUT_S instead of blocking the others
            InitProcessGroupKwargs(timeout=dist_utils.process_group_timeout()),
        ],
    )


def make_backend(
    accelerator,
    model,
    optimizer,
    *,
    accum: int,
    grad_clip: float,
    per_device: int,
    global_batch: int,
    device: torch.device,
) -> AccelerateBackend:
    if dist_utils.is_deepspeed(accelerator):
        return DeepSpeedBackend(accelerator, model, optimizer, accum, grad_clip, per_device, global_batch, device)
    return AccelerateBackend(accelerator, model, optimizer, accum, grad_clip)
