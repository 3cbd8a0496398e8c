"""golf-evaluate --held-out: a trained F + G on photographs and blur it never trained on.

The cases: each photograph of golf_dist/data/prep/held_out.py (camera.png, brick.png, grass.png, gravel.png,
coins.png, moon.png from scikit-image, grace_hopper.jpg from matplotlib; or the files --held-out-photographs
names) is cropped to its central crop x crop pixels (a side shorter than `crop` is kept whole: coins.png is
303 pixels high), then blurred with one kernel of each held-out shape of golf_dist/data/prep/kernels.py
(anisotropic_gaussian, ring_defocus, zigzag, double_exposure: shapes the training family never draws) and
given Gaussian noise of each sigma asked for (of 255), rounded to 8 bits as a photograph is.

Deterministic per seed, and a subset of shapes or noise levels leaves every other case as it was:
- the kernel of shape s: held_out_kernel(s, numpy.random.default_rng([seed, HELD_OUT_SHAPES.index(s)]),
  KERNEL_SIZE), the same for every photograph;
- the blur: the kernel convolved with the photograph around the crop (its real surroundings, reflected where
  the photograph ends), "valid", in float32, as the synthetic pairs are made;
- the noise of photograph p (its index in the list), shape s and sigma: float32 standard normal draws of
  default_rng([seed, p, HELD_OUT_SHAPES.index(s), round(1000 * sigma)]) times sigma, then rint, clip to 0..255.

PSNR of the blurred input and of the output (F, then each G iteration) against the sharp crop, with data range
1 on clamped output like the test split's, but away from a BORDER-pixel border: the blur of the crop's edge
reads reflected pixels, and the networks pad by reflection. scikit-image's clock_motion.png (real camera-motion
blur, no sharp original) is restored as a picture before and after, with no PSNR.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from golf_dist.data.formats import decode_pil
from golf_dist.data.prep.held_out import held_out_photographs, real_blur_photograph
from golf_dist.data.prep.kernels import HELD_OUT_SHAPES, held_out_kernel
from golf_dist.errors import ConfigError, DataError
from golf_dist.evaluation import plots
from golf_dist.files import write_atomic
from golf_dist.inference.engine import load_trained, restore_iterates, to_uint8
from golf_dist.metrics import psnr
from golf_dist.perf.speed import FALLBACK_FILE, fallback_json, fallback_tag, fallbacks_of, for_inference

BORDER = 16  # pixels left out of the PSNR on each side: more than the kernels' reach (8) and the networks' padding
DEFAULT_CROP = 384
DEFAULT_NOISE = (0.0, 5.0)  # sigma of 255: a clean photograph and a camera's noise at a moderate ISO
KERNEL_SIZE = 17  # the canvas the demo's training kernels are drawn on: wide_kernel_size(256, 448)
MIN_CROP = 2 * BORDER + KERNEL_SIZE  # so that the PSNR sees at least a kernel's width of pixels
MAX_NOISE = 64.0  # the bound the synthetic data's --noise has
RESULT_FILE = "held_out.json"


@dataclass(frozen=True)
class HeldOutOptions:
    """What --held-out evaluates: crop side, kernel shapes, noise sigmas (of 255), seed, photographs (None:
    held_out.py's seven)."""

    crop: int = DEFAULT_CROP
    kernels: tuple[str, ...] = HELD_OUT_SHAPES
    noise: tuple[float, ...] = DEFAULT_NOISE
    seed: int = 0
    photographs: tuple[str, ...] | None = None


def parse_options(
    crop: int | None, kernels: str | None, noise: str | None, seed: int | None, photographs: list[str] | None
) -> HeldOutOptions:
    """The --held-out-* flags as HeldOutOptions (None: the default); a bad value is a ConfigError naming its flag."""
    options = HeldOutOptions()
    if crop is not None:
        if crop < MIN_CROP:
            raise ConfigError(
                f"--held-out-crop must be at least {MIN_CROP} (a {BORDER}-pixel border on each side is left out "
                f"of the PSNR, and a {KERNEL_SIZE}-pixel kernel's width must remain), got {crop}"
            )
        options = HeldOutOptions(crop=crop)
    shapes = options.kernels
    if kernels is not None:
        shapes = tuple(k.strip() for k in kernels.split(",") if k.strip())
        unknown = [k for k in shapes if k not in HELD_OUT_SHAPES]
        if unknown or not shapes or len(set(shapes)) != len(shapes):
            named = f" (unknown: {', '.join(unknown)})" if unknown else ""
            raise ConfigError(
                f"--held-out-kernels takes distinct held-out kernel shapes, comma-separated, of "
                f"{', '.join(HELD_OUT_SHAPES)}; got {kernels!r}{named}"
            )
    sigmas = options.noise
    if noise is not None:
        try:
            sigmas = tuple(float(s) for s in noise.split(","))
        except ValueError:
            sigmas = ()
        if not sigmas or any(not 0 <= s <= MAX_NOISE for s in sigmas) or len(set(sigmas)) != len(sigmas):
            raise ConfigError(
                f"--held-out-noise takes distinct noise sigmas (of 255), comma-separated, each from 0 to "
                f"{MAX_NOISE:g}, e.g. 0,5; got {noise!r}"
            )
    if seed is not None and seed < 0:
        raise ConfigError(f"--held-out-seed must be a non-negative integer, got {seed}")
    chosen = tuple(photographs) if photographs else None
    return HeldOutOptions(options.crop, shapes, sigmas, options.seed if seed is None else seed, chosen)


def _read_photograph(path: Path) -> np.ndarray:
    where = f"held-out photograph {path}"
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{where} cannot be read ({err.strerror or err})") from None
    return decode_pil(data, where)


def load_photographs(options: HeldOutOptions) -> list[tuple[str, np.ndarray]]:
    """(name, HxWx3 uint8) of each photograph: held_out.py's, or the files of options.photographs; one that does
    not load is a DataError naming it, one smaller than the crop in both sides a ConfigError naming it."""
    if options.photographs is None:
        paths = [(p.name, p.path) for p in held_out_photographs()]
    else:
        paths = [(Path(p).name, Path(p)) for p in options.photographs]
        if len({name for name, _ in paths}) != len(paths):
            raise ConfigError(
                "--held-out-photographs names two files of the same name: the table could not tell them apart"
            )
    loaded = []
    for name, path in paths:
        image = _read_photograph(path)
        height, width = image.shape[:2]
        if options.crop > max(height, width):
            raise ConfigError(
                f"--held-out-crop {options.crop} is larger than held-out photograph {path} ({width}x{height} "
                f"pixels): give a crop of at most {max(height, width)}"
            )
        if min(height, width) < MIN_CROP:
            raise DataError(
                f"held-out photograph {path} is {width}x{height} pixels; the evaluation needs at least "
                f"{MIN_CROP} a side"
            )
        loaded.append((name, image))
    return loaded


def kernels_of(options: HeldOutOptions) -> dict[str, np.ndarray]:
    """Each shape's kernel (the module doc says how it is drawn)."""
    return {
        shape: held_out_kernel(shape, np.random.default_rng([options.seed, HELD_OUT_SHAPES.index(shape)]), KERNEL_SIZE)
        for shape in options.kernels
    }


def crop_box(height: int, width: int, crop: int) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width): the central crop x crop window, a shorter side kept whole."""
    crop_h, crop_w = min(crop, height), min(crop, width)
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def blurred_crop(
    image: np.ndarray, box: tuple[int, int, int, int], kernel: np.ndarray, sigma: float, rng: np.random.Generator
) -> np.ndarray:
    """The crop `box` of `image` blurred with `kernel` (over its surroundings, reflected past the edges), with
    Gaussian noise of `sigma` (of 255), as uint8."""
    from scipy.signal import fftconvolve

    top, left, crop_h, crop_w = box
    reach = kernel.shape[0] // 2
    padded = np.pad(image, ((reach, reach), (reach, reach), (0, 0)), mode="reflect")
    window = padded[top : top + crop_h + 2 * reach, left : left + crop_w + 2 * reach].astype(np.float32)
    blurred = fftconvolve(window, kernel.astype(np.float32)[:, :, None], mode="valid", axes=(0, 1))
    blurred += rng.standard_normal(blurred.shape, dtype=np.float32) * np.float32(sigma)
    return np.rint(np.clip(blurred, 0, 255)).astype(np.uint8)


def _tensor(image: np.ndarray, device: torch.device) -> torch.Tensor:
    # a copy: a decoded photograph's array may be read-only, which torch.from_numpy warns about
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255).unsqueeze(0).to(device)


def interior_psnr(image: torch.Tensor, sharp: torch.Tensor) -> float:
    """PSNR (dB, data range 1, clamped) of two 1x3xHxW images away from a BORDER-pixel border."""
    inner = (..., slice(BORDER, -BORDER), slice(BORDER, -BORDER))
    return float(psnr(image[inner], sharp[inner])[0])


def case_inputs(photographs, kernels, options: HeldOutOptions, device):
    """Every photograph x kernel x noise case, in photograph, kernel, noise order: (its record: photograph, kernel,
    noise, size), its blurred input and its sharp crop, both 1x3xHxW in [0, 1] on `device`."""
    for p, (name, image) in enumerate(photographs):
        box = crop_box(*image.shape[:2], options.crop)
        top, left, crop_h, crop_w = box
        sharp = _tensor(image[top : top + crop_h, left : left + crop_w], device)
        for shape, kernel in kernels.items():
            for sigma in options.noise:
                rng = np.random.default_rng([options.seed, p, HELD_OUT_SHAPES.index(shape), round(1000 * sigma)])
                blur = _tensor(blurred_crop(image, box, kernel, sigma, rng), device)
                yield {"photograph": name, "kernel": shape, "noise": sigma, "size": [crop_h, crop_w]}, blur, sharp


def run_cases(f, g, photographs, kernels, options: HeldOutOptions, iterations: int, device, restore_kw) -> list[dict]:
    """Every case through F + G: a record each (PSNR in, after F and each G iteration, out, gain)."""
    cases = []
    for case, blur, sharp in case_inputs(photographs, kernels, options, device):
        with torch.no_grad():
            iterates = restore_iterates(f, g, blur, iterations, **restore_kw)
        by_iteration = [interior_psnr(x, sharp) for x in iterates]
        input_psnr = interior_psnr(blur, sharp)
        cases.append(
            {
                **case,
                "input_psnr": input_psnr,
                "psnr": by_iteration[-1],
                "gain": by_iteration[-1] - input_psnr,
                "psnr_per_iteration": by_iteration,
            }
        )
    return cases


@torch.no_grad()
def scaled_correction_gains(restore, photographs, kernels, options: HeldOutOptions, scales, device) -> list[dict]:
    """Per case, the gain over the blurred input y of y + s * (restore(y) - y) for each scale s: whether the
    restoration's correction points the right way (the gain rising with s up to 1) or the wrong way (falling
    from s = 0, where it is 0). `restore`: 1x3xHxW -> 1x3xHxW."""
    cases = []
    for case, blur, sharp in case_inputs(photographs, kernels, options, device):
        correction = restore(blur) - blur
        base = interior_psnr(blur, sharp)
        gains = [interior_psnr(blur + s * correction, sharp) - base for s in scales]
        cases.append({**case, "input_psnr": base, "gains": gains})
    return cases


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def summarise(cases: list[dict]) -> dict[str, Any]:
    """Mean gain (all, noise-free, noisy), the worst case, the count improved, the mean gain per kernel shape and
    the mean PSNR after F and each G iteration. A mean over no case (no noise-free level asked for) is None."""
    worst = min(cases, key=lambda c: c["gain"])
    kernels = list(dict.fromkeys(c["kernel"] for c in cases))
    return {
        "cases": len(cases),
        "improved": sum(c["gain"] > 0 for c in cases),
        "mean_gain": _mean([c["gain"] for c in cases]),
        "clean_mean_gain": _mean([c["gain"] for c in cases if c["noise"] == 0]),
        "noisy_mean_gain": _mean([c["gain"] for c in cases if c["noise"] > 0]),
        "worst": {k: worst[k] for k in ("photograph", "kernel", "noise", "gain")},
        "gain_by_kernel": {k: _mean([c["gain"] for c in cases if c["kernel"] == k]) for k in kernels},
        "input_psnr": _mean([c["input_psnr"] for c in cases]),
        "psnr": _mean([c["psnr"] for c in cases]),
        "psnr_per_iteration": np.mean([c["psnr_per_iteration"] for c in cases], axis=0).tolist(),
    }


def summarise_scales(cases: list[dict], scales) -> list[dict[str, Any]]:
    """Per scale of scaled_correction_gains' cases: the mean gain (all, noise-free), the count improved and the
    worst case."""
    rows = []
    for i, scale in enumerate(scales):
        gains = [c["gains"][i] for c in cases]
        worst = cases[int(np.argmin(gains))]
        rows.append(
            {
                "scale": scale,
                "mean_gain": _mean(gains),
                "clean_mean_gain": _mean([c["gains"][i] for c in cases if c["noise"] == 0]),
                "improved": sum(g > 0 for g in gains),
                "worst": {**{k: worst[k] for k in ("photograph", "kernel", "noise")}, "gain": min(gains)},
            }
        )
    return rows


def _restore_real_blur(f, g, iterations: int, device, restore_kw) -> tuple[str, np.ndarray, np.ndarray]:
    photo = real_blur_photograph()
    image = _read_photograph(photo.path)
    with torch.no_grad():
        restored = restore_iterates(f, g, _tensor(image, device), iterations, **restore_kw)[-1]
    return photo.name, image, to_uint8(restored[0])


def _figures(result: dict, real_blur, output_dir: Path, iterations: int) -> dict[str, Path]:
    name, before, after = real_blur
    return {
        "held_out_gain": plots.gain_map(
            result["cases"],
            output_dir / "held_out_gain.png",
            title=f"{output_dir.name}, F + {iterations} G: PSNR gain on held-out photographs (dB, "
            f"{BORDER}-pixel border left out)",
        ),
        "held_out_real_blur": plots.before_after(
            before,
            after,
            output_dir / "held_out_clock_motion.png",
            title=f"{name}: real camera-motion blur (no sharp original, no PSNR) and F + {iterations} G",
        ),
    }


def _log(tracker, result: dict, figures: dict[str, Path], table: str) -> None:
    summary = result["summary"]
    metrics = {
        k: summary[k]
        for k in ("mean_gain", "clean_mean_gain", "noisy_mean_gain", "improved", "cases", "input_psnr", "psnr")
        if summary[k] is not None
    }
    metrics["worst_gain"] = summary["worst"]["gain"]
    tracker.log_metrics({f"held_out_{k}": v for k, v in metrics.items()}, step=0)
    for i, value in enumerate(summary["psnr_per_iteration"]):
        tracker.log_metrics({"held_out_psnr_by_iteration": value}, step=i)
    for path in figures.values():
        tracker.log_artifact(path, "figures")
    tracker.log_text(table, "held_out_cases.txt")


def run_held_out(
    output_dir: Path,
    iterations: int,
    tracking_cfg,
    options: HeldOutOptions,
    speed_cfg=None,
    tile: int | None = None,
    overlap: int = 32,
    ensemble: str = "x1",
) -> dict[str, Any] | None:
    """The command line's work: every case of `options` and clock_motion.png through F + G of `output_dir`;
    RESULT_FILE and the figures there, an MLflow run of its own (tag golf.stage=held-out); the result on rank 0
    (the cases are few: one process does them all)."""
    from accelerate import Accelerator

    from golf_dist.tracking import Tracker

    accelerator = Accelerator()
    if not accelerator.is_main_process:
        return None
    output_dir = Path(output_dir)
    photographs = load_photographs(options)  # every input checked before the networks load
    f, g = load_trained(output_dir, accelerator.device, iterations)
    f, g = for_inference(
        f,
        g,
        speed_cfg,
        accelerator.device,
        on_fallback=lambda found: write_atomic(output_dir / f"held_out_{FALLBACK_FILE}", fallback_json(found)),
    )
    restore_kw = {"tile": tile, "overlap": overlap, "ensemble": ensemble}
    start = time.perf_counter()
    kernels = kernels_of(options)
    cases = run_cases(f, g, photographs, kernels, options, iterations, accelerator.device, restore_kw)
    real_blur = _restore_real_blur(f, g, iterations, accelerator.device, restore_kw)
    result: dict[str, Any] = {
        "summary": summarise(cases),
        "cases": cases,
        "options": {**asdict(options), "border": BORDER, "kernel_size": KERNEL_SIZE},
        "kernels": {k: v.tolist() for k, v in kernels.items()},
        "iterations": iterations,
        "tile": tile,
        "ensemble": ensemble,
        "seconds": time.perf_counter() - start,
    }
    figures = _figures(result, real_blur, output_dir, iterations)
    result["figures"] = {k: str(v) for k, v in figures.items()}
    fallbacks = fallbacks_of(f, g)
    if fallbacks:
        result["speed_fallback"] = fallbacks
    tracker = Tracker(True, tracking_cfg.uri, tracking_cfg.experiment)
    tags = {"golf.stage": "held-out", **({"speed_fallback": fallback_tag(fallbacks)} if fallbacks else {})}
    tracker.start(run_name=f"held-out-{output_dir.name}", tags=tags)
    tracker.log_params(
        {
            "output_dir": str(output_dir.resolve()),
            "iterations": iterations,
            "photographs": ",".join(name for name, _ in photographs),
            "crop": options.crop,
            "kernels": ",".join(options.kernels),
            "noise": ",".join(f"{n:g}" for n in options.noise),
            "seed": options.seed,
            "border": BORDER,
            "kernel_size": KERNEL_SIZE,
            "tile": tile or "whole",
            "ensemble": ensemble,
        }
    )
    _log(tracker, result, figures, format_table(result))
    tracker.end()
    result["mlflow_run_id"] = tracker.run_id
    write_atomic(output_dir / RESULT_FILE, json.dumps(result, indent=2, sort_keys=True).encode())
    result["figures"]["json"] = str(output_dir / RESULT_FILE)
    return result


def format_table(result: dict) -> str:
    """One line per case: photograph, kernel, noise, crop size, PSNR in and out, gain."""
    lines = [
        f"PSNR of held-out photographs against their sharp crop, away from a {BORDER}-pixel border "
        f"(F + {result['iterations']} G):",
        f"{'photograph':<18} {'kernel':<21} {'noise':>5} {'size':>9} {'PSNR in':>8} {'PSNR out':>9} {'gain':>7}",
    ]
    for c in result["cases"]:
        size = f"{c['size'][1]}x{c['size'][0]}"
        lines.append(
            f"{c['photograph']:<18} {c['kernel']:<21} {c['noise']:>5g} {size:>9} {c['input_psnr']:>8.2f} "
            f"{c['psnr']:>9.2f} {c['gain']:>+7.2f}"
        )
    return "\n".join(lines) + "\n"


def summary_lines(result: dict) -> list[str]:
    """The summary, every line starting with 'held-out ' (launch/quickstart.sh prints these)."""
    s = result["summary"]

    def db(value: float | None) -> str:
        return "none asked for" if value is None else f"{value:+.2f} dB"

    worst = s["worst"]
    noisy = sorted({c["noise"] for c in result["cases"] if c["noise"] > 0})
    return [
        f"held-out photographs: {s['cases']} cases, {s['improved']} improved; mean gain {db(s['mean_gain'])} "
        f"(PSNR {s['input_psnr']:.2f} -> {s['psnr']:.2f} dB, {BORDER}-pixel border left out)",
        f"held-out noise-free inputs: {db(s['clean_mean_gain'])}; noisy inputs (sigma "
        f"{', '.join(f'{n:g}' for n in noisy) or '-'} of 255): {db(s['noisy_mean_gain'])}",
        f"held-out worst case: {worst['photograph']}, {worst['kernel']}, noise {worst['noise']:g}: "
        f"{worst['gain']:+.2f} dB",
        "held-out gain by kernel: " + ", ".join(f"{k} {v:+.2f} dB" for k, v in s["gain_by_kernel"].items()),
    ]


def print_held_out(result: dict) -> None:
    """The table, the summary, the figures, then the result as one JSON object on the last line."""
    print(format_table(result) + "\n".join(summary_lines(result)), flush=True)
    print("figures: " + ", ".join(result["figures"].values()), flush=True)
    print(json.dumps(result, sort_keys=True), flush=True)
