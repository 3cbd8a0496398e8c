"""Tiled inference, for images too large to run whole: F and the G iterations run on overlapping square
tiles, and the tiles' outputs are blended with weights that fall off linearly across the overlap, so no
seam shows where tiles meet. Whole-image inference stays the default: InstanceNorm normalises with the
statistics of what it sees, so a tile's output is not the same crop of the whole image's output, and
tiling costs some PSNR (docs/training.md, "Evaluation", measures how much on the demo)."""

from __future__ import annotations

import torch
from torch import Tensor

from golf_dist.errors import ConfigError
from golf_dist.models import GolfSteps, golf_iterates

MIN_TILE = 16
# Tiles per image (and per pass of the self-ensemble): a 16-pixel tile with an overlap of 8 on a 12-megapixel
# photo would be ~190,000 passes of F and of each G iteration, hours that end in nothing useful; 10,000 tiles
# still lets the smallest tile cover an 800x800 image (--tile 256 --overlap 32 cuts 4000x3000 into 252).
MAX_TILES = 10_000


def check_tiling(tile: int | None, overlap: int) -> None:
    """A tile side of at least MIN_TILE pixels and an overlap in [0, tile / 2]; errors name the flag."""
    if tile is None:
        return
    if tile < MIN_TILE:
        raise ConfigError(f"--tile must be at least {MIN_TILE} pixels, got {tile}")
    if not 0 <= overlap <= tile // 2:
        raise ConfigError(f"--overlap must be between 0 and half of --tile ({tile // 2}), got {overlap}")


def check_tile_count(height: int, width: int, tile: int | None, overlap: int, what: str) -> None:
    """ConfigError naming --tile and --overlap when a height x width image (`what`) takes more than MAX_TILES."""
    if tile is None:
        return
    count = len(tile_starts(height, tile, overlap)) * len(tile_starts(width, tile, overlap))
    if count > MAX_TILES:
        raise ConfigError(
            f"--tile {tile} --overlap {overlap} cuts {what} ({width}x{height}) into {count} tiles, more "
            f"than {MAX_TILES}: pass a larger --tile or a smaller --overlap"
        )


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Where tiles of `tile` pixels start along a side of `size`, `tile - overlap` apart, the last one flush
    with the end (so it may overlap its neighbour more)."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _ramp(length: int, overlap: int, device: torch.device) -> Tensor:
    """1 inside, falling linearly towards both ends over `overlap` pixels, never 0."""
    position = torch.arange(length, device=device, dtype=torch.float32)
    if overlap == 0:
        return torch.ones(length, device=device)
    to_edge = torch.minimum(position, length - 1 - position)
    return torch.clamp((to_edge + 0.5) / overlap, max=1.0)


class TiledSteps:
    """GolfSteps run on overlapping tiles of a batch larger than one tile, all tiles in step: `estimate` and each
    `step` are the tiles' estimates blended into the whole image's (so an adaptive stop is decided on the whole
    image, golf_dist.inference.engine.restore). Every tile keeps its own estimate between steps."""

    def __init__(self, f: torch.nn.Module, g: torch.nn.Module | None, blur: Tensor, tile: int, overlap: int):
        self.size = tuple(blur.shape[-2:])
        self.tiles: list[tuple[tuple, Tensor, GolfSteps]] = []  # (window, blending weight, the tile's steps)
        self.weights = torch.zeros(1, 1, *self.size, device=blur.device)
        for top in tile_starts(self.size[0], tile, overlap):
            for left in tile_starts(self.size[1], tile, overlap):
                window = (..., slice(top, top + tile), slice(left, left + tile))
                steps = GolfSteps(f, g, blur[window])
                h, w = steps.estimate.shape[-2:]
                weight = _ramp(h, overlap, blur.device)[:, None] * _ramp(w, overlap, blur.device)[None, :]
                self.tiles.append((window, weight, steps))
                self.weights[window] += weight
        self.estimate = self._blend([steps.estimate for _, _, steps in self.tiles])

    def _blend(self, outputs: list[Tensor]) -> Tensor:
        first = outputs[0]
        total = torch.zeros(first.shape[:-2] + self.size, device=first.device, dtype=first.dtype)
        for (window, weight, _), out in zip(self.tiles, outputs):
            total[window] += out * weight
        return total / self.weights

    def step(self, active: Tensor | None = None) -> Tensor:
        """The blended batch after one more G iteration on every tile of its `active` images (None: all)."""
        self.estimate = self._blend([steps.step(active) for _, _, steps in self.tiles])
        return self.estimate


def tiled_steps(
    f: torch.nn.Module, g: torch.nn.Module | None, blur: Tensor, tile: int | None, overlap: int = 32
) -> GolfSteps | TiledSteps:
    """The batch's steps on tiles when `tile` is set and the image is larger than one tile, else whole."""
    height, width = blur.shape[-2:]
    if tile is None or (height <= tile and width <= tile):
        return GolfSteps(f, g, blur)
    check_tiling(tile, overlap)
    check_tile_count(height, width, tile, overlap, "the image")
    return TiledSteps(f, g, blur, tile, overlap)


@torch.no_grad()
def tiled_iterates(
    f: torch.nn.Module, g: torch.nn.Module | None, blur: Tensor, iterations: int, tile: int | None, overlap: int = 32
) -> list[Tensor]:
    """golf_iterates (F, then each G iteration) of a 1x3xHxW image, run on tiles when `tile` is set and
    the image is larger than one tile; each iterate blended from the tiles' iterates."""
    height, width = blur.shape[-2:]
    if tile is None or (height <= tile and width <= tile):
        return golf_iterates(f, g, blur, iterations)
    steps = tiled_steps(f, g, blur, tile, overlap)
    return [steps.estimate] + [steps.step() for _ in range(iterations if g is not None else 0)]
