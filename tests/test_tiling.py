"""Tiled inference (golf_dist.inference.tiling): whole-image inference when the image fits a tile, exact blending for
networks that act pixel by pixel, close results for the real ones, and bad flags named."""

from __future__ import annotations

import pytest
import torch

from golf_dist.errors import ConfigError
from golf_dist.inference.tiling import check_tiling, tile_starts, tiled_iterates
from golf_dist.models import f_net, g_net, golf_iterates


class Pointwise(torch.nn.Module):
    """A network whose output at a pixel depends on that pixel only: tiling must not change it at all."""

    def forward(self, x):
        return 0.5 * x + 0.1 * x * x


def test_tile_starts_cover_the_side_with_the_last_tile_flush():
    assert tile_starts(100, 128, 32) == [0]
    assert tile_starts(256, 128, 32) == [0, 96, 128]
    assert tile_starts(300, 64, 0) == [0, 64, 128, 192, 236]
    for size, tile, overlap in ((256, 128, 32), (300, 64, 16), (97, 32, 8)):
        starts = tile_starts(size, tile, overlap)
        covered = set().union(*(range(s, s + tile) for s in starts))
        assert covered == set(range(size)) and starts[-1] + tile == size


def test_blending_is_exact_for_a_pointwise_network():
    image = torch.rand(1, 3, 70, 100)
    whole = golf_iterates(Pointwise(), Pointwise(), image, 2)
    for tile, overlap in ((32, 8), (48, 0), (40, 20)):
        tiled = tiled_iterates(Pointwise(), Pointwise(), image, 2, tile, overlap)
        assert len(tiled) == 3
        for a, b in zip(whole, tiled):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_an_image_that_fits_one_tile_runs_whole():
    torch.manual_seed(0)
    f, g = f_net().eval(), g_net(zero_init_last=False).eval()
    image = torch.rand(1, 3, 40, 48)
    for a, b in zip(golf_iterates(f, g, image, 2), tiled_iterates(f, g, image, 2, tile=64, overlap=16)):
        assert torch.equal(a, b)


def test_real_networks_on_tiles_stay_close_to_whole_image_inference():
    """InstanceNorm sees a tile's statistics, so tiles differ from the whole image, but not wildly (a random F
    and G here; docs/training.md measures the PSNR cost with the demo's trained ones)."""
    torch.manual_seed(0)
    f, g = f_net(zero_init_last=False).eval(), g_net(zero_init_last=False).eval()
    image = torch.rand(1, 3, 64, 96)
    whole = golf_iterates(f, g, image, 1)[-1]
    tiled = tiled_iterates(f, g, image, 1, tile=48, overlap=16)[-1]
    assert tiled.shape == whole.shape and torch.isfinite(tiled).all()
    assert 0 < (tiled - whole).abs().mean() < (whole - image).abs().mean()


@pytest.mark.parametrize("tile, overlap, flag", [(8, 0, "--tile"), (64, 40, "--overlap"), (64, -1, "--overlap")])
def test_bad_tiling_flags_are_named(tile, overlap, flag):
    with pytest.raises(ConfigError, match=flag):
        check_tiling(tile, overlap)
