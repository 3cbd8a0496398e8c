"""One-colour training crops: why the stages leave them out of the loss, and that leaving them out scores the
other crops exactly as a batch without them (golf_dist.losses.one_colour, golf_dist.training.stages)."""

import pytest
import torch

from golf_dist.losses import GolfLoss, VGGFeatures, one_colour
from golf_dist.models import f_net, g_net
from golf_dist.training.meter import StepMeter
from golf_dist.training.stages import FStage, GStage


def grad_norm(net: torch.nn.Module) -> float:
    return torch.sqrt(sum((p.grad.double() ** 2).sum() for p in net.parameters() if p.grad is not None)).item()


def batch_with_a_flat_crop(seed: int = 0, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Four crops, the third one colour (each channel its own constant, as a patch of coloured sky)."""
    gen = torch.Generator().manual_seed(seed)
    blur = torch.rand(4, 3, size, size, generator=gen)
    sharp = (blur + 0.05 * torch.randn(4, 3, size, size, generator=gen)).clamp(0, 1)
    blur[2] = torch.tensor([0.2, 0.5, 0.7]).view(3, 1, 1)
    sharp[2] = blur[2]
    return blur, sharp


def assert_close_to_float_rounding(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to the order of float sums (a batch of 4 against one of 3 reduces in another order)."""
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5 * want.abs().max().item())


def trained_like_f(seed: int = 0) -> torch.nn.Module:
    """F with every weight random, as after some training (the zero-initialised last layers would hide the
    gradient that flows back through the network)."""
    torch.manual_seed(seed)
    return f_net(zero_init_last=False)


def test_one_colour_marks_images_whose_every_channel_is_constant():
    images = torch.rand(5, 3, 8, 8)
    images[1] = 0.4  # grey
    images[2] = torch.tensor([0.1, 0.6, 0.9]).view(3, 1, 1)  # one colour, channels differ
    images[3, :2] = 0.3  # two channels constant, the third varies: not flat
    images[4] = 0.5
    images[4, 0, 3, 3] += 1 / 255  # one pixel of one channel differs: not flat
    assert one_colour(images).tolist() == [False, True, True, False, False]


def test_a_one_colour_crop_blows_up_the_networks_gradient():
    """The reason for leaving such crops out: scored like any other, one of four gives F a gradient ~1e10 or
    more times that of the batch without it (1/sqrt(eps) per InstanceNorm on its way back)."""
    blur, sharp = batch_with_a_flat_crop()
    loss_fn = GolfLoss(0.0, None)
    f = trained_like_f()
    loss_fn(f(blur), sharp)["total"].backward()
    with_flat = grad_norm(f)
    f.zero_grad()
    keep = torch.tensor([True, True, False, True])
    loss_fn(f(blur[keep]), sharp[keep])["total"].backward()
    without = grad_norm(f)
    assert with_flat > 1e8 * without


@pytest.mark.parametrize("content", ["mse", "psnr"])
def test_stage_f_scores_a_batch_with_a_flat_crop_as_the_batch_without_it(content):
    blur, sharp = batch_with_a_flat_crop()
    keep = torch.tensor([True, True, False, True])
    f = trained_like_f()
    stage = FStage(GolfLoss(0.0, None, content))
    losses = stage.loss(f, blur, sharp)
    losses["total"].backward()
    grads = [p.grad.clone() for p in f.parameters()]
    assert losses["left_out"].item() == 1
    f.zero_grad()
    reference = GolfLoss(0.0, None, content)(f(blur[keep]), sharp[keep])
    reference["total"].backward()
    torch.testing.assert_close(losses["total"], reference["total"])
    for got, want in zip(grads, (p.grad for p in f.parameters())):
        assert_close_to_float_rounding(got, want)
    assert grad_norm(f) < 1e3


def test_the_perceptual_term_leaves_the_flat_crop_out_too():
    torch.manual_seed(1)
    vgg = VGGFeatures()  # random weights: the arithmetic, not ImageNet's features
    blur, sharp = batch_with_a_flat_crop(size=32)
    keep = torch.tensor([True, True, False, True])
    loss_fn = GolfLoss(1.0, vgg)
    out = trained_like_f()(blur)
    masked = loss_fn(out, sharp, keep=keep)
    reference = loss_fn(out[keep], sharp[keep])
    for key in ("content", "perceptual", "total"):
        torch.testing.assert_close(masked[key], reference[key])


def test_stage_g_leaves_the_flat_crop_out_of_every_iterate():
    blur, sharp = batch_with_a_flat_crop()
    keep = torch.tensor([True, True, False, True])
    f = trained_like_f().eval()
    torch.manual_seed(2)
    g = g_net(zero_init_last=False)
    stage = GStage(GolfLoss(0.0, None), f, unroll_steps=3, checkpointing=True, weighting="linear")
    losses = stage.loss(g, blur, sharp)
    losses["total"].backward()
    grads = [p.grad.clone() for p in g.parameters()]
    g.zero_grad()
    reference = stage.loss(g, blur[keep], sharp[keep])
    reference["total"].backward()
    assert losses["left_out"].item() == 1 and reference["left_out"].item() == 0
    torch.testing.assert_close(losses["total"], reference["total"])
    for got, want in zip(grads, (p.grad for p in g.parameters())):
        assert_close_to_float_rounding(got, want)


def test_a_batch_without_flat_crops_is_scored_bit_for_bit_as_before():
    gen = torch.Generator().manual_seed(3)
    blur, sharp = torch.rand(4, 3, 32, 32, generator=gen), torch.rand(4, 3, 32, 32, generator=gen)
    f = trained_like_f()
    loss_fn = GolfLoss(0.0, None)
    losses = FStage(loss_fn).loss(f, blur, sharp)
    assert losses["left_out"].item() == 0
    assert torch.equal(losses["total"], torch.nn.functional.mse_loss(f(blur), sharp))


def test_an_all_flat_batch_gives_zero_loss_and_zero_gradients():
    blur = torch.full((2, 3, 16, 16), 0.25)
    sharp = blur.clone()
    f = trained_like_f()
    losses = FStage(GolfLoss(0.0, None)).loss(f, blur, sharp)
    losses["total"].backward()
    assert losses["total"].item() == 0 and losses["left_out"].item() == 2
    assert all(torch.count_nonzero(p.grad) == 0 for p in f.parameters())


def test_the_meter_sums_the_crops_left_out_over_its_window():
    meter = StepMeter(torch.device("cpu"), global_batch=8, reduce_mean=None)
    zero = torch.zeros(())
    for left_out in (1.0, 0.0, 2.0):
        losses = {"total": zero, "content": zero, "perceptual": zero, "left_out": torch.tensor(left_out)}
        meter.add_losses(losses, accum=1)
        meter.add_step(torch.tensor(0.01))
    assert meter.window()["flat_crops_left_out"] == 3
    assert meter.window()["flat_crops_left_out"] == 0  # the next window starts from nothing
