"""StepMeter: what the training loop measures, kept out of the loop. It sums the losses and gradient norms
of a logging window, times the wait for data and the pauses (validation, checkpoints: not training time),
and hands the loop one dict of metrics per window. A step skipped for a NaN/Inf loss or gradient norm is
counted (nonfinite_steps_skipped) and left out of the loss and norm means. One-colour crops the stage left out
of the loss (its `left_out`) are summed over the window and the processes (flat_crops_left_out)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from golf_dist.log import get_logger

log = get_logger(__name__)
LOSS_KEYS = ("total", "content", "perceptual")


class StepMeter:
    def __init__(
        self,
        device: torch.device,
        global_batch: int,
        reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None,
        world: int = 1,
    ):
        self.device = device
        self.global_batch = global_batch
        self.reduce_mean = reduce_mean  # the mean over ranks of a tensor (None: one process)
        self.world = world
        self.left_out = torch.zeros((), dtype=torch.float64, device=device)  # one-colour crops, this window
        self.told_flat_crops = False  # the first window with one-colour crops says so, once
        self.sums = torch.zeros(len(LOSS_KEYS), dtype=torch.float64, device=device)
        self.step_sums = torch.zeros_like(self.sums)  # the step in progress, added to `sums` once it is taken
        self.grad_norms = torch.zeros(2, dtype=torch.float64, device=device)  # sum and max of the window's norms
        self._reset()

    def _reset(self) -> None:
        self.steps, self.start, self.waited, self.paused = 0, time.perf_counter(), 0.0, 0.0
        self.skipped = 0  # steps of the window not taken (non-finite)
        self.sums.zero_()
        self.grad_norms.zero_()
        self.left_out.zero_()

    @contextmanager
    def _timed(self, counter: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, counter, getattr(self, counter) + time.perf_counter() - start)

    def waiting_for_data(self):
        """Time spent waiting for the next batch: data_wait_share."""
        return self._timed("waited")

    def paused_time(self):
        """Time that does not count as training (validation, checkpoints): left out of crops_per_s."""
        return self._timed("paused")

    def add_losses(self, losses: dict[str, torch.Tensor], accum: int) -> None:
        """One micro-batch's losses (of `accum` per optimizer step)."""
        self.step_sums += torch.stack([losses[k].detach().double() for k in LOSS_KEYS]) / accum
        if "left_out" in losses:
            self.left_out += losses["left_out"].to(self.left_out)

    def step_loss(self) -> torch.Tensor:
        """The total loss of the step in progress (this rank's)."""
        return self.step_sums[0]

    def add_step(self, grad_norm: torch.Tensor, taken: bool = True) -> None:
        """One step done; `grad_norm` is its global gradient norm before clipping; not `taken`: skipped as
        non-finite (counted; its losses and norm stay out of the means)."""
        self.steps += 1
        if taken:
            norm = grad_norm.to(self.device)
            self.sums += self.step_sums
            self.grad_norms[0] += norm
            self.grad_norms[1] = torch.maximum(self.grad_norms[1], norm)
        else:
            self.skipped += 1
        self.step_sums.zero_()

    def window(self, step: int | None = None) -> dict[str, float]:
        """The metrics of the window that ends at `step` (means over its steps and over ranks); starts the next."""
        # every rank skips the same steps (backend.all_finite), so `taken` is the same on every rank
        taken = self.steps - self.skipped
        mean = (self.reduce_mean(self.sums) if self.reduce_mean is not None else self.sums) / (taken or math.nan)
        left_out = self.reduce_mean(self.left_out) * self.world if self.reduce_mean is not None else self.left_out
        elapsed = time.perf_counter() - self.start - self.paused
        metrics = {
            "loss": mean[0].item(),
            "loss_content": mean[1].item(),
            "loss_perceptual": mean[2].item(),
            # the global gradient norm before clipping (the same on every rank after DDP's all-reduce)
            "grad_norm": self.grad_norms[0].item() / (taken or math.nan),
            "grad_norm_max": self.grad_norms[1].item() if taken else math.nan,
            "nonfinite_steps_skipped": self.skipped,
            "flat_crops_left_out": round(left_out.item()),
            "crops_per_s": self.steps * self.global_batch / elapsed,
            "data_wait_share": self.waited / elapsed,
        }
        if metrics["flat_crops_left_out"] and not self.told_flat_crops:
            self.told_flat_crops = True
            log.info(
                f"step {step}: {metrics['flat_crops_left_out']} one-colour training crop(s) left out of the loss "
                "in the last steps (every channel constant: the networks' gradient on such a crop is about 1e15 "
                "times its usual size; MLflow metric flat_crops_left_out, docs/training.md)"
            )
        if self.device.type == "cuda":
            metrics["gpu_memory_reserved_gib"] = torch.cuda.max_memory_reserved(self.device) / 2**30
        self._reset()
        return metrics
