"""Deblur a user's own images with a trained F + G."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from golf_dist.data.formats import MAX_PIXELS, decode_pil
from golf_dist.data.loader import to_tensor
from golf_dist.errors import ConfigError, DataError
from golf_dist.ensemble import check_ensemble
from golf_dist.evaluate import load_trained
from golf_dist.inference import ENGINES, MIN_SIDE, load_onnx, restore_iterates, to_uint8
from golf_dist.data.storage import write_atomic
from golf_dist.speed import FALLBACK_FILE, fallback_json, for_inference
from golf_dist.tiling import check_tiling

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# No PNG or JPEG of MAX_PIXELS pixels is larger (16-bit RGBA stored uncompressed, plus room for metadata):
# a larger file is refused before it is read into memory. Pixels beyond the cap: decode_pil refuses.
MAX_INPUT_BYTES = 8 * MAX_PIXELS + (1 << 20)


def collect_inputs(inputs: list[str]) -> list[tuple[Path, Path]]:
    """(image, output name relative to OUTDIR) for every file given or found under a folder given."""
    found: list[tuple[Path, Path]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not images:
                raise DataError(f"folder {path} holds no PNG or JPEG images")
            found += [(p, Path(path.name) / p.relative_to(path).with_suffix(".png")) for p in images]
        elif path.is_file():
            found.append((path, Path(path.with_suffix(".png").name)))
        else:
            raise DataError(f"input {path} does not exist")
    names = [rel for _, rel in found]
    if len(set(names)) != len(names):
        raise DataError("two inputs would be written to the same output name; pass them in separate runs")
    return found


def deblur_files(output_dir: Path, inputs: list[str], out_dir: Path, iterations: int = 3, device: str | None = None,
                 tile: int | None = None, overlap: int = 32, ensemble: str = "x1", engine: str = "torch",
                 speed_cfg=None) -> list[Path]:
    """Run F then `iterations` G steps on every input image (whole, or on overlapping tiles of side `tile`:
    golf_dist.tiling; averaged over flips and transposes with `ensemble`: golf_dist.ensemble) with PyTorch on
    OUTPUT_DIR's safetensors or with ONNX Runtime on its f.onnx and g.onnx (`engine`); write PNGs under out_dir."""
    check_tiling(tile, overlap)
    check_ensemble(ensemble)
    if engine not in ENGINES:
        raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    files = collect_inputs(inputs)
    if engine == "torch":
        f, g = load_trained(Path(output_dir), dev, iterations)
        # the speed layer (golf_dist/speed.py; speed_cfg None: its defaults, all off on a CPU); what its first-call
        # check turns off is recorded in out_dir
        def record(fallbacks: list[dict[str, str]]) -> None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            write_atomic(Path(out_dir) / FALLBACK_FILE, fallback_json(fallbacks))

        f, g = for_inference(f, g, speed_cfg, dev, on_fallback=record)
    else:
        f, g = load_onnx(Path(output_dir), iterations)
    written = []
    for src, rel in tqdm(files, desc="deblur", disable=len(files) < 2):
        size = src.stat().st_size
        if size > MAX_INPUT_BYTES:
            raise DataError(f"image {src} is {size} bytes, more than any image of at most {MAX_PIXELS} pixels "
                            f"takes ({MAX_INPUT_BYTES}): downscale it")
        image = decode_pil(src.read_bytes(), f"image {src}")
        if min(image.shape[:2]) < MIN_SIDE:
            raise DataError(f"image {src} is {image.shape[1]}x{image.shape[0]} pixels; the networks' reflected "
                            f"borders need at least {MIN_SIDE} pixels a side")
        with torch.no_grad():
            blur = to_tensor(image).unsqueeze(0).to(dev)
            restored = restore_iterates(f, g, blur, iterations, tile, overlap, ensemble)[-1]
        dest = out_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        Image.fromarray(to_uint8(restored[0])).save(tmp, format="PNG")
        tmp.replace(dest)
        written.append(dest)
    return written
