"""Self-ensemble ("geometric ensemble", as in EDSR and NAFNet's test-time augmentation): run the restorer on
flipped and transposed copies of the image, undo each transform on its output and average. F and G are
convolutional and their InstanceNorm statistics do not change under flips or transposes, so each copy is a
valid input; the average removes part of the error that is not shared between orientations. It costs one
full restoration per transform (docs/using-a-model.md measures the gain and the cost on the demo).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from golf_dist.errors import ConfigError

# The transforms each mode uses, as (transpose, flip height, flip width): the dihedral group of the square
# (x8), its flips alone (x4), a horizontal flip (x2), or none (x1: the plain restoration, bit for bit).
ENSEMBLES: dict[str, tuple[tuple[bool, bool, bool], ...]] = {
    "x1": ((False, False, False),),
    "x2": ((False, False, False), (False, False, True)),
    "x4": ((False, False, False), (False, False, True), (False, True, False), (False, True, True)),
    "x8": tuple((t, h, w) for t in (False, True) for h in (False, True) for w in (False, True)),
}


def check_ensemble(mode: str) -> None:
    if mode not in ENSEMBLES:
        raise ConfigError(f"--ensemble must be one of {', '.join(ENSEMBLES)}, got {mode!r}")


def _forward(x: Tensor, transpose: bool, flip_h: bool, flip_w: bool) -> Tensor:
    if transpose:
        x = x.transpose(-2, -1)
    dims = [d for d, on in ((-2, flip_h), (-1, flip_w)) if on]
    return x.flip(dims) if dims else x


def _inverse(x: Tensor, transpose: bool, flip_h: bool, flip_w: bool) -> Tensor:
    dims = [d for d, on in ((-2, flip_h), (-1, flip_w)) if on]
    x = x.flip(dims) if dims else x
    return x.transpose(-2, -1) if transpose else x


@torch.no_grad()
def ensemble_iterates(restore: Callable[[Tensor], list[Tensor]], blur: Tensor, mode: str = "x1") -> list[Tensor]:
    """`restore` (an image to its list of iterates: F's estimate, then each G iteration's) averaged over the
    transforms of `mode`, iterate by iterate."""
    check_ensemble(mode)
    transforms = ENSEMBLES[mode]
    if len(transforms) == 1:
        return restore(blur)
    sums: list[Tensor] | None = None
    for transform in transforms:
        outputs = [_inverse(out, *transform) for out in restore(_forward(blur, *transform))]
        sums = outputs if sums is None else [total + out for total, out in zip(sums, outputs)]
    return [total / len(transforms) for total in sums]


class EnsembleSteps:
    """The steps of a batch (GolfSteps or TiledSteps, made by `start` from an image) on each transform of `mode`,
    all in step: `estimate` and each `step` are their outputs mapped back and averaged, so an adaptive stop is
    decided on the ensemble's average (golf_dist.inference.engine.restore). x1: the plain steps, bit for bit."""

    def __init__(self, start: Callable[[Tensor], Any], blur: Tensor, mode: str = "x1"):
        check_ensemble(mode)
        self.transforms = ENSEMBLES[mode]
        self.members = [start(_forward(blur, *transform)) for transform in self.transforms]
        self.estimate = self._average([member.estimate for member in self.members])

    def _average(self, outputs: list[Tensor]) -> Tensor:
        if len(outputs) == 1:
            return outputs[0]
        restored = [_inverse(out, *transform) for out, transform in zip(outputs, self.transforms)]
        total = restored[0]
        for out in restored[1:]:
            total = total + out
        return total / len(restored)

    def step(self, active: Tensor | None = None) -> Tensor:
        """The averaged batch after one more G iteration of every transform's `active` images (None: all)."""
        self.estimate = self._average([member.step(active) for member in self.members])
        return self.estimate
