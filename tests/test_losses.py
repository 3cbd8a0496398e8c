"""The VGG-11-BN feature loader, the Golf loss terms and Eq. 4's unrolled mean."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import AffineMap

from golf_dist.errors import GolfError
from golf_dist.losses import (
    VGG_WEIGHTS_FILE,
    GolfLoss,
    VGGFeatures,
    find_vgg_weights,
    iterate_weights,
    load_vgg_features,
    psnr_loss,
    unrolled_loss,
    vgg_weights_missing_message,
)
from golf_dist.models import g_net, unroll

# torchvision vgg11_bn().features: where the convs and BNs sit, and the channel widths (cfg "A").
CONVS = {
    0: (3, 64),
    4: (64, 128),
    8: (128, 256),
    11: (256, 256),
    15: (256, 512),
    18: (512, 512),
    22: (512, 512),
    25: (512, 512),
}
POOLS = {3, 7, 14, 21, 28}


def torchvision_like_state_dict(seed: int = 0) -> dict:
    """Random tensors under torchvision's vgg11_bn keys, plus keys the loader must ignore."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (cin, cout) in CONVS.items():
        sd[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=gen) * (2 / (9 * cin)) ** 0.5
        sd[f"features.{i}.bias"] = 0.1 * torch.randn(cout, generator=gen)
        bn = i + 1
        sd[f"features.{bn}.weight"] = 1 + 0.1 * torch.randn(cout, generator=gen)
        sd[f"features.{bn}.bias"] = 0.1 * torch.randn(cout, generator=gen)
        sd[f"features.{bn}.running_mean"] = 0.1 * torch.randn(cout, generator=gen)
        sd[f"features.{bn}.running_var"] = 1 + 0.5 * torch.rand(cout, generator=gen)
        sd[f"features.{bn}.num_batches_tracked"] = torch.tensor(100)
    sd["features.29.weight"] = torch.randn(4, 4, generator=gen)
    sd["classifier.0.weight"] = torch.randn(8, 8, generator=gen)
    sd["classifier.0.bias"] = torch.randn(8, generator=gen)
    return sd


def manual_vgg(x: torch.Tensor, sd: dict) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    h = (x - mean) / std
    for i in range(29):
        if i in CONVS:
            h = F.conv2d(h, sd[f"features.{i}.weight"], sd[f"features.{i}.bias"], padding=1)
            b = f"features.{i + 1}."
            h = F.batch_norm(
                h,
                sd[b + "running_mean"],
                sd[b + "running_var"],
                sd[b + "weight"],
                sd[b + "bias"],
                training=False,
                eps=1e-5,
            )
            h = F.relu(h)
        elif i in POOLS:
            h = F.max_pool2d(h, 2, 2)
    return h


def test_vgg_state_dict_keys_are_torchvision_layout():
    keys = set(VGGFeatures().state_dict())
    expected = set()
    for i in CONVS:
        expected |= {f"features.{i}.weight", f"features.{i}.bias"}
        expected |= {
            f"features.{i + 1}.{n}" for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
        }
    assert keys == expected


@pytest.mark.slow
def test_load_vgg_features_uses_the_file(tmp_path):
    sd = torchvision_like_state_dict()
    path = tmp_path / VGG_WEIGHTS_FILE
    torch.save(sd, path)
    vgg = load_vgg_features(path)
    x = torch.rand(2, 3, 64, 96)
    out = vgg(x)
    assert out.shape == (2, 512, 2, 3)
    torch.testing.assert_close(out, manual_vgg(x, sd), rtol=1e-4, atol=1e-5)
    # frozen and always in eval mode, even when a parent module trains
    vgg.train()
    assert not vgg.training and not any(m.training for m in vgg.modules())
    assert not any(p.requires_grad for p in vgg.parameters())
    torch.testing.assert_close(vgg(x), out)


def test_corrupt_or_wrong_vgg_file_is_a_golf_error_naming_it(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(GolfError, match="junk.pth"):
        load_vgg_features(junk)

    tensor_only = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor_only)
    with pytest.raises(GolfError, match="tensor.pth"):
        load_vgg_features(tensor_only)

    sd = torchvision_like_state_dict()
    del sd["features.25.weight"]
    partial = tmp_path / "partial.pth"
    torch.save(sd, partial)
    with pytest.raises(GolfError, match="partial.pth.*features.25.weight"):
        load_vgg_features(partial)


class _Trap:
    """Unpickling this runs Path.touch: only a loader without weights_only would let it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_vgg_loader_never_unpickles_code(tmp_path):
    marker = tmp_path / "was_run"
    path = tmp_path / "evil.pth"
    torch.save({"features.0.weight": _Trap(marker)}, path)
    with pytest.raises(GolfError, match="evil.pth"):
        load_vgg_features(path)
    assert not marker.exists()


def test_find_vgg_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert find_vgg_weights(None) is None
    cached = tmp_path / "torch" / "hub" / "checkpoints" / VGG_WEIGHTS_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert find_vgg_weights(None) == cached
    assert str(cached) in vgg_weights_missing_message()

    explicit = tmp_path / "mine.pth"
    with pytest.raises(GolfError, match="mine.pth"):
        find_vgg_weights(str(explicit))
    explicit.write_bytes(b"x")
    assert find_vgg_weights(str(explicit)) == explicit


def test_missing_message_says_what_to_do():
    msg = vgg_weights_missing_message()
    for part in (
        VGG_WEIGHTS_FILE,
        "https://download.pytorch.org/models/vgg11_bn-6002323d.pth",
        "loss.vgg_weights=",
        "loss.perceptual_weight=0",
    ):
        assert part in msg


def test_golf_loss_terms():
    torch.manual_seed(0)
    out, target = torch.rand(2, 3, 32, 64), torch.rand(2, 3, 32, 64)

    plain = GolfLoss(0.0, None)(out, target)
    torch.testing.assert_close(plain["content"], F.mse_loss(out, target))
    assert plain["perceptual"].item() == 0.0
    torch.testing.assert_close(plain["total"], plain["content"])

    vgg = VGGFeatures()
    w = 0.25
    terms = GolfLoss(w, vgg)(out, target)
    torch.testing.assert_close(terms["content"], F.mse_loss(out, target))
    po, pt = vgg(out), vgg(target)
    assert po.shape == (2, 512, 1, 2)
    by_hand = sum(((po[i] - pt[i]) ** 2).sum() / po[i].numel() for i in range(2)) / 2  # ||.||^2/(whd), batch mean
    torch.testing.assert_close(terms["perceptual"], by_hand)
    assert terms["perceptual"].item() > 0
    torch.testing.assert_close(terms["total"], terms["content"] + w * terms["perceptual"])

    with pytest.raises(ValueError):
        GolfLoss(1e-6, None)


def test_psnr_loss_is_the_mean_negative_psnr_and_weighs_images_by_their_relative_error():
    torch.manual_seed(0)
    target = torch.rand(2, 3, 16, 16)
    # image 0 ten times the error of image 1: MSE is led by image 0, the PSNR loss by neither
    out = target + torch.cat([0.1 * torch.randn(1, 3, 16, 16), 0.01 * torch.randn(1, 3, 16, 16)])
    loss = GolfLoss(0.0, None, content="psnr")(out, target)
    by_hand = -sum(10 * torch.log10(1 / ((out[i] - target[i]) ** 2).mean()) for i in range(2)) / 2
    torch.testing.assert_close(loss["content"], by_hand)
    torch.testing.assert_close(psnr_loss(out, target), loss["content"])
    torch.testing.assert_close(loss["total"], loss["content"])

    grads = []
    for content in ("mse", "psnr"):
        estimate = out.clone().requires_grad_(True)
        GolfLoss(0.0, None, content=content)(estimate, target)["total"].backward()
        grads.append([estimate.grad[i].norm().item() for i in range(2)])
    mse_ratio, psnr_ratio = grads[0][0] / grads[0][1], grads[1][0] / grads[1][1]
    assert mse_ratio > 8  # the MSE's gradient grows with the error
    assert psnr_ratio < 0.2  # the PSNR loss's is the MSE's over the image's MSE: the small error counts more
    assert psnr_loss(target, target).item() == pytest.approx(-100.0)  # equal images: the floor, not -inf

    with pytest.raises(ValueError, match="unknown content loss 'l1'"):
        GolfLoss(0.0, None, content="l1")


def test_target_features_carry_no_gradient():
    out = torch.rand(1, 3, 32, 32, requires_grad=True)
    target = torch.rand(1, 3, 32, 32, requires_grad=True)
    GolfLoss(1.0, VGGFeatures())(out, target)["perceptual"].backward()
    assert out.grad is not None and out.grad.abs().sum() > 0
    assert target.grad is None


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint", [True, False])
def test_eq4_is_the_mean_over_iterates_by_hand(checkpoint):
    # x0 = 0, G(x) = 0.5 x + 0.5, target 1: iterates 0.5, 0.75, 0.875; MSEs 0.25, 0.0625, 0.015625.
    g = AffineMap()
    its = unroll(g, torch.zeros(2, 3, 4, 4), 3, checkpoint)
    terms = unrolled_loss(GolfLoss(0.0, None), its, torch.ones(2, 3, 4, 4), checkpoint)
    assert terms["total"].item() == pytest.approx((0.25 + 0.0625 + 0.015625) / 3)
    assert terms["content"].item() == pytest.approx(0.109375)
    assert terms["perceptual"].item() == 0.0
    terms["total"].backward()
    # d/ds of mean_i (1 - x_i)^2 with x1 = 0.5, x2 = s x1 + 0.5, x3 = s x2 + 0.5 at s = 0.5
    # dx1 = 0, dx2 = x1 = 0.5, dx3 = x2 + s dx2 = 1.0; grad = mean_i -2 (1 - x_i) dx_i
    assert g.scale.grad.item() == pytest.approx((0 - 2 * 0.25 * 0.5 - 2 * 0.125 * 1.0) / 3)


def test_linear_weighting_weighs_iterate_i_by_i():
    # the iterates of the test above, weighted 1/6, 2/6, 3/6
    assert iterate_weights(3, "linear") == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    assert iterate_weights(4, "uniform") == [0.25] * 4
    g = AffineMap()
    its = unroll(g, torch.zeros(2, 3, 4, 4), 3, False)
    terms = unrolled_loss(GolfLoss(0.0, None), its, torch.ones(2, 3, 4, 4), False, weighting="linear")
    assert terms["total"].item() == pytest.approx((1 * 0.25 + 2 * 0.0625 + 3 * 0.015625) / 6)
    terms["total"].backward()
    assert g.scale.grad.item() == pytest.approx((0 - 2 * 2 * 0.25 * 0.5 - 3 * 2 * 0.125 * 1.0) / 6)
    with pytest.raises(ValueError, match="uniform, linear or last"):
        iterate_weights(3, "quadratic")


def test_last_weighting_scores_the_last_iterate_alone():
    # the iterates of the tests above: only x3 = 0.875 counts, (1 - 0.875)^2 = 0.015625
    assert iterate_weights(3, "last") == [0.0, 0.0, 1.0]
    assert iterate_weights(1, "last") == [1.0]
    g = AffineMap()
    its = unroll(g, torch.zeros(2, 3, 4, 4), 3, True)
    terms = unrolled_loss(GolfLoss(0.0, None), its, torch.ones(2, 3, 4, 4), True, weighting="last")
    assert terms["total"].item() == pytest.approx(0.015625)
    terms["total"].backward()
    # d/ds (1 - x3)^2 = -2 (1 - x3) dx3, dx3 = 1.0 at s = 0.5
    assert g.scale.grad.item() == pytest.approx(-2 * 0.125 * 1.0)


@pytest.mark.slow
def test_checkpointing_changes_neither_loss_nor_gradients():
    torch.manual_seed(0)
    g = g_net(zero_init_last=False)  # a zero last conv would leave most gradients zero
    loss_fn = GolfLoss(0.5, VGGFeatures())
    x0, target = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    results = []
    for ckpt in (True, False):
        g.zero_grad(set_to_none=True)
        terms = unrolled_loss(loss_fn, unroll(g, x0, 3, ckpt), target, ckpt)
        terms["total"].backward()
        results.append((terms, [p.grad.clone() for p in g.parameters()]))
    (t_ck, g_ck), (t_pl, g_pl) = results
    for k in ("total", "content", "perceptual"):
        torch.testing.assert_close(t_ck[k], t_pl[k], rtol=1e-6, atol=0)
    assert all(gr.abs().sum() > 0 for gr in g_pl)
    for a, b in zip(g_ck, g_pl):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
