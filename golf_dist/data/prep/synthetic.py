"""A synthetic set in the exact GOPRO_Large layout, made from the natural images inside scikit-image.

A scene is one source image, rescaled and flipped; its frames are crops along a slow random camera
path, like video. Each blurred frame is its sharp frame convolved with a camera-shake kernel
(Boracchi & Foi trajectories rasterised as in DeblurGAN's `motion_blur`), plus Gaussian noise whose
sigma is drawn per pair from a range (DEFAULT_NOISE, light; the quick start asks for 0-8 of 255).
Every random draw comes from a generator seeded by (seed, what it is for, split, scene, frame), so the
bytes written do not depend on the order of work. `Variety` widens the training split (procedural scenes, the
wide kernel family of kernels.py, noise-free pairs: the quick start's data); the test split stays photographs.
"""

from __future__ import annotations

import cmath
import importlib.util
import math
import os
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.signal import fftconvolve
from tqdm import tqdm

from golf_dist.data.prep.kernels import draw_training_kernel, noise_sigma, wide_kernel_size
from golf_dist.data.prep.scenes import procedural_scene
from golf_dist.errors import ConfigError, DataError
from golf_dist.files import install_folders

SPLITS = ("train", "test")
# Natural RGB photographs shipped in the scikit-image wheel. Left out: color.png (a smooth colour wheel)
# and retina.jpg (a fundus photograph, a third of it black surround and the rest smooth: its blurred
# frames stay at 37-39 dB PSNR, so they show nothing of deblurring and, in a mean over a few test frames,
# weigh on it like noise). Both splits draw scenes from all of them, as GoPro's train and test videos
# come from one camera in similar places: a test frame is a view (position, scale, flips) and a blur
# kernel never used in training, of a photograph that training also saw. Seven photographs are too few
# to hold some out and still learn deblurring in a few CPU minutes.
SOURCE_NAMES = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "motorcycle_left.png",
    "rocket.jpg",
)
# zlib level 3: within 7% of level 6's size at a third of the time (1280x720: 0.1 s against 0.36 s).
PNG_COMPRESS_LEVEL = 3
# DeblurGAN's choices of "anxiety" (expl) for the Boracchi & Foi trajectory.
ANXIETIES = (0.01, 0.009, 0.008, 0.007, 0.005, 0.003)

# Tags that keep the seed streams for the plan, the scenes, the pairs and procedural content apart.
_PLAN, _SCENE, _PAIR, _CONTENT = 0, 1, 2, 3
# Scene content: the photographs only (the demo's data), every other scene procedural, or all procedural
# (golf_dist/data/prep/scenes.py). Kernels: the demo's camera shake, or the wide training family
# (golf_dist/data/prep/kernels.py).
CONTENTS = ("photos", "mixed", "procedural")
KERNEL_FAMILIES = ("demo", "wide")


# sigma of the blurred frames' Gaussian noise (of 255), drawn per pair from this range
DEFAULT_NOISE = (1.0, 2.0)
# The wide family draws nearly sharp kernels (a 1-pixel line, a half-pixel disk), which training needs (a
# model must leave a sharp input alone) but a test frame must not be: a pair of the test split whose blurred
# frame is within MAX_TEST_INPUT_PSNR dB of its sharp frame draws its kernel and noise again, up to
# MAX_TEST_REDRAWS draws (the quick start's and gpu_quick.sh's test pairs each need a few at most), so the
# test split's mean gain measures deblurring.
MAX_TEST_INPUT_PSNR = 30.0
MAX_TEST_REDRAWS = 50


def frame_psnr(blurred: np.ndarray, sharp: np.ndarray) -> float:
    """PSNR (dB, peak 255) of one uint8 frame against another; inf where they are equal."""
    mse = float(np.mean((blurred.astype(np.float64) - sharp.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def source_images() -> list[Path]:
    """The RGB photographs found in the installed scikit-image's data folder, in SOURCE_NAMES order."""
    spec = importlib.util.find_spec("skimage.data")
    if spec is None or spec.origin is None:
        raise DataError("scikit-image is not installed: pip install scikit-image (its wheel ships the source images)")
    folder = Path(spec.origin).parent
    found = []
    for name in SOURCE_NAMES:
        path = folder / name
        if path.is_file():
            with Image.open(path) as im:
                if im.mode == "RGB":
                    found.append(path)
    if not found:
        raise DataError(
            f"no RGB source images ({', '.join(SOURCE_NAMES)}) in {folder}: "
            "reinstall scikit-image (pip install --force-reinstall scikit-image)"
        )
    return found


def kernel_size(height: int, width: int) -> int:
    """Odd blur-kernel size for a frame: about min(H, W)/24, within [7, 31] (31 at GoPro's 720x1280)."""
    size = int(round(min(height, width) / 24))
    return min(31, max(7, size | 1))


def shake_trajectory(rng: np.random.Generator, length: float, iters: int = 2000) -> np.ndarray:
    """A camera-shake path (complex positions, total path length `length`), Boracchi & Foi's model.

    The velocity keeps a constant speed; each step it turns by a Gaussian shake, is pulled back towards
    the start (centripetal term) and, rarely, reverses in an impulsive shake. `anxiety` scales both.
    """
    anxiety = float(rng.choice(ANXIETIES))
    centripetal = 0.7 * rng.random()
    prob_big_shake = 0.2 * rng.random()
    gaussian_shake = 10 * rng.random()
    step = length / (iters - 1)
    v = cmath.exp(1j * math.radians(360 * rng.random())) * anxiety
    shakes = (rng.random(iters) < prob_big_shake * anxiety).tolist()
    turns = (rng.random(iters) - 0.5).tolist()
    noise = (rng.standard_normal(iters) + 1j * rng.standard_normal(iters)).tolist()
    x = [0j] * iters
    for t in range(iters - 1):
        big = 2 * v * cmath.exp(1j * (math.pi + turns[t])) if shakes[t] else 0
        v += big + anxiety * (gaussian_shake * noise[t] - centripetal * x[t]) * step
        v = v / abs(v) * step
        x[t + 1] = x[t] + v
    return np.asarray(x)


def rasterise_psf(trajectory: np.ndarray, size: int, extent: float | None = None) -> np.ndarray:
    """Sub-pixel (bilinear) rasterisation of a trajectory into a size x size kernel summing to 1.

    The path is centred on its time average, so the blur does not shift the image. With `extent`
    (0..1] it is scaled so that it reaches that share of the canvas; without, it is only shrunk if it
    would not fit.
    """
    centred = trajectory - trajectory.mean()
    reach = max(np.abs(centred.real).max(), np.abs(centred.imag).max(), 1e-9)
    fit = ((size - 1) / 2 - 0.5) / reach
    scale = fit * extent if extent is not None else min(1.0, fit)
    centred = centred * scale + complex((size - 1) / 2, (size - 1) / 2)
    xs, ys = centred.real, centred.imag
    x0, y0 = np.floor(xs).astype(int), np.floor(ys).astype(int)
    fx, fy = xs - x0, ys - y0
    psf = np.zeros((size, size))
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            np.add.at(psf, (np.clip(y0 + dy, 0, size - 1), np.clip(x0 + dx, 0, size - 1)), wy * wx)
    return psf / psf.sum()


def motion_kernel(size: int, rng: np.random.Generator) -> np.ndarray:
    """A random camera-shake blur kernel, size x size (size odd), float64, summing to 1."""
    if size < 3 or size % 2 == 0:
        raise ValueError(f"kernel size must be odd and >= 3, got {size}")
    length = rng.uniform(0.8, 2.5) * (size - 1)
    # The path spans 60-100% of the canvas: every frame visibly blurred, as GoPro's are (a compact
    # shake path would give nearly sharp "blurred" frames that teach the networks little).
    return rasterise_psf(shake_trajectory(rng, length), size, extent=rng.uniform(0.6, 1.0))


def blur_frame(window: np.ndarray, kernel: np.ndarray, noise_sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Blur an HxWx3 float window (frame plus kernel radius on each side) into the uint8 frame inside it.

    Convolving the real surroundings ("valid") instead of padding keeps the frame border physical.
    """
    blurred = fftconvolve(window, kernel.astype(np.float32)[:, :, None], mode="valid", axes=(0, 1))
    blurred += rng.standard_normal(blurred.shape, dtype=np.float32) * np.float32(noise_sigma)
    return np.rint(np.clip(blurred, 0, 255)).astype(np.uint8)


@dataclass(frozen=True)
class _Scene:
    split: str
    index: int  # position within its split, part of the scene's seed
    name: str
    source: Path
    frames: tuple[str, ...]
    procedural: bool = False  # a procedural image (seeded by the scene) instead of `source`


@dataclass(frozen=True)
class Variety:
    """The data beyond the demo's: scene content, kernel family and the share of noise-free pairs.
    The defaults add nothing, so the demo's bytes stay the same."""

    content: str = "photos"
    kernels: str = "demo"
    clean_share: float = 0.0


def _plan(
    seed: int, pairs: dict[str, int], frames_per_scene: int, sources: list[Path], content: str = "photos"
) -> list[_Scene]:
    names: set[str] = set()
    scenes = []
    for split in reversed(SPLITS):
        # One stream per split, test planned first (train's scene names avoid test's, not the other way
        # round): the test split is the same whatever the number of training pairs.
        rng = np.random.default_rng([seed, _PLAN, SPLITS.index(split)])
        order = rng.permutation(len(sources))
        # Every scene of the split contains frame `base`, so frame numbers repeat across scenes as in
        # GoPro (sample keys must include the scene), and none starts at 000001.
        base = int(rng.integers(2 + frames_per_scene, 60 + frames_per_scene))
        n_scenes = math.ceil(pairs[split] / frames_per_scene)
        for i in range(n_scenes):
            name = ""
            while not name or name in names:
                take = rng.choice(3, p=[0.8, 0.1, 0.1])
                name = "GOPR%04d_%02d_%02d" % (rng.integers(300, 1000), rng.integers(0, 20), take)  # noqa: UP031
            names.add(name)
            count = min(frames_per_scene, pairs[split] - i * frames_per_scene)
            start = base - int(rng.integers(0, count))
            frames = tuple(f"{start + k:06d}" for k in range(count))
            # --content shapes the training split alone: the test split is photographs (views never trained on),
            # since what it measures is the deblurring of photographs, not of procedural images
            procedural = split == "train" and (content == "procedural" or (content == "mixed" and i % 2 == 1))
            slot = i // 2 if split == "train" and content == "mixed" else i  # mixed: the photographs still take turns
            scenes.append(_Scene(split, i, name, sources[order[slot % len(sources)]], frames, procedural))
    return scenes


def _render_scene(
    scene: _Scene,
    height: int,
    width: int,
    seed: int,
    root: Path,
    kernel: int | None,
    noise: tuple[float, float],
    variety: Variety = Variety(),
) -> None:
    split_id = SPLITS.index(scene.split)
    rng = np.random.default_rng([seed, _SCENE, split_id, scene.index])
    n = len(scene.frames)
    short = min(height, width)
    # A slow camera path: a drifting velocity, a few pixels per frame.
    speed = rng.uniform(0.004, 0.015) * short
    velocity = speed * np.exp(1j * rng.uniform(0, 2 * np.pi)) + np.cumsum(
        rng.normal(0, 0.002 * short, n) + 1j * rng.normal(0, 0.002 * short, n)
    )
    path = np.concatenate([[0], np.cumsum(velocity[:-1])])
    ys, xs = np.rint(path.imag).astype(int), np.rint(path.real).astype(int)
    ys, xs = ys - ys.min(), xs - xs.min()
    k = kernel or (wide_kernel_size(height, width) if variety.kernels == "wide" else kernel_size(height, width))
    r = k // 2
    win_h, win_w = height + 2 * r, width + 2 * r
    need_h, need_w = win_h + ys.max(), win_w + xs.max()

    if scene.procedural:
        # drawn 1.4 times the size needed, so that the view's zoom below only ever shrinks it (stays sharp)
        pixels = procedural_scene(
            np.random.default_rng([seed, _CONTENT, split_id, scene.index]),
            math.ceil(need_h * 1.4),
            math.ceil(need_w * 1.4),
        )
        src = Image.fromarray(np.rint(pixels * 255).astype(np.uint8))
    else:
        with Image.open(scene.source) as im:
            src = im.convert("RGB")
    scale = max(need_h / src.height, need_w / src.width) * rng.uniform(1.0, 1.4)
    new_w, new_h = max(need_w, math.ceil(src.width * scale)), max(need_h, math.ceil(src.height * scale))
    img = np.asarray(src.resize((new_w, new_h), Image.LANCZOS))
    if rng.random() < 0.5:
        img = img[:, ::-1]
    if rng.random() < 0.5:
        img = img[::-1]
    top, left = int(rng.integers(0, new_h - need_h + 1)), int(rng.integers(0, new_w - need_w + 1))

    blur_dir, sharp_dir = root / scene.split / scene.name / "blur", root / scene.split / scene.name / "sharp"
    blur_dir.mkdir(parents=True)
    sharp_dir.mkdir(parents=True)
    capped = scene.split == "test" and variety.kernels == "wide"  # a test frame at most MAX_TEST_INPUT_PSNR
    for i, frame in enumerate(scene.frames):
        pair_rng = np.random.default_rng([seed, _PAIR, split_id, scene.index, i])
        y, x = top + ys[i], left + xs[i]
        window = img[y : y + win_h, x : x + win_w]
        sharp = np.ascontiguousarray(window[r : r + height, r : r + width])
        window_f32 = window.astype(np.float32)  # once, however many draws the test cap takes
        for _ in range(MAX_TEST_REDRAWS if capped else 1):
            psf = motion_kernel(k, pair_rng) if variety.kernels == "demo" else draw_training_kernel(pair_rng, k)[1]
            sigma = (
                noise_sigma(pair_rng, *noise, variety.clean_share) if variety.clean_share else pair_rng.uniform(*noise)
            )
            blur = blur_frame(window_f32, psf, sigma, pair_rng)
            if not capped or frame_psnr(blur, sharp) <= MAX_TEST_INPUT_PSNR:
                break
        Image.fromarray(sharp).save(sharp_dir / f"{frame}.png", format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        Image.fromarray(blur).save(blur_dir / f"{frame}.png", format="PNG", compress_level=PNG_COMPRESS_LEVEL)


def _render_all(
    scenes: list,
    height: int,
    width: int,
    seed: int,
    folder: Path,
    kernel: int | None,
    noise: tuple[float, float],
    workers: int,
    progress: bool,
    variety: Variety = Variety(),
) -> None:
    """Every scene into `folder`, by `workers` processes, with one progress bar over the pairs."""
    total = sum(len(scene.frames) for scene in scenes)
    with tqdm(total=total, unit="pair", desc="synthetic GoPro", disable=not progress) as bar:
        if workers == 1:
            for scene in scenes:
                _render_scene(scene, height, width, seed, folder, kernel, noise, variety)
                bar.update(len(scene.frames))
            return
        pool = ProcessPoolExecutor(workers)
        try:
            futures = {
                pool.submit(_render_scene, sc, height, width, seed, folder, kernel, noise, variety): sc for sc in scenes
            }
            for future in as_completed(futures):
                future.result()
                bar.update(len(futures[future].frames))
        finally:
            pool.shutdown(cancel_futures=True)


def make_synthetic_gopro(
    out: str | Path,
    *,
    train_pairs: int = 64,
    test_pairs: int = 16,
    height: int = 720,
    width: int = 1280,
    seed: int = 0,
    frames_per_scene: int = 4,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    kernel: int | None = None,
    noise: tuple[float, float] = DEFAULT_NOISE,
    variety: Variety = Variety(),
) -> dict:
    """Write `out/{train,test}/<scene>/{blur,sharp}/<frame>.png`; returns {split: {"scenes": n, "pairs": n}}.

    `kernel` is the blur kernels' size (odd; default `kernel_size(height, width)`, about min(H, W) / 24).
    Each blurred frame gets Gaussian noise whose sigma (of 255) is drawn uniformly from the `noise` range.
    `variety` widens the data: procedural scenes, the wide kernel family (canvas `wide_kernel_size`
    unless `kernel`), a share of noise-free pairs; its defaults give the demo's data byte for byte.
    Scenes are rendered by `workers` processes (default min(4, CPUs)). Everything is written into a
    hidden sibling folder first and moved into `out` at the end, so an interrupted run leaves nothing
    half-written there.
    """
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    for flag, value, low in (
        ("--train-pairs", train_pairs, 1),
        ("--test-pairs", test_pairs, 1),
        ("--height", height, 32),
        ("--width", width, 32),
        ("--frames-per-scene", frames_per_scene, 1),
        ("--seed", seed, 0),
        ("--workers", workers, 1),
    ):
        if value < low:
            raise ConfigError(f"{flag} must be at least {low}, got {value}")
    if not 0 <= noise[0] <= noise[1] <= 64:
        raise ConfigError(
            f"--noise must be LOW HIGH with 0 <= LOW <= HIGH <= 64 (sigma, of 255), got {noise[0]} {noise[1]}"
        )
    if kernel is not None and (kernel < 3 or kernel % 2 == 0 or kernel > min(height, width) // 2):
        raise ConfigError(
            f"--kernel-size must be odd, at least 3 and at most half the frame's short side, got {kernel}"
        )
    _check_variety(variety, kernel)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} exists and is not a folder: choose another --out")
    existing = [out / s for s in SPLITS if (out / s).exists()]
    if existing and not overwrite:
        raise DataError(f"{existing[0]} already exists: pass --overwrite to replace it, or choose another --out")
    sources = source_images()
    scenes = _plan(seed, {"train": train_pairs, "test": test_pairs}, frames_per_scene, sources, variety.content)

    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = f".{out.resolve().name}.tmp-"
    for stale in parent.glob(tmp_prefix + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = parent / f"{tmp_prefix}{os.getpid()}"
    try:
        _render_all(scenes, height, width, seed, tmp, kernel, noise, workers, progress, variety)
        install_folders(tmp, out, SPLITS)  # fsynced, then renamed in; old splits deleted only once the new are in
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        split: {
            "scenes": sum(c.split == split for c in scenes),
            "pairs": sum(len(c.frames) for c in scenes if c.split == split),
        }
        for split in SPLITS
    }


def _check_variety(variety: Variety, kernel: int | None) -> None:
    if variety.content not in CONTENTS:
        raise ConfigError(f"--content must be one of {', '.join(CONTENTS)}, got {variety.content!r}")
    if variety.kernels not in KERNEL_FAMILIES:
        raise ConfigError(f"--kernels must be one of {', '.join(KERNEL_FAMILIES)}, got {variety.kernels!r}")
    if variety.kernels == "wide" and kernel is not None and kernel < 5:
        raise ConfigError(f"--kernel-size must be at least 5 with --kernels wide, got {kernel}")
    if not 0 <= variety.clean_share <= 1:
        raise ConfigError(f"--clean-share must be within [0, 1], got {variety.clean_share}")


def format_summary(out: str | Path, counts: dict) -> str:
    """What was written where, and the next command."""
    lines = [f"wrote a synthetic GoPro set to {out}:"]
    lines += [f"  {s}: {counts[s]['pairs']} pairs in {counts[s]['scenes']} scenes" for s in SPLITS]
    lines.append(f"next: python data_prep/shard_gopro.py --src {out} --out SHARDS")
    return "\n".join(lines)
