"""The crop plan both training loaders follow (golf_dist.data.torch_loader and golf_dist.data.dali): which pair,
which window and which flips the sample at a global stream position gets, so the two hand out the same crops.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n_pairs: int) -> np.ndarray:
    """The pair order of one epoch: drawn once per epoch (and process), not once per sample."""
    return np.random.default_rng([seed, epoch]).permutation(n_pairs)


@dataclass(frozen=True)
class CropPlan:
    """Which pair, which window and which flips the sample at a global stream position gets."""

    n_pairs: int
    crop: int
    flips: bool
    seed: int
    crops_per_frame: int = 1  # k consecutive positions share one pair (one decode), each its own window

    def pair_index(self, position: int) -> int:
        epoch, offset = divmod(position // self.crops_per_frame, self.n_pairs)
        return int(_epoch_order(self.seed, epoch, self.n_pairs)[offset])

    def draws(self, position: int) -> tuple[np.float32, np.float32, bool, bool]:
        """The sample's random draws: (u_top, u_left) uniform in [0, 1) as float32, and (hflip, vflip).
        The DALI loader is handed these and makes the window in its pipeline, with window_offset's arithmetic."""
        rng = np.random.default_rng([self.seed, position, 1])
        u_top, u_left = rng.random(2, dtype=np.float32)
        hflip, vflip = (bool(b) for b in rng.integers(0, 2, size=2)) if self.flips else (False, False)
        return u_top, u_left, hflip, vflip

    def window(self, position: int, height: int, width: int) -> tuple[int, int, bool, bool]:
        """(top, left, hflip, vflip), drawn once per sample and applied to blur and sharp alike."""
        u_top, u_left, hflip, vflip = self.draws(position)
        return window_offset(u_top, height, self.crop), window_offset(u_left, width, self.crop), hflip, vflip


def window_offset(u: np.float32, extent: int, crop: int) -> int:
    """floor(u * (extent - crop + 1)) in float32, at most extent - crop: a uniform offset of a `crop` window
    along `extent`. float32 because DALI's pipeline computes the same expression in float32 (dali._window)."""
    return min(int(np.floor(np.float32(u) * np.float32(extent - crop + 1))), extent - crop)


def paired_crop(
    blur: np.ndarray, sharp: np.ndarray, top: int, left: int, size: int, hflip: bool, vflip: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The same window and flips on both images."""
    out = []
    for image in (blur, sharp):
        patch = image[top : top + size, left : left + size]
        if hflip:
            patch = patch[:, ::-1]
        if vflip:
            patch = patch[::-1]
        out.append(patch)
    return out[0], out[1]
