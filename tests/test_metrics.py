"""PSNR on known errors; SSIM against scikit-image's Wang et al. settings."""

import numpy as np
import pytest
import torch
from skimage import data
from skimage.metrics import structural_similarity

from golf_dist.metrics import SSIM_VARIANT, psnr, ssim


def test_psnr_of_known_errors_per_image():
    x = torch.full((2, 3, 8, 8), 0.5)
    y = x.clone()
    y[0] += 0.1  # MSE 0.01 -> 20 dB
    y[1] += 0.01  # MSE 1e-4 -> 40 dB
    torch.testing.assert_close(psnr(y, x), torch.tensor([20.0, 40.0], dtype=torch.float64), rtol=1e-5, atol=0)
    assert torch.isinf(psnr(x, x)).all()


def test_psnr_clamps_to_the_data_range():
    x = torch.full((1, 3, 8, 8), 0.9)
    # 1.5 counts as 1.0: an error of 0.1, 20 dB
    assert psnr(torch.full_like(x, 1.5), x).item() == pytest.approx(20.0)


def test_ssim_of_identical_images_is_one():
    x = torch.rand(2, 3, 20, 30)
    torch.testing.assert_close(ssim(x, x), torch.ones(2, dtype=torch.float64))


def _skimage_ssim(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    return [
        structural_similarity(
            a[i].permute(1, 2, 0).double().numpy(),
            b[i].permute(1, 2, 0).double().numpy(),
            channel_axis=-1,
            data_range=1.0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        for i in range(a.shape[0])
    ]


def _structured(h: int, w: int) -> torch.Tensor:
    img = torch.from_numpy(data.astronaut()[100 : 100 + h, 150 : 150 + w].astype(np.float32) / 255)
    return img.permute(2, 0, 1).unsqueeze(0)


@pytest.mark.parametrize("h, w", [(11, 11), (37, 53), (64, 64), (101, 30)])
def test_ssim_agrees_with_skimage(h, w):
    gen = torch.Generator().manual_seed(h * w)
    # random pairs, and a natural image against a blurred + noisy copy of itself
    a = torch.rand(2, 3, h, w, generator=gen)
    b = (a + 0.3 * torch.randn(a.shape, generator=gen)).clamp(0, 1)
    sharp = _structured(h, w)
    blurred = torch.nn.functional.avg_pool2d(sharp, 3, 1, 1, count_include_pad=False)
    degraded = (blurred + 0.02 * torch.randn(sharp.shape, generator=gen)).clamp(0, 1)
    for x, y in ((a, b), (sharp, degraded)):
        ours = ssim(x, y)
        assert ours.shape == (x.shape[0],)
        np.testing.assert_allclose(ours.numpy(), _skimage_ssim(x, y), atol=1e-4, rtol=0)
    assert ssim(a, b).max() < 0.9  # the pairs are far from identical: the check is not vacuous


def test_ssim_clamps_and_rejects_small_images():
    x = torch.rand(1, 3, 16, 16)
    y = x * 1.6 - 0.3
    torch.testing.assert_close(ssim(x, y), ssim(x, y.clamp(0, 1)))
    with pytest.raises(ValueError):
        ssim(torch.rand(1, 3, 10, 40), torch.rand(1, 3, 10, 40))


def test_ssim_variant_is_named():
    assert "11x11" in SSIM_VARIANT and "sigma 1.5" in SSIM_VARIANT
