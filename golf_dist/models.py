"""The residual CNNs of the Golf Optimizer (paper Section 5.1, Table 1) and the unrolled G.

Both networks share one structure and differ in width: F (f=32) takes the aggressive first step,
G (f=16) is applied recurrently, x_{i+1} = G(x_i) = x_i + r(x_i) (Eq. 11).

Convolutions pad by reflection. Table 1 fixes kernel sizes and widths, not the padding, and the
receptive field of either network is about 93x93 pixels: every pixel of the demo's 48x48 training crops, and most
of a 256x256 one, sees the padding. With zero padding the networks learn features calibrated to black
surroundings and then, on whole frames, shift colours and over-sharpen (measured on the demo: frames
of mild blur lost up to 2.8 dB against their blurred input); reflected borders look like the inside,
so what is learnt on crops carries over to frames (docs/training-recipe.md).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.checkpoint import checkpoint as _checkpoint

PADDING = "reflect"


def _conv(cin: int, cout: int, size: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, size, padding=size // 2, bias=False, padding_mode=PADDING)


def _norm(channels: int) -> nn.InstanceNorm2d:
    # Per-image statistics in train and eval alike: no running stats to drift or to synchronise.
    return nn.InstanceNorm2d(channels, affine=True, track_running_stats=False)


class BasicBlock(nn.Module):
    """Pre-activation residual block: IN-ReLU-Conv7x7-IN-ReLU-Conv5x5 plus a (projected) shortcut."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.residual = nn.Sequential(
            _norm(cin), nn.ReLU(), _conv(cin, cout, 7), _norm(cout), nn.ReLU(), _conv(cout, cout, 5)
        )
        if cin == cout:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), _norm(cout))

    def forward(self, x: Tensor) -> Tensor:
        return self.shortcut(x) + self.residual(x)


class ResidualCNN(nn.Module):
    """x + r(x), where r is Conv7x7(3->f), four Layers of two BasicBlocks, Conv7x7(3->3).

    With `zero_init_last` the last convolution starts at zero, so the network starts as the
    identity: with default initialisation the output stays worse than the blurred input for
    hundreds of steps (docs/facts.md, "On a 2-core CPU").
    """

    def __init__(self, filters: int, zero_init_last: bool = True):
        super().__init__()
        if filters < 1:
            raise ValueError(f"filters must be >= 1, got {filters}")
        f = filters
        self.filters = f
        self.head = _conv(3, f, 7)
        self.layers = nn.ModuleList(
            [nn.Sequential(BasicBlock(f, f), BasicBlock(f, f)) for _ in range(3)]
            + [nn.Sequential(BasicBlock(f, 3), BasicBlock(3, 3))]
        )
        self.tail = _conv(3, 3, 7)
        if zero_init_last:
            nn.init.zeros_(self.tail.weight)

    def table_rows(self) -> list[tuple[str, nn.Module]]:
        """The rows of paper Table 1 as (label, module), e.g. ("BB(16->16)x2", layers[0])."""
        f = self.filters
        return (
            [(f"Conv(3->{f})", self.head)]
            + [(f"BB({f}->{f})x2", layer) for layer in self.layers[:3]]
            + [(f"BB({f}->3)x2", self.layers[3]), ("Conv(3->3)", self.tail)]
        )

    def forward(self, x: Tensor) -> Tensor:
        r = self.head(x)
        for layer in self.layers:
            r = layer(r)
        return x + self.tail(r)


def f_net(zero_init_last: bool = True) -> ResidualCNN:
    """F: f=32, 466,348 parameters."""
    return ResidualCNN(32, zero_init_last)


def g_net(zero_init_last: bool = True) -> ResidualCNN:
    """G: f=16, 120,188 parameters."""
    return ResidualCNN(16, zero_init_last)


def unroll(g: nn.Module, x0: Tensor, steps: int, checkpoint: bool = True) -> list[Tensor]:
    """The iterates G^(1)(x0) .. G^(steps)(x0).

    With `checkpoint` (and grad enabled) each application keeps only its input and output for
    backward and recomputes its activations there, so memory stays nearly flat in `steps`.
    Non-reentrant checkpointing is the variant that gives correct gradients for a module applied
    several times under DDP.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    use_ckpt = checkpoint and torch.is_grad_enabled()
    iterates = []
    x = x0
    for _ in range(steps):
        x = _checkpoint(g, x, use_reentrant=False) if use_ckpt else g(x)
        iterates.append(x)
    return iterates


@torch.no_grad()
def golf_iterates(
    f: torch.nn.Module, g: torch.nn.Module | None, blur: torch.Tensor, iterations: int
) -> list[torch.Tensor]:
    """[x0 = F(y), G(x0), G(G(x0)), ...]: the estimate after each of the `iterations` G steps.

    On CUDA each kept iterate is a copy: networks replayed as CUDA graphs (speed.cuda_graphs) write their
    outputs into buffers that the next replay reuses."""
    keep = (lambda t: t.clone()) if blur.is_cuda else (lambda t: t)
    x = f(blur)
    out = [keep(x)]
    for _ in range(iterations if g is not None else 0):
        x = g(x)
        out.append(keep(x))
    return out


class GolfSteps:
    """F's estimate of an NxCxHxW batch (`estimate`), then one G iteration per call of `step`, for a caller that
    decides when to stop (adaptive iterations: golf_dist.inference.engine.restore). In a step, an image not
    `active` keeps its estimate and G does not run on it: G's InstanceNorm normalises each image on its own, so
    the images that do run get the output they would get alone. As golf_iterates, each estimate is a copy on CUDA.
    """

    def __init__(self, f: torch.nn.Module, g: torch.nn.Module | None, blur: Tensor):
        self.g = g
        self._keep = (lambda t: t.clone()) if blur.is_cuda else (lambda t: t)
        self.estimate = self._keep(f(blur))

    def step(self, active: Tensor | None = None) -> Tensor:
        """The batch after one more G iteration on its `active` images (a bool tensor per image; None: all)."""
        if active is None or bool(active.all()):
            self.estimate = self._keep(self.g(self.estimate))
        elif bool(active.any()):
            updated = self.estimate.clone()
            updated[active] = self.g(self.estimate[active])
            self.estimate = updated
        return self.estimate
