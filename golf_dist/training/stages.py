"""The two stages of the Golf Optimizer, each owning its network and its loss.

Stage f trains F alone: L(F(y), x~). Stage g trains G on top of a frozen F: x0 = F(y) on the same crop
(InstanceNorm statistics are per image, so F must see the crop G trains on), then the mean of
L(G^(i)(x0), x~) over i = 1..N (Eq. 4), each unrolled step checkpointed when asked. The trainer, the
benchmark and the DeepSpeed comparison all take their loss from here.

Both leave one-colour crops (golf_dist.losses.one_colour) out of the loss: on such a crop the networks'
gradient is about 1e15 times its usual size. A batch without one is scored exactly as before; the losses
say how many were left out (`left_out`, logged as flat_crops_left_out).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from golf_dist.losses import one_colour, unrolled_loss
from golf_dist.models import f_net, g_net, unroll

LossFn = Callable[..., dict[str, Tensor]]  # a GolfLoss: (output, target, keep=None) -> its terms


def crops_to_score(blur: Tensor) -> tuple[Tensor | None, Tensor]:
    """(keep, left_out): `keep` marks the crops that are not one colour, or is None when that is all of them
    (the loss then takes its plain batch means); `left_out` counts the others. One host sync, as the finite
    check of each step already has."""
    flat = one_colour(blur)
    left_out = flat.sum()
    return (None if left_out.item() == 0 else ~flat), left_out


class FStage:
    """Stage f: F maps the blurred crop towards the sharp one in one step."""

    name = "f"
    val_iterations = 0  # validation scores F alone

    def __init__(self, loss_fn: LossFn):
        self.loss_fn = loss_fn

    @staticmethod
    def network() -> nn.Module:
        return f_net()

    def loss(self, model: nn.Module, blur: Tensor, sharp: Tensor) -> dict[str, Tensor]:
        keep, left_out = crops_to_score(blur)
        return {**self.loss_fn(model(blur), sharp, keep=keep), "left_out": left_out}

    @staticmethod
    def eval_networks(trained: nn.Module) -> tuple[nn.Module, None]:
        """(F, G) that validation runs: the network being trained is F."""
        return trained, None

    def describe(self) -> str:
        return ""


class GStage:
    """Stage g: G, unrolled `unroll_steps` times from F's estimate, trained with Eq. 4; F stays frozen."""

    name = "g"

    def __init__(
        self,
        loss_fn: LossFn,
        f_model: nn.Module,
        unroll_steps: int,
        checkpointing: bool,
        eval_iterations: int = 0,
        weighting: str = "uniform",
    ):
        self.loss_fn = loss_fn
        self.f_model = f_model  # F(blur) runs without gradients; the trainer also freezes F and sets eval mode
        self.unroll_steps = unroll_steps
        self.checkpointing = checkpointing
        self.weighting = weighting  # of the N iterates in Eq. 4 (golf_dist.losses.iterate_weights)
        # validation runs max(N, eval.iterations) G iterations and logs each as its own series
        self.val_iterations = max(unroll_steps, eval_iterations)

    @staticmethod
    def network() -> nn.Module:
        return g_net()

    def loss(self, model: nn.Module, blur: Tensor, sharp: Tensor) -> dict[str, Tensor]:
        """Eq. 4: the mean over i = 1..N of L(G^(i)(x0), sharp), x0 = F(blur) without gradients (weighted
        by i with weighting linear; iterate N alone with last)."""
        keep, left_out = crops_to_score(blur)  # F maps a one-colour crop to one colour: G's input is flat too
        with torch.no_grad():
            x0 = self.f_model(blur)
        iterates = unroll(model, x0, self.unroll_steps, checkpoint=self.checkpointing)
        losses = unrolled_loss(
            self.loss_fn, iterates, sharp, checkpoint=self.checkpointing, weighting=self.weighting, keep=keep
        )
        return {**losses, "left_out": left_out}

    def eval_networks(self, trained: nn.Module) -> tuple[nn.Module, nn.Module]:
        """(F, G) that validation runs: the frozen F, then the G being trained."""
        return self.f_model, trained

    def describe(self) -> str:
        weights = "" if self.weighting == "uniform" else f", iterates weighted {self.weighting}"
        return f", unroll {self.unroll_steps} (checkpointing {'on' if self.checkpointing else 'off'}{weights})"
