"""The image formats of shard members: all lossless, all decoding to the source PNG's 8-bit RGB pixels.

- png: the source PNG's bytes, unchanged (decoded on the CPU by every reader).
- jp2: lossless JPEG 2000 (reversible 5/3 wavelet, reversible colour transform, no quality layers),
  written by Pillow's OpenJPEG; nvJPEG2000 decodes it on the GPU through DALI, OpenJPEG on the CPU.
- npy: the raw HxWx3 uint8 array in NumPy's .npy format: no decode at all, so a reader can crop
  before it copies (the fastest path for DALI's CPU reader), at about 2.7 MB per 1280x720 frame.

Decoding treats every input as hostile (shards from a bucket, images handed to deblur): an image of more
than MAX_PIXELS pixels is refused before its pixels are decoded (Pillow's decompression-bomb limit is
set to it too), an .npy header is checked against the member's byte size before anything is allocated,
and any failure is a DataError naming the sample or file. Odd modes: 16-bit greyscale keeps its high
byte (v >> 8, the scaling Pillow applies to 16-bit RGB PNGs; a plain convert would clip it to white);
an alpha channel (or a PNG transparency key) is composited over black explicitly, so opaque pixels keep
their values and hidden colours under transparent ones never reach training; float and 32-bit modes
are refused by name.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from golf_dist.errors import DataError

FORMATS = ("png", "jp2", "npy")
# What data_prep/shard_gopro.py writes when not told (docs/data.md has the measurements): the training split
# as npy, the fastest to feed to a GPU (no decode; DALI crops before it copies; about 2,500 pairs/s on a
# 16-core H100 machine against 137 for PNG) at about twice PNG's disk; the test split as PNG, which
# evaluation reads once per frame, so the compact format costs nothing there.
DEFAULT_TRAIN_FORMAT = "npy"
DEFAULT_TEST_FORMAT = "png"
# Extensions decode() understands: the shard formats plus JPEG (for images handed to deblur).
_PIL_EXTS = {"png", "jp2", "jpg", "jpeg"}
# The most pixels one image may have: 16 GoPro frames (a 4K or 12-megapixel photo fits); beyond it the
# image is refused before it is decoded (a small file can claim a huge size: a decompression bomb).
MAX_PIXELS = 4 * 1280 * 720 * 4
Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # Pillow warns above it and raises above twice it: both refused below
# The most bytes a PNG or JPEG 2000 member may hold for its size (.npy members: exactly header + pixels):
# MEMBER_BYTES_RATIO times the frame's 8-bit RGB bytes (a 16-bit RGB PNG of noise, deflate's and the chunks'
# overhead included, stays under 2.1x) plus MEMBER_BYTES_SLACK for headers, colour profiles and metadata.
# Beyond it the member hides something else (padding, appended data) that every loader worker would read whole.
MEMBER_BYTES_RATIO = 4
MEMBER_BYTES_SLACK = 1 << 20
_NPY_MAX_HEADER = 4096  # NumPy writes ~128 bytes for an image; its own limit is 10000
_RGB_MODES = {"RGB", "RGBX", "L", "P", "1", "CMYK", "YCbCr"}  # convert to RGB keeping their meaning
ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_16BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


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


def npy_header(data: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, offset of the data) from the start of .npy bytes, by NumPy's own
    header parser; ValueError naming what is wrong (no magic, a cut, oversized or malformed header)."""
    fp = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(fp)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(fp, max_header_size=_NPY_MAX_HEADER)
    except ValueError as err:
        raise ValueError(str(err) or "a malformed .npy header") from None
    except Exception as err:  # a hostile header can make the parser raise anything (struct, Syntax, Memory...)
        raise ValueError(f"a malformed .npy header ({type(err).__name__}: {err})") from None
    if any(d < 0 for d in shape):
        raise ValueError(f"a negative dimension in shape {shape}")
    return tuple(shape), bool(fortran), dtype, fp.tell()


def _decode_npy(data: bytes, where: str) -> np.ndarray:
    try:
        shape, fortran, dtype, offset = npy_header(data)
    except ValueError as err:
        raise DataError(f"{where}: .npy image cannot be read ({err})") from None
    if dtype.hasobject:
        raise DataError(f"{where}: .npy image cannot be read (an object array, which could run code: refused)")
    if dtype != np.uint8 or len(shape) != 3 or shape[2] != 3:
        raise DataError(f"{where}: .npy image is {dtype} {shape}, not HxWx3 uint8")
    check_pixels(shape[1], shape[0], where)
    need, have = math.prod(shape), len(data) - offset
    if have != need:  # before np.load, which allocates what the header claims
        raise DataError(
            f"{where}: .npy header claims shape {shape} ({need} bytes of pixels), the member holds {have}: "
            "truncated or forged"
        )
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"{where}: .npy image cannot be read ({err})") from None


def check_pixels(width: int, height: int, where: str) -> None:
    """DataError naming `where` for an image of more than MAX_PIXELS pixels (checked from its header)."""
    if width * height > MAX_PIXELS:
        raise DataError(
            f"{where}: image of {width}x{height} = {width * height} pixels, more than the {MAX_PIXELS} "
            f"(golf_dist.data.formats.MAX_PIXELS) decoded here: a decompression bomb or no video frame; downscale it"
        )


def max_member_bytes(height: int, width: int) -> int:
    """The most bytes an encoded (PNG, JPEG 2000) image of `height` x `width` may take: see MEMBER_BYTES_RATIO."""
    return MEMBER_BYTES_RATIO * height * width * 3 + MEMBER_BYTES_SLACK


def _to_rgb(img: Image.Image, where: str) -> np.ndarray:
    """A loaded image -> HxWx3 uint8: 16-bit greyscale scaled, alpha composited over black (module doc)."""
    mode = img.mode
    if mode in _16BIT_MODES or (mode == "I" and img.format == "PNG"):  # a 16-bit greyscale PNG
        grey = (np.asarray(img).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode in ALPHA_MODES or (mode in _RGB_MODES and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.uint16)
        return ((rgba[..., :3] * rgba[..., 3:] + 127) // 255).astype(np.uint8)
    if mode not in _RGB_MODES:
        raise DataError(
            f"{where}: image has Pillow mode {mode} (float or 32-bit samples), which has no 8-bit RGB meaning "
            "here: save it as 8-bit RGB"
        )
    return np.asarray(img.convert("RGB"))


def decode_pil(data: bytes, where: str) -> np.ndarray:
    """Image bytes Pillow reads (PNG, JPEG, JPEG 2000, ...) -> HxWx3 uint8; anything wrong, a too large
    image included, is a DataError naming `where`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                check_pixels(*img.size, where)
                img.load()
                return _to_rgb(img, where)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DataError(f"{where}: image refused, more than {MAX_PIXELS} pixels ({err})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DataError(f"{where}: image cannot be decoded ({err})") from None
    except Exception as err:  # a hostile header can make a Pillow plugin raise anything (struct.error, ...)
        raise DataError(f"{where}: image cannot be decoded ({type(err).__name__}: {err})") from None


def decode(data: bytes, ext: str, where: str) -> np.ndarray:
    """Member bytes -> HxWx3 uint8. `ext` is the member's extension ("png", "blur.jp2", ...); any
    failure is a DataError naming `where` (the shard and sample, or the file)."""
    ext = ext.rsplit(".", 1)[-1].lower()
    if ext == "npy":
        return _decode_npy(data, where)
    if ext not in _PIL_EXTS:
        raise DataError(f"{where}: unknown image extension .{ext} (expected png, jp2 or npy)")
    return decode_pil(data, where)
