"""Deblur a user's own images with a trained F + G."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from golf_dist.data.formats import MAX_PIXELS, decode_pil
from golf_dist.data.torch_loader import to_tensor
from golf_dist.errors import ConfigError, DataError
from golf_dist.files import write_atomic
from golf_dist.inference.engine import (
    ENGINES,
    MIN_SIDE,
    AutoIterations,
    check_iterations,
    load_onnx,
    load_trained,
    restore,
    to_uint8,
)
from golf_dist.inference.ensemble import check_ensemble
from golf_dist.inference.tiling import check_tile_count, check_tiling
from golf_dist.perf.speed import FALLBACK_FILE, fallback_json, for_inference

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# No PNG or JPEG of MAX_PIXELS pixels is larger (16-bit RGBA stored uncompressed, plus room for metadata):
# a larger file is refused before it is read into memory. Pixels beyond the cap: decode_pil refuses.
MAX_INPUT_BYTES = 8 * MAX_PIXELS + (1 << 20)


def collect_inputs(inputs: list[str]) -> list[tuple[Path, Path]]:
    """(image, output name relative to OUTDIR) for every file given or found under a folder given: a file's
    name, or the folder's own name (resolved, so `..` and `.` name a real folder) then the path inside it;
    never a `..`, so every output lands inside OUTDIR."""
    found: list[tuple[Path, Path]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not images:
                raise DataError(f"folder {path} holds no PNG or JPEG images")
            prefix = Path(path.resolve().name)  # "" for the root folder: its images go straight into OUTDIR
            found += [(p, prefix / p.relative_to(path).with_suffix(".png")) for p in images]
        elif path.is_file():
            found.append((path, Path(path.with_suffix(".png").name)))
        else:
            raise DataError(f"input {path} does not exist")
    names = [rel for _, rel in found]
    if len(set(names)) != len(names):
        raise DataError("two inputs would be written to the same output name; pass them in separate runs")
    return found


def plan_outputs(files: list[tuple[Path, Path]], out_dir: Path, overwrite: bool = False) -> list[Path]:
    """Each input's output path, checked for all of them before anything is written: an output that is an
    input (the same file, through any path, link or hard link) is refused whatever `overwrite` says, an
    output outside OUTDIR (a symbolic link inside it) is refused, and an existing output needs `overwrite`.
    ConfigError (exit 2) naming the file and the flag."""
    out_root = out_dir.resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file, not a folder")
    inputs = {}
    for src, _ in files:
        st = src.stat()
        inputs[(st.st_dev, st.st_ino)] = src
    dests = []
    for src, rel in files:
        dest = out_dir / rel
        if not dest.resolve().is_relative_to(out_root):
            raise ConfigError(
                f"the output for {src} would be written to {dest.resolve()}, outside --out {out_dir} "
                "(a symbolic link inside it): pass another --out"
            )
        if dest.exists() or dest.is_symlink():
            st = dest.stat() if dest.exists() else None
            if st is not None and (st.st_dev, st.st_ino) in inputs:
                raise ConfigError(
                    f"the output for {src} would replace the input {inputs[(st.st_dev, st.st_ino)]} "
                    f"({dest}): deblur never overwrites its inputs; pass an --out outside the input "
                    "folders"
                )
            if not dest.is_file():
                raise ConfigError(f"the output for {src} would replace {dest}, which is not a file: pass another --out")
            if not overwrite:
                raise ConfigError(
                    f"{dest} exists (the output for {src}): pass --overwrite to replace it, or another --out"
                )
        dests.append(dest)
    return dests


def _image_size(src: Path) -> tuple[int, int]:
    """(width, height) from the image's header, nothing decoded: the plan's checks (tile count) run on every
    input before any work; a file Pillow cannot open is a DataError naming it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the pixel cap: decode_pil refuses it
            with Image.open(src) as img:
                return img.size
    except Exception as err:  # a hostile header can make a Pillow plugin raise anything (as decode_pil says)
        raise DataError(f"image {src}: image cannot be decoded ({type(err).__name__}: {err})") from None


def check_inputs(files: list[tuple[Path, Path]], tile: int | None, overlap: int) -> None:
    """Every input's size on disk, its sides and, with `tile`, the tiles it would take, before any work."""
    for src, _ in files:
        size = src.stat().st_size
        if size > MAX_INPUT_BYTES:
            raise DataError(
                f"image {src} is {size} bytes, more than any image of at most {MAX_PIXELS} pixels "
                f"takes ({MAX_INPUT_BYTES}): downscale it"
            )
        width, height = _image_size(src)
        if min(width, height) < MIN_SIDE:
            raise DataError(
                f"image {src} is {width}x{height} pixels; the networks' reflected borders need at least "
                f"{MIN_SIDE} pixels a side"
            )
        check_tile_count(height, width, tile, overlap, f"image {src}")


def deblur_files(
    output_dir: Path,
    inputs: list[str],
    out_dir: Path,
    iterations: int | AutoIterations = 3,
    device: str | None = None,
    tile: int | None = None,
    overlap: int = 32,
    ensemble: str = "x1",
    engine: str = "torch",
    overwrite: bool = False,
    speed_cfg=None,
    on_image: Callable[[Path, int], None] | None = None,
) -> list[Path]:
    """Run F then `iterations` G steps (AutoIterations: until each image's update is small, per image:
    golf_dist.inference.engine.restore) on every input image (whole, or on overlapping tiles of side `tile`:
    golf_dist.inference.tiling; averaged over flips and transposes with `ensemble`: golf_dist.inference.ensemble)
    with PyTorch on OUTPUT_DIR's safetensors or with ONNX Runtime on its f.onnx and g.onnx (`engine`); write PNGs
    under out_dir.
    The whole plan (flags, inputs, output paths: plan_outputs) is checked before the model loads, so a refusal
    writes nothing; an existing output is replaced only with `overwrite`, an input never. `on_image(path, used)`
    is called after each image is written, with the G iterations it took."""
    if not isinstance(iterations, AutoIterations):
        check_iterations(iterations)
    check_tiling(tile, overlap)
    check_ensemble(ensemble)
    if engine not in ENGINES:
        raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    files = collect_inputs(inputs)
    dests = plan_outputs(files, Path(out_dir), overwrite)
    check_inputs(files, tile, overlap)
    if engine == "torch":
        f, g = load_trained(Path(output_dir), dev, iterations)

        # the speed layer (golf_dist/perf/speed.py; speed_cfg None: its defaults, all off on a CPU); what its first-call
        # check turns off is recorded in out_dir
        def record(fallbacks: list[dict[str, str]]) -> None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            write_atomic(Path(out_dir) / FALLBACK_FILE, fallback_json(fallbacks))

        f, g = for_inference(f, g, speed_cfg, dev, on_fallback=record)
    else:
        f, g = load_onnx(Path(output_dir), iterations)
    written = []
    for (src, _), dest in tqdm(list(zip(files, dests)), desc="deblur", disable=len(files) < 2):
        image = decode_pil(src.read_bytes(), f"image {src}")
        with torch.no_grad():
            blur = to_tensor(image).unsqueeze(0).to(dev)
            restored = restore(f, g, blur, iterations, tile, overlap, ensemble)
        png = io.BytesIO()
        Image.fromarray(to_uint8(restored.iterates[-1][0])).save(png, format="PNG")
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(dest, png.getvalue())
        written.append(dest)
        if on_image is not None:
            on_image(dest, int(restored.used[0]))
    return written
