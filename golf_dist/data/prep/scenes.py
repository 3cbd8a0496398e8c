"""Procedural sharp images with natural-image statistics, for training content beyond a few photographs.

The core is the dead-leaves model as Achddou, Gousseau and Ladjal use it to train restoration networks
("Synthetic images as a regularity prior for image restoration neural networks", SSVM 2021): opaque
shapes dropped front to back until the canvas is covered, their sizes following a power law
p(r) ~ r^-3 between a few pixels and the canvas, which makes the image scale-invariant (a power
spectrum falling about as 1/f^2, like photographs) with occlusion edges at every scale. "VibrantLeaves"
(Achddou, Gousseau, Ladjal, Suesstrunk, arXiv 2504.10201) adds what plain leaves lack and networks
need: textures inside the leaves (sinusoids, biased sinusoids, fractal noise, smooth shading), varied
shapes, and a simple model of acquisition (a slight lens blur). Four kinds of scene (`SCENE_KINDS`):

- `dead_leaves`: flat-coloured disks, ellipses and rectangles;
- `textured_leaves`: the same shapes, each with its own texture and a second colour;
- `gradient`: a smooth, softly coloured field (sky, wall, shading) with a few large shapes on it;
- `edges`: man-made content: mostly axis-aligned rectangles, stripes and thin lines, sharp edges.

Every image is a pure function of the generator it is given: float32, H x W x 3, within [0, 1].
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import gaussian_filter

SCENE_KINDS = ("dead_leaves", "textured_leaves", "gradient", "edges")
KIND_WEIGHTS = (0.2, 0.45, 0.1, 0.25)
# p(r) ~ r^-ALPHA: 3 is the scale-invariant exponent of the dead-leaves model
ALPHA = 3.0
SHAPES = ("disk", "ellipse", "rectangle")
# Textures of a leaf: how its colour moves from its first colour towards its second
FLAT, SINE, BIASED_SINE, NOISE, SHADING = range(5)
_CHUNK = 256  # leaves drawn per round, between coverage checks


def _power_law(rng: np.random.Generator, n: int, low: float, high: float, alpha: float = ALPHA) -> np.ndarray:
    """n radii with density ~ r^-alpha on [low, high] (inverse of the cumulative distribution)."""
    a, b = low ** (1 - alpha), high ** (1 - alpha)
    return (a + rng.random(n) * (b - a)) ** (1 / (1 - alpha))


def _colours(rng: np.random.Generator, n: int) -> np.ndarray:
    """n RGB colours with photographs' bias: any hue, mostly low saturation, lightness spread over the range."""
    hue = rng.random(n)
    saturation = rng.beta(1.2, 2.5, n)
    value = rng.uniform(0.05, 1.0, n) ** 0.8
    # hue -> RGB on the colour wheel, then mixed with grey by (1 - saturation)
    wheel = np.clip(np.abs(((hue[:, None] * 6 + np.array([0, 4, 2])) % 6) - 3) - 1, 0, 1)
    return (value[:, None] * (1 - saturation[:, None] * (1 - wheel))).astype(np.float32)


def fractal_noise(rng: np.random.Generator, height: int, width: int, slope: float) -> np.ndarray:
    """Gaussian noise with a power spectrum ~ 1/f^slope, scaled to [0, 1] (float32)."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    radius = np.sqrt(fx**2 + fy**2)
    radius[0, 0] = 1.0
    spectrum = np.fft.rfft2(rng.standard_normal((height, width))) * radius ** (-slope / 2)
    spectrum[0, 0] = 0
    field = np.fft.irfft2(spectrum, s=(height, width))
    field -= field.min()
    return (field / max(field.max(), 1e-12)).astype(np.float32)


def leaf_labels(
    rng: np.random.Generator,
    height: int,
    width: int,
    *,
    shapes: tuple[str, ...] = SHAPES,
    r_min: float = 2.0,
    r_max: float | None = None,
    axis_aligned: float = 0.0,
    coverage: float = 0.998,
    max_leaves: int = 60000,
) -> np.ndarray:
    """Dead-leaves occlusion map: int32 H x W, each pixel the index of the front-most leaf covering it.

    Leaves fall front to back (a leaf shows only where no earlier one is), sizes from the power law,
    until `coverage` of the canvas is covered or `max_leaves` fell; the few pixels still uncovered
    then belong to one last leaf behind all others. `axis_aligned` is the share of leaves set square
    to the frame (man-made scenes).
    """
    if r_max is None:
        r_max = max(height, width) / 2
    if not 0 < r_min < r_max:
        raise ValueError(f"leaf radii need 0 < r_min < r_max, got {r_min} and {r_max}")
    labels = np.full((height, width), -1, dtype=np.int32)
    count = 0
    while count < max_leaves:
        radius = _power_law(rng, _CHUNK, r_min, r_max)
        cy, cx = rng.uniform(0, height, _CHUNK), rng.uniform(0, width, _CHUNK)
        kind = rng.integers(0, len(shapes), _CHUNK)
        aspect = rng.uniform(0.3, 1.0, _CHUNK)
        angle = np.where(
            rng.random(_CHUNK) < axis_aligned, rng.integers(0, 2, _CHUNK) * np.pi / 2, rng.uniform(0, np.pi, _CHUNK)
        )
        for i in range(_CHUNK):
            r = radius[i]
            y0, y1 = max(0, int(cy[i] - r)), min(height, int(cy[i] + r) + 2)
            x0, x1 = max(0, int(cx[i] - r)), min(width, int(cx[i] + r) + 2)
            if y0 >= y1 or x0 >= x1:
                continue
            window = labels[y0:y1, x0:x1]
            free = window < 0
            if not free.any():
                continue
            dy = (np.arange(y0, y1) + 0.5 - cy[i])[:, None]
            dx = (np.arange(x0, x1) + 0.5 - cx[i])[None, :]
            shape = shapes[kind[i]]
            if shape == "disk":
                inside = dy * dy + dx * dx <= r * r
            else:
                c, s = math.cos(angle[i]), math.sin(angle[i])
                u, v = (dx * c + dy * s) / r, (dy * c - dx * s) / (r * aspect[i])
                inside = (u * u + v * v <= 1) if shape == "ellipse" else (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8)
            window[inside & free] = count + i
        count += _CHUNK
        if (labels >= 0).mean() >= coverage:
            break
    labels[labels < 0] = count
    return labels


def _leaf_texture(rng: np.random.Generator, labels: np.ndarray, n: int, kinds: np.ndarray) -> np.ndarray:
    """Per pixel, how far its leaf's colour moves towards the leaf's second colour, within [0, 1]."""
    height, width = labels.shape
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    theta = rng.uniform(0, np.pi, n).astype(np.float32)
    # sinusoid frequencies log-uniform from 1/64 to 1/3 cycles per pixel
    freq = np.exp(rng.uniform(math.log(1 / 64), math.log(1 / 3), n)).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
    bias = np.exp(rng.uniform(math.log(0.25), math.log(4.0), n)).astype(np.float32)
    amount = rng.uniform(0.3, 1.0, n).astype(np.float32)
    noise = fractal_noise(rng, height, width, slope=rng.uniform(1.5, 2.5))
    c, s, f = np.cos(theta)[labels], np.sin(theta)[labels], freq[labels]
    along = xs * c + ys * s
    sine = 0.5 + 0.5 * np.sin(2 * np.pi * f * along + phase[labels])
    kind = kinds[labels]
    t = np.zeros((height, width), np.float32)
    t = np.where(kind == SINE, sine, t)
    t = np.where(kind == BIASED_SINE, sine ** bias[labels], t)
    t = np.where(kind == NOISE, noise, t)
    # shading: a ramp across the leaf, over about 1/f pixels
    t = np.where(kind == SHADING, np.clip(0.5 + 0.5 * np.sin(0.25 * np.pi * f * along + phase[labels]), 0, 1), t)
    return t * amount[labels]


def _compose(rng: np.random.Generator, labels: np.ndarray, texture_weights: tuple[float, ...]) -> np.ndarray:
    n = int(labels.max()) + 1
    first, second = _colours(rng, n), _colours(rng, n)
    kinds = rng.choice(len(texture_weights), n, p=texture_weights)
    t = _leaf_texture(rng, labels, n, kinds)[..., None]
    return first[labels] * (1 - t) + second[labels] * t


def _dead_leaves(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    labels = leaf_labels(rng, height, width, r_min=rng.uniform(1.5, 6.0))
    return _compose(rng, labels, (1, 0, 0, 0, 0))


def _textured_leaves(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    labels = leaf_labels(rng, height, width, r_min=rng.uniform(2.0, 8.0))
    return _compose(rng, labels, (0.2, 0.2, 0.2, 0.25, 0.15))


def _gradient(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth coloured field, plus a sparse layer of large shaded shapes over a share of it."""
    weights = fractal_noise(rng, height, width, slope=rng.uniform(3.0, 4.0))[..., None]
    low, high = _colours(rng, 2)
    field = low * (1 - weights) + high * weights
    detail = fractal_noise(rng, height, width, slope=2.0)[..., None] - 0.5
    field = field + rng.uniform(0.02, 0.08) * detail
    labels = leaf_labels(rng, height, width, r_min=max(height, width) / 40, coverage=1.0, max_leaves=_CHUNK)
    shapes = _compose(rng, labels, (0.3, 0, 0, 0.3, 0.4))
    # the shapes cover the field where a smooth mask is high: a partly open view
    mask = (fractal_noise(rng, height, width, slope=3.0) > rng.uniform(0.4, 0.7))[..., None]
    return np.where(mask, shapes, field)


def _edges(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    labels = leaf_labels(rng, height, width, shapes=("rectangle",), r_min=rng.uniform(2.0, 6.0), axis_aligned=0.8)
    image = _compose(rng, labels, (0.5, 0.2, 0.3, 0, 0))
    # thin dark or light lines (wires, frames, text strokes): 1 to 3 pixels wide
    ys, xs = np.mgrid[0:height, 0:width]
    for _ in range(int(rng.integers(3, 15))):
        vertical, thickness = rng.random() < 0.5, int(rng.integers(1, 4))
        at = int(rng.integers(0, width if vertical else height))
        start, stop = np.sort(rng.integers(0, height if vertical else width, 2))
        line = (
            ((xs >= at) & (xs < at + thickness) & (ys >= start) & (ys < stop))
            if vertical
            else ((ys >= at) & (ys < at + thickness) & (xs >= start) & (xs < stop))
        )
        image[line] = _colours(rng, 1)[0]
    return image


_MAKERS = {"dead_leaves": _dead_leaves, "textured_leaves": _textured_leaves, "gradient": _gradient, "edges": _edges}


def procedural_scene(rng: np.random.Generator, height: int, width: int, kind: str | None = None) -> np.ndarray:
    """One sharp procedural image, float32 H x W x 3 in [0, 1]; `kind` (SCENE_KINDS) drawn by KIND_WEIGHTS if None.

    Finished with a slight lens blur (Gaussian, sigma 0.3-0.7 pixels): the leaves' edges are otherwise
    aliased steps that no camera makes.
    """
    if height < 16 or width < 16:
        raise ValueError(f"a procedural scene needs at least 16x16 pixels, got {height}x{width}")
    if kind is None:
        kind = SCENE_KINDS[int(rng.choice(len(SCENE_KINDS), p=KIND_WEIGHTS))]
    if kind not in _MAKERS:
        raise ValueError(f"unknown scene kind {kind!r}: choose one of {', '.join(SCENE_KINDS)}")
    image = _MAKERS[kind](rng, height, width)
    image = gaussian_filter(image, sigma=(rng.uniform(0.3, 0.7),) * 2 + (0,), mode="reflect")
    return np.clip(image, 0, 1).astype(np.float32)
