"""Blur kernels and noise for training pairs, and a named set of kernel shapes that training never draws.

Training family (`draw_training_kernel`), after Carbajal et al.'s finding that varied procedural blur
makes deblurring transfer to real photographs ("Assessing the Role of Datasets in the Generalization of
Motion Deblurring Methods to Real Images", arXiv 2209.12675):

- `shake`: camera-shake paths after Boracchi & Foi ("Modeling the Performance of Image Restoration From
  Motion Blur", 2012): constant speed, Gaussian turns, a pull back towards the start and rare
  impulsive reversals, at short, medium and long path lengths;
- `line`: straight uniform motion, any angle, from 1 pixel (nearly sharp) to the canvas;
- `arc`: curved motion along a circular arc;
- `defocus`: a small filled disk (radius 0.5 to 3.5 pixels).

Held-out shapes (`held_out_kernel`, `HELD_OUT_SHAPES`) are none of these: an anisotropic Gaussian (a soft
lens or a tripod vibration: smooth, everywhere positive, no path), a ring (the annular defocus of a mirror
lens: empty at its centre), a zig-zag polyline (straight strokes joined by sharp corners of 100 to 150
degrees) and a double exposure (two or three separate points: a camera that jumped). Every kernel is
float64, non-negative, sums to 1 and is centred on its mass, so a blur does not shift the image.
"""

from __future__ import annotations

import math

import numpy as np

TRAINING_FAMILIES = ("shake", "line", "arc", "defocus")
# Share of each family in the training draw: camera shake dominates real photographs' blur.
FAMILY_WEIGHTS = (0.45, 0.2, 0.2, 0.15)
# Path lengths of the shake classes, as a share of the canvas' side (short, medium, long).
SHAKE_LENGTHS = ((0.15, 0.4), (0.4, 0.8), (0.8, 1.6))
HELD_OUT_SHAPES = ("anisotropic_gaussian", "ring_defocus", "zigzag", "double_exposure")
# Sub-pixel samples per pixel of arc and line paths: enough for an even stroke at any angle.
_PATH_SAMPLES = 4


def wide_kernel_size(height: int, width: int) -> int:
    """Odd kernel canvas for the wide family: about min(H, W) / 16, within [15, 41] (17 at 256x448)."""
    if height < 32 or width < 32:
        raise ValueError(f"frame must be at least 32x32 for a blur kernel, got {height}x{width}")
    return min(41, max(15, round(min(height, width) / 16) | 1))


def _check_size(size: int) -> None:
    if not isinstance(size, (int, np.integer)) or size < 5 or size % 2 == 0:
        raise ValueError(f"kernel size must be an odd integer of at least 5, got {size!r}")


def splat(points: np.ndarray, weights: np.ndarray, size: int) -> np.ndarray:
    """Weighted bilinear splat of isolated points, their weighted mean on the centre pixel, summing to 1."""
    centre = complex((size - 1) / 2, (size - 1) / 2)
    shifted = points - (weights * points).sum() / weights.sum() + centre
    xs, ys = np.clip(shifted.real, 0, size - 1), np.clip(shifted.imag, 0, size - 1)
    x0, y0 = np.minimum(np.floor(xs).astype(int), size - 2), np.minimum(np.floor(ys).astype(int), size - 2)
    fx, fy = xs - x0, ys - y0
    psf = np.zeros((size, size))
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            np.add.at(psf, (y0 + dy, x0 + dx), weights * wy * wx)
    return psf / psf.sum()


def rasterise_path(points: np.ndarray, size: int) -> np.ndarray:
    """Bilinear splat of complex path positions (pixels) into a size x size kernel summing to 1, the path's
    mean on the centre pixel; positions beyond the canvas are clipped to its edge (callers keep paths inside)."""
    return splat(points, np.ones(len(points)), size)


def _fit(points: np.ndarray, reach: float) -> np.ndarray:
    """Scale a path about its mean so that its farthest point is at most `reach` pixels away in x and y."""
    centred = points - points.mean()
    far = max(np.abs(centred.real).max(), np.abs(centred.imag).max(), 1e-9)
    return centred * min(1.0, reach / far)


def shake_path(rng: np.random.Generator, length: float, steps: int = 1000) -> np.ndarray:
    """A Boracchi & Foi camera-shake path of total length `length` pixels (complex positions)."""
    anxiety = rng.uniform(0.003, 0.01)
    centripetal = 0.7 * rng.random()
    big_shake = 0.2 * rng.random()
    gaussian = 10 * rng.random()
    step = length / (steps - 1)
    velocity = np.exp(1j * rng.uniform(0, 2 * np.pi)) * anxiety
    shakes = (rng.random(steps) < big_shake * anxiety).tolist()
    turns = (rng.random(steps) - 0.5).tolist()
    kicks = (rng.standard_normal(steps) + 1j * rng.standard_normal(steps)).tolist()
    x = [0j] * steps
    for t in range(steps - 1):
        reverse = 2 * velocity * complex(math.cos(math.pi + turns[t]), math.sin(math.pi + turns[t])) if shakes[t] else 0
        velocity += reverse + anxiety * (gaussian * kicks[t] - centripetal * x[t]) * step
        velocity = velocity / abs(velocity) * step
        x[t + 1] = x[t] + velocity
    return np.asarray(x)


def _line_path(length: float, angle: float, samples: int) -> np.ndarray:
    return np.linspace(-length / 2, length / 2, samples) * np.exp(1j * angle)


def _arc_path(length: float, sweep: float, angle: float, samples: int) -> np.ndarray:
    """`length` pixels along a circle, turning through `sweep` radians, rotated by `angle`."""
    radius = length / sweep
    theta = np.linspace(-sweep / 2, sweep / 2, samples)
    return radius * (np.exp(1j * theta) - 1) * np.exp(1j * angle)


def _disk(size: int, radius: float, inner: float = 0.0, supersample: int = 4) -> np.ndarray:
    """Anti-aliased disk (or ring from `inner` to `radius`) centred on the canvas, summing to 1."""
    grid = (np.arange(size * supersample) + 0.5) / supersample - size / 2
    r2 = grid[None, :] ** 2 + grid[:, None] ** 2
    inside = ((r2 <= radius**2) & (r2 >= inner**2)).astype(np.float64)
    psf = inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))
    return psf / psf.sum()


def training_kernel(family: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """One kernel of a training family (TRAINING_FAMILIES), size x size (odd, >= 5)."""
    _check_size(size)
    reach = (size - 1) / 2 - 0.5  # the farthest a path may go from the centre and stay inside
    if family == "shake":
        low, high = SHAKE_LENGTHS[int(rng.integers(len(SHAKE_LENGTHS)))]
        length = max(1.0, rng.uniform(low, high) * (size - 1))
        return rasterise_path(_fit(shake_path(rng, length), reach), size)
    if family == "line":
        length = rng.uniform(1.0, 2 * reach)
        samples = max(2, int(length * _PATH_SAMPLES))
        return rasterise_path(_line_path(length, rng.uniform(0, np.pi), samples), size)
    if family == "arc":
        length = rng.uniform(3.0, 2.5 * reach)
        path = _arc_path(
            length, rng.uniform(0.5, 1.5) * np.pi, rng.uniform(0, 2 * np.pi), max(2, int(length * _PATH_SAMPLES))
        )
        return rasterise_path(_fit(path, reach), size)
    if family == "defocus":
        return _disk(size, rng.uniform(0.5, min(3.5, reach)))
    raise ValueError(f"unknown training kernel family {family!r}: choose one of {', '.join(TRAINING_FAMILIES)}")


def draw_training_kernel(rng: np.random.Generator, size: int) -> tuple[str, np.ndarray]:
    """(family, kernel): a family drawn by FAMILY_WEIGHTS, then a kernel of it."""
    family = TRAINING_FAMILIES[int(rng.choice(len(TRAINING_FAMILIES), p=FAMILY_WEIGHTS))]
    return family, training_kernel(family, rng, size)


def held_out_kernel(shape: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """One kernel of a held-out shape (HELD_OUT_SHAPES), size x size: for evaluation only, never trained on."""
    _check_size(size)
    reach = (size - 1) / 2 - 0.5
    if shape == "anisotropic_gaussian":
        # wider than a line, softer than a disk: sigmas of 3-4 and 1.2-2 pixels
        sigma_long, sigma_short = rng.uniform(3.0, 4.0), rng.uniform(1.2, 2.0)
        grid = np.arange(size) - (size - 1) / 2
        angle = rng.uniform(0, np.pi)
        u = grid[None, :] * math.cos(angle) + grid[:, None] * math.sin(angle)
        v = -grid[None, :] * math.sin(angle) + grid[:, None] * math.cos(angle)
        psf = np.exp(-0.5 * ((u / sigma_long) ** 2 + (v / sigma_short) ** 2))
        return psf / psf.sum()
    if shape == "ring_defocus":
        outer = min(rng.uniform(2.5, 5.0), reach + 0.5)
        return _disk(size, outer, inner=outer * rng.uniform(0.55, 0.75))
    if shape == "zigzag":
        segments = int(rng.integers(3, 5))
        heading, corners = rng.uniform(0, 2 * np.pi), [0j]
        for k in range(segments):
            # alternate left and right turns of 100-150 degrees: a sharp back-and-forth stroke
            if k:
                heading += (1 if k % 2 else -1) * math.radians(rng.uniform(100, 150))
            corners.append(corners[-1] + rng.uniform(0.6, 1.0) * np.exp(1j * heading))
        pieces = [np.linspace(a, b, 64, endpoint=False) for a, b in zip(corners[:-1], corners[1:])]
        path = np.concatenate(pieces + [np.asarray(corners[-1:])])
        # scale the unit-length strokes up to the canvas, then keep inside it
        centred = path - path.mean()
        far = max(np.abs(centred.real).max(), np.abs(centred.imag).max())
        return rasterise_path(centred * (reach * rng.uniform(0.7, 1.0) / far), size)
    if shape == "double_exposure":
        count = int(rng.integers(2, 4))
        weights = rng.uniform(1, 1.5, count)
        spots = rng.uniform(-1, 1, count) + 1j * rng.uniform(-1, 1, count)
        spots = spots - (weights * spots).sum() / weights.sum()
        far = max(np.abs(spots.real).max(), np.abs(spots.imag).max(), 1e-9)
        # spread over 6 or more pixels: a jump, not a short stroke
        return splat(spots * (max(3.0, reach * rng.uniform(0.5, 1.0)) / far), weights, size)
    raise ValueError(f"unknown held-out kernel shape {shape!r}: choose one of {', '.join(HELD_OUT_SHAPES)}")


def noise_sigma(rng: np.random.Generator, low: float = 0.0, high: float = 8.0, clean_share: float = 0.25) -> float:
    """Sigma (of 255) of a pair's Gaussian noise: exactly 0 with probability `clean_share`, else uniform
    in [low, high]. Noise-free pairs teach a model to leave a clean input's texture alone."""
    if not 0 <= low <= high <= 64:
        raise ValueError(f"noise sigma needs 0 <= low <= high <= 64 (of 255), got {low} and {high}")
    if not 0 <= clean_share <= 1:
        raise ValueError(f"clean share must be within [0, 1], got {clean_share}")
    if rng.random() < clean_share:
        return 0.0
    return float(rng.uniform(low, high))
