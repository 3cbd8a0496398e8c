"""Procedural training content (golf_dist/data/prep/scenes.py), the wide kernel family, noise and held-out
kernel shapes (kernels.py), the held-out photographs (held_out.py) and their wiring into the synthetic set."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.signal import fftconvolve

from golf_dist.data.prep import kernels, scenes
from golf_dist.data.prep.held_out import HELD_OUT_PHOTOGRAPHS, held_out_photographs, real_blur_photograph
from golf_dist.data.prep.synthetic import CONTENTS, SOURCE_NAMES, Variety, frame_psnr, make_synthetic_gopro
from golf_dist.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
# The commit whose synthetic.py made the demo's data before the procedural options existed.
DEMO_DATA_COMMIT = "594539c"
TINY = dict(train_pairs=6, test_pairs=2, height=48, width=64, frames_per_scene=2, progress=False, workers=1)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def spectrum_slope(image: np.ndarray) -> float:
    """Slope of log power against log frequency, radially averaged, 0.01 to 0.25 cycles per pixel (Hann window)."""
    grey = image.mean(axis=2) - image.mean()
    height, width = grey.shape
    power = np.abs(np.fft.fft2(grey * np.outer(np.hanning(height), np.hanning(width)))) ** 2
    freq = np.sqrt(np.fft.fftfreq(height)[:, None] ** 2 + np.fft.fftfreq(width)[None, :] ** 2)
    edges = np.geomspace(0.01, 0.25, 16)
    bins = np.digitize(freq, edges)
    f = [freq[bins == i].mean() for i in range(1, len(edges))]
    p = [power[bins == i].mean() for i in range(1, len(edges))]
    return float(np.polyfit(np.log(f), np.log(p), 1)[0])


# ---------------------------------------------------------------- scenes


@pytest.mark.parametrize("kind", scenes.SCENE_KINDS)
def test_scenes_are_float32_in_unit_range_and_a_function_of_the_seed(kind):
    one = scenes.procedural_scene(np.random.default_rng(5), 64, 96, kind)
    assert one.shape == (64, 96, 3) and one.dtype == np.float32
    assert 0 <= one.min() and one.max() <= 1 and one.std() > 0.05
    assert np.array_equal(one, scenes.procedural_scene(np.random.default_rng(5), 64, 96, kind))
    assert not np.array_equal(one, scenes.procedural_scene(np.random.default_rng(6), 64, 96, kind))


def test_scenes_have_natural_power_spectra_and_the_check_can_tell():
    # Measured, 6 seeds each: dead leaves -1.8 to -2.6, textured -2.2 to -2.8, gradient -2.5 to -2.7, edges -1.8
    # to -2.3; the seven training photographs -2.25 (motorcycle) to -2.93 (coffee).
    for kind in scenes.SCENE_KINDS:
        slopes = [spectrum_slope(scenes.procedural_scene(np.random.default_rng(s), 256, 448, kind)) for s in range(3)]
        assert -3.0 <= np.mean(slopes) <= -1.5, (kind, slopes)
    rng = np.random.default_rng(0)
    white = rng.random((256, 448, 3))
    assert spectrum_slope(white) > -0.5  # no structure at any scale: flat
    smooth = scenes.fractal_noise(rng, 256, 448, slope=4.5)[..., None].repeat(3, axis=2)
    assert spectrum_slope(smooth) < -3.5  # all low frequencies: too steep for a photograph


def test_dead_leaves_cover_the_canvas_with_occluding_leaves_of_power_law_sizes():
    labels = scenes.leaf_labels(np.random.default_rng(1), 256, 448, r_min=2.0)
    assert labels.min() >= 0
    areas = np.bincount(labels.ravel())
    areas = areas[areas > 0]
    # many leaves seen, from a few pixels to a sizeable share of the frame
    assert len(areas) > 300 and np.median(areas) < 50 and areas.max() > 2000
    radii = scenes._power_law(np.random.default_rng(2), 100000, 2.0, 200.0)
    # p(r) ~ r^-3: P(r > x) ~ x^-2, so doubling the radius quarters the share above it
    assert 0.2 < (radii > 8).mean() / (radii > 4).mean() < 0.3


def test_a_scene_takes_well_under_half_a_second_at_256x448():
    rng = np.random.default_rng(3)
    spent = []
    for kind in scenes.SCENE_KINDS * 2:
        start = time.process_time()
        scenes.procedural_scene(rng, 256, 448, kind)
        spent.append(time.process_time() - start)
    # measured on the 2-core EPYC: 0.04 to 0.15 s of CPU time each
    assert np.mean(spent) < 0.4 and max(spent) < 0.8, spent


# ---------------------------------------------------------------- kernels and noise


def _extent(kernel: np.ndarray) -> int:
    ys, xs = np.nonzero(kernel > kernel.max() * 0.02)
    return int(max(ys.max() - ys.min(), xs.max() - xs.min()) + 1)


def _check_kernel(kernel: np.ndarray, size: int) -> None:
    assert kernel.shape == (size, size) and kernel.dtype == np.float64
    assert kernel.min() >= 0 and abs(kernel.sum() - 1) < 1e-12
    grid = np.arange(size)
    centre = ((kernel.sum(axis=1) * grid).sum(), (kernel.sum(axis=0) * grid).sum())
    assert np.allclose(centre, (size - 1) / 2, atol=1.0), centre  # a blur that does not shift the image


def test_training_kernels_sum_to_one_reach_15_pixels_at_256x448_and_repeat_per_seed():
    size = kernels.wide_kernel_size(256, 448)
    assert size == 17
    for family in kernels.TRAINING_FAMILIES:
        draws = [kernels.training_kernel(family, np.random.default_rng(i), size) for i in range(40)]
        for kernel in draws:
            _check_kernel(kernel, size)
        assert np.array_equal(draws[3], kernels.training_kernel(family, np.random.default_rng(3), size))
        extents = [_extent(k) for k in draws]
        if family == "defocus":
            assert max(extents) <= 8
        else:
            assert max(extents) >= 15 and min(extents) <= 8, (family, extents)
    assert kernels.wide_kernel_size(720, 1280) == 41 and kernels.wide_kernel_size(48, 64) == 15


def test_the_family_draw_follows_its_weights():
    rng = np.random.default_rng(0)
    drawn = [kernels.draw_training_kernel(rng, 15)[0] for _ in range(600)]
    for family, weight in zip(kernels.TRAINING_FAMILIES, kernels.FAMILY_WEIGHTS):
        assert abs(drawn.count(family) / 600 - weight) < 0.06, (family, drawn.count(family))


def test_noise_sampler_gives_exactly_noise_free_pairs_and_sigmas_up_to_8():
    rng = np.random.default_rng(0)
    sigmas = np.array([kernels.noise_sigma(rng, 0.0, 8.0, clean_share=0.25) for _ in range(4000)])
    assert abs((sigmas == 0).mean() - 0.25) < 0.03
    assert sigmas.max() <= 8 and sigmas.max() > 7.9 and 3.5 < sigmas[sigmas > 0].mean() < 4.5
    assert all(kernels.noise_sigma(rng, 4.0, 8.0, clean_share=0.0) >= 4 for _ in range(100))


def _best_match(kernel: np.ndarray, pool: np.ndarray) -> float:
    """Largest normalised cross-correlation, over every shift, between `kernel` and any kernel of `pool`."""
    unit = kernel / np.linalg.norm(kernel)
    pool = pool / np.linalg.norm(pool, axis=(1, 2), keepdims=True)
    return float(fftconvolve(pool, unit[None, ::-1, ::-1], mode="full", axes=(1, 2)).max())


def test_held_out_shapes_match_no_training_kernel_as_training_kernels_match_each_other():
    size = 17
    rng = np.random.default_rng(11)
    pool = np.stack([kernels.training_kernel(f, rng, size) for f in kernels.TRAINING_FAMILIES for _ in range(250)])
    for shape in kernels.HELD_OUT_SHAPES:
        draws = [kernels.held_out_kernel(shape, np.random.default_rng(i), size) for i in range(6)]
        for kernel in draws:
            _check_kernel(kernel, size)
        assert np.array_equal(draws[2], kernels.held_out_kernel(shape, np.random.default_rng(2), size))
        # measured: best matches 0.59-0.75 (zig-zag, double exposure), 0.79-0.88 (ring, Gaussian)
        assert max(_best_match(k, pool) for k in draws) < 0.9, shape
    # the control: fresh training kernels find close relatives in the same pool (measured: median 0.98;
    # shake, the most varied family, 0.82-0.99)
    fresh = [
        kernels.training_kernel(f, np.random.default_rng(100 + i), size)
        for f in kernels.TRAINING_FAMILIES
        for i in range(6)
    ]
    assert np.median([_best_match(k, pool) for k in fresh]) > 0.95
    ring = kernels.held_out_kernel("ring_defocus", np.random.default_rng(0), size)
    assert ring[size // 2, size // 2] == 0  # empty at its centre, unlike any defocus disk


def test_bad_arguments_are_refused_by_name():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="odd"):
        kernels.training_kernel("line", rng, 16)
    with pytest.raises(ValueError, match="odd"):
        kernels.held_out_kernel("zigzag", rng, 3)
    with pytest.raises(ValueError, match="unknown training kernel family 'gaussian'"):
        kernels.training_kernel("gaussian", rng, 15)
    with pytest.raises(ValueError, match="unknown held-out kernel shape 'line'"):
        kernels.held_out_kernel("line", rng, 15)
    with pytest.raises(ValueError, match="clean share"):
        kernels.noise_sigma(rng, 0, 8, clean_share=1.5)
    with pytest.raises(ValueError, match="low <= high"):
        kernels.noise_sigma(rng, 8, 4)
    with pytest.raises(ValueError, match="32x32"):
        kernels.wide_kernel_size(20, 64)
    with pytest.raises(ValueError, match="unknown scene kind 'clouds'"):
        scenes.procedural_scene(rng, 64, 64, "clouds")
    with pytest.raises(ValueError, match="16x16"):
        scenes.procedural_scene(rng, 8, 64)
    with pytest.raises(ValueError, match="r_min < r_max"):
        scenes.leaf_labels(rng, 64, 64, r_min=40, r_max=20)


# ---------------------------------------------------------------- held-out photographs


def test_held_out_photographs_load_offline_and_were_never_training_sources():
    photos = held_out_photographs()
    assert [p.name for p in photos] == [name for _, _, name in HELD_OUT_PHOTOGRAPHS]
    assert not {p.name for p in photos} & set(SOURCE_NAMES)
    for photo in photos:
        with Image.open(photo.path) as image:
            assert min(image.size) >= 300, photo.name
            image.convert("RGB").load()
    clock = real_blur_photograph()
    assert clock.name == "clock_motion.png" and clock.name not in SOURCE_NAMES
    with Image.open(clock.path) as image:
        assert image.size == (400, 300)


# ---------------------------------------------------------------- the synthetic set


def test_the_default_data_is_byte_identical_to_the_demo_commits(tmp_path):
    """synthetic.py as of DEMO_DATA_COMMIT, run from git, against today's defaults: the same bytes."""
    old = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{DEMO_DATA_COMMIT}:golf_dist/data/synthetic.py"],
        capture_output=True,
        text=True,
    )
    if old.returncode != 0:
        pytest.skip(f"commit {DEMO_DATA_COMMIT} is not in this checkout's history: {old.stderr.strip()}")
    path = tmp_path / "synthetic_at_demo_commit.py"
    path.write_text(old.stdout)
    spec = importlib.util.spec_from_file_location("synthetic_at_demo_commit", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name)
    for kw in (dict(seed=0, noise=(4.0, 8.0)), dict(seed=3)):
        module.make_synthetic_gopro(tmp_path / "old", overwrite=True, **kw, **TINY)
        make_synthetic_gopro(tmp_path / "new", overwrite=True, **kw, **TINY)
        assert _tree(tmp_path / "old") == _tree(tmp_path / "new")


def test_mixed_content_and_wide_kernels_repeat_per_seed_and_differ_from_the_demo(tmp_path):
    wide = Variety("mixed", "wide", 0.0)
    make_synthetic_gopro(tmp_path / "a", seed=1, variety=wide, **TINY)
    make_synthetic_gopro(tmp_path / "b", seed=1, variety=wide, **{**TINY, "workers": 2})
    make_synthetic_gopro(tmp_path / "demo", seed=1, **TINY)
    a = _tree(tmp_path / "a")
    assert a == _tree(tmp_path / "b")
    demo = _tree(tmp_path / "demo")
    # the same layout and names; every other scene is procedural, every kernel from the wide family
    assert a.keys() == demo.keys()
    assert sum(a[k] != demo[k] for k in a if "/sharp/" in k) >= len([k for k in a if "/sharp/" in k]) // 2
    assert all(a[k] != demo[k] for k in a if "/blur/" in k)


def test_the_test_split_is_photographs_whatever_the_content(tmp_path):
    """--content shapes the training split alone: the test split of mixed or procedural content is the same
    bytes as the photographs' (the same views, kernels and noise), while their training splits differ."""
    trees = {}
    for content in CONTENTS:
        make_synthetic_gopro(tmp_path / content, seed=5, variety=Variety(content=content), **TINY)
        trees[content] = _tree(tmp_path / content)
    split = {c: {k: v for k, v in tree.items() if k.startswith("test/")} for c, tree in trees.items()}
    assert split["photos"] and split["photos"] == split["mixed"] == split["procedural"]
    train = {
        c: {k: v for k, v in tree.items() if k.startswith("train/") and "/sharp/" in k} for c, tree in trees.items()
    }
    assert train["photos"] != train["mixed"] != train["procedural"] != train["photos"]


def test_a_clean_share_leaves_exactly_that_many_pairs_noise_free(tmp_path):
    # A noise-free pair is drawn from the same streams as a pair of --noise 0 0: its blurred frame is the same bytes.
    kw = dict(TINY, train_pairs=24, seed=2)
    make_synthetic_gopro(tmp_path / "silent", noise=(0.0, 0.0), **kw)
    make_synthetic_gopro(tmp_path / "half", noise=(4.0, 8.0), variety=Variety(clean_share=0.5), **kw)
    make_synthetic_gopro(tmp_path / "all", noise=(4.0, 8.0), variety=Variety(clean_share=1.0), **kw)
    silent, half = _tree(tmp_path / "silent"), _tree(tmp_path / "half")
    assert _tree(tmp_path / "all") == silent
    blurred = [k for k in silent if "/blur/" in k]
    clean = sum(half[k] == silent[k] for k in blurred)
    assert 0.25 * len(blurred) <= clean <= 0.75 * len(blurred), (clean, len(blurred))


def _input_psnrs(root: Path, split: str) -> list[float]:
    return [
        frame_psnr(np.asarray(Image.open(blur)), np.asarray(Image.open(blur.parent.parent / "sharp" / blur.name)))
        for blur in sorted((root / split).glob("*/blur/*.png"))
    ]


def test_wide_kernels_keep_every_test_frame_blurred_to_30_db_or_less_and_train_frames_as_drawn(tmp_path):
    """The wide family's nearly sharp draws stay in training (a model must leave a sharp input alone) but a test
    pair of the wide family is redrawn until its blurred frame is at most 30 dB from its sharp frame."""
    kw = dict(TINY, train_pairs=40, test_pairs=40, height=64, width=96, seed=4, noise=(0.0, 8.0))
    make_synthetic_gopro(tmp_path / "wide", variety=Variety("mixed", "wide", 0.5), **kw)
    test, train = _input_psnrs(tmp_path / "wide", "test"), _input_psnrs(tmp_path / "wide", "train")
    assert len(test) == 40 and max(test) <= 30.0, sorted(test)[-3:]
    assert sum(p > 30.0 for p in train) >= 4, sorted(train)[-5:]  # the rule is the test split's alone
    # the train split does not depend on the test split's redraws: the same bytes with a single test pair
    make_synthetic_gopro(tmp_path / "one", variety=Variety("mixed", "wide", 0.5), **{**kw, "test_pairs": 1})
    train_a = {k: v for k, v in _tree(tmp_path / "wide").items() if k.startswith("train/")}
    assert train_a == {k: v for k, v in _tree(tmp_path / "one").items() if k.startswith("train/")}


def test_bad_variety_exits_2_naming_the_flag(tmp_path):
    for variety, flag in (
        (Variety(content="clouds"), "--content"),
        (Variety(kernels="gauss"), "--kernels"),
        (Variety(clean_share=1.5), "--clean-share"),
    ):
        with pytest.raises(ConfigError, match=flag):
            make_synthetic_gopro(tmp_path / "bad", variety=variety, **TINY)
        assert not (tmp_path / "bad").exists()
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "data_prep" / "synth_gopro.py"),
            "--out",
            str(tmp_path / "x"),
            "--clean-share",
            "-0.1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--clean-share" in proc.stderr and not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="--kernel-size must be at least 5"):
        make_synthetic_gopro(tmp_path / "bad", kernel=3, variety=Variety(kernels="wide"), **TINY)
