"""Reading the GOPRO_Large layout as shipped: `<root>/{train,test}/<scene>/{blur,blur_gamma,sharp}/<frame>.png`."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from golf_dist.data.formats import check_pixels
from golf_dist.errors import DataError

# Modes PIL turns into RGB without losing meaning (16-bit and float modes would be clipped).
_RGB_CONVERTIBLE = {"RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "1", "CMYK", "YCbCr"}

HOW_TO_GET_GOPRO = (
    "get GoPro: download GOPRO_Large from the GoPro deblurring dataset page (Nah et al., CC BY 4.0) "
    "and unpack it so that GOPRO_Large/train/<scene>/blur/*.png exists; "
    "or make the synthetic set in the same layout: python data_prep/synth_gopro.py --out GOPRO_Large"
)


@dataclass(frozen=True)
class Pair:
    """One blurred frame and its sharp twin; `frame` is the file stem (e.g. "000047")."""

    scene: str
    frame: str
    blur_path: Path
    sharp_path: Path


def _pngs(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in folder.iterdir() if p.suffix == ".png" and p.is_file()}


def scan_gopro(root: str | Path, split: str, blur_dir: str = "blur") -> list[Pair]:
    """All (blur, sharp) pairs of one split, sorted by (scene, frame); DataError on any gap in the layout."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"GoPro folder {root} does not exist; {HOW_TO_GET_GOPRO}")
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(
            f"{split_dir} does not exist: {root} is not in the GOPRO_Large layout "
            f"(expected {root}/{split}/<scene>/{blur_dir}/*.png); {HOW_TO_GET_GOPRO}"
        )
    pairs: list[Pair] = []
    scenes = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    for scene_dir in scenes:
        blur, sharp = scene_dir / blur_dir, scene_dir / "sharp"
        if not blur.is_dir():
            others = sorted(d for d in ("blur", "blur_gamma") if d != blur_dir and (scene_dir / d).is_dir())
            hint = f" (this scene has {', '.join(others)}: choose it with --blur-dir)" if others else ""
            raise DataError(
                f"{blur} is missing: every scene needs a {blur_dir}/ folder next to sharp/ "
                f"(GOPRO_Large ships both blur/ and blur_gamma/){hint}"
            )
        if not sharp.is_dir():
            raise DataError(f"{sharp} is missing: every scene needs a sharp/ folder next to {blur_dir}/")
        blurs, sharps = _pngs(blur), _pngs(sharp)
        lonely_blur, lonely_sharp = sorted(blurs.keys() - sharps.keys()), sorted(sharps.keys() - blurs.keys())
        if lonely_blur:
            frame = lonely_blur[0]
            raise DataError(
                f"{blurs[frame]} has no sharp twin {sharp / (frame + '.png')}: add it or remove the blur frame"
            )
        if lonely_sharp:
            frame = lonely_sharp[0]
            raise DataError(
                f"{sharps[frame]} has no blur twin {blur / (frame + '.png')}: add it or remove the sharp frame"
            )
        pairs.extend(Pair(scene_dir.name, f, blurs[f], sharps[f]) for f in sorted(blurs))
    if not pairs:
        raise DataError(
            f"{split_dir} contains no pairs (expected <scene>/{blur_dir}/*.png and <scene>/sharp/*.png); "
            f"{HOW_TO_GET_GOPRO}"
        )
    return pairs


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) of a source frame, decoded whole. Refused by name: no PNG, more than MAX_PIXELS,
    a mode without 8-bit RGB meaning, and transparency (the DALI decoder drops alpha where the PyTorch
    loader composites it, so a translucent frame would train differently per loader)."""
    translucent = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                check_pixels(*im.size, str(path))
                im.load()
                fmt, mode, size = im.format, im.mode, im.size
                if mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
                    translucent = im.convert("RGBA").getchannel("A").getextrema()[0] < 255
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DataError(f"{path} is too large to decode ({err}): replace or remove the pair") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise DataError(f"{path} cannot be decoded as an image ({err}): replace or remove the pair") from None
    if translucent:
        raise DataError(f"{path} has transparent pixels: save it as opaque RGB PNG, or remove the pair")
    if fmt != "PNG":
        raise DataError(f"{path} is a {fmt} file, not a PNG: convert it to PNG or remove the pair")
    if mode not in _RGB_CONVERTIBLE:
        raise DataError(f"{path} has PIL mode {mode}, which does not convert to 8-bit RGB: save it as RGB PNG")
    return size


def check_pair(pair: Pair) -> tuple[int, int]:
    """Decode both images fully; return (height, width), or DataError naming the bad file(s)."""
    bw, bh = _image_size(pair.blur_path)
    sw, sh = _image_size(pair.sharp_path)
    if (bw, bh) != (sw, sh):
        raise DataError(
            f"blur and sharp differ in size: {pair.blur_path} is {bw}x{bh}, "
            f"{pair.sharp_path} is {sw}x{sh} (width x height): they must be the same frame"
        )
    return bh, bw
