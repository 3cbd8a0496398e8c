"""The image formats of shard members: all lossless, all decoding to the source PNG's 8-bit RGB pixels.

- png: the source PNG's bytes, unchanged (decoded on the CPU by every reader).
- jp2: lossless JPEG 2000 (reversible 5/3 wavelet, reversible colour transform, no quality layers),
  written by Pillow's OpenJPEG; nvJPEG2000 decodes it on the GPU through DALI, OpenJPEG on the CPU.
- npy: the raw HxWx3 uint8 array in NumPy's .npy format: no decode at all, so a reader can crop
  before it copies (the fastest path for DALI's CPU reader), at about 2.7 MB per 1280x720 frame.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from golf_dist.errors import DataError

FORMATS = ("png", "jp2", "npy")
# Extensions decode() understands: the shard formats plus JPEG (for images handed to deblur).
_PIL_EXTS = {"png", "jp2", "jpg", "jpeg"}


def encode(image: np.ndarray, fmt: str) -> bytes:
    """HxWx3 uint8 -> the bytes of a `fmt` member; decode(encode(x, f), f, ...) == x for every format."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 array, got {image.dtype} {image.shape}")
    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(image).save(buf, format="PNG")
    elif fmt == "jp2":
        # irreversible=False: the integer 5/3 wavelet (lossless); no quality_layers: no rate limit;
        # mct=1: the reversible colour transform (lossless too; decorrelates R, G, B of natural photos).
        Image.fromarray(image).save(buf, format="JPEG2000", irreversible=False, mct=1)
    elif fmt == "npy":
        np.save(buf, np.ascontiguousarray(image), allow_pickle=False)
    else:
        raise ValueError(f"unknown image format {fmt!r}: expected one of {', '.join(FORMATS)}")
    return buf.getvalue()


def decode(data: bytes, ext: str, where: str) -> np.ndarray:
    """Member bytes -> HxWx3 uint8. `ext` is the member's extension ("png", "blur.jp2", ...); any
    failure is a DataError naming `where` (the shard and sample, or the file)."""
    ext = ext.rsplit(".", 1)[-1].lower()
    if ext == "npy":
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise DataError(f"{where}: .npy image cannot be read ({err})") from None
        if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise DataError(
                f"{where}: .npy image is {getattr(array, 'dtype', type(array))} {getattr(array, 'shape', '')},"
                " not HxWx3 uint8"
            )
        return array
    if ext not in _PIL_EXTS:
        raise DataError(f"{where}: unknown image extension .{ext} (expected png, jp2 or npy)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DataError(f"{where}: image cannot be decoded ({err})") from None
