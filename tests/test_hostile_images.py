"""Hostile or odd images: a size cap before any pixel is decoded, .npy headers checked against the bytes
that follow them, every parser failure a DataError (or, for the header check, a bad sample) naming the
sample or file, 16-bit greyscale scaled (not clipped), alpha composited over black, float modes refused.

New names (formats.MAX_PIXELS, npy_header) are read inside the tests, so each fails on its own when its
fix is missing."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_gopro
from PIL import Image

from golf_dist.data import formats
from golf_dist.data.prep.gopro import Pair, check_pair
from golf_dist.data.prep.sharding import shard_gopro
from golf_dist.data.shard_reader import index_shard, read_manifest, shard_paths
from golf_dist.data.split_check import check_split, image_size
from golf_dist.data.torch_loader import ShardPairs
from golf_dist.errors import DataError


def _png(width: int, height: int, bit_depth: int, color_type: int, raw: bytes) -> bytes:
    """A PNG of one IDAT holding `raw` (filter bytes included) whatever IHDR claims."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _npy(shape: tuple, data: bytes, descr: str = "|u1", extra: str = "") -> bytes:
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape!r}, {extra}}}"
    header += " " * (63 - (10 + len(header)) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin-1") + data


def _save(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


# ---------------------------------------------------------------- size cap


@pytest.mark.parametrize("width, height", [(4000, 4000), (20000, 20000), (1 << 20, 1 << 14)])
def test_a_decompression_bomb_is_refused_by_name_before_decoding(width, height):
    bomb = _png(width, height, 8, 2, b"\0" * 64)  # a few bytes claiming a huge frame
    for decoder in (
        lambda: formats.decode(bomb, "blur.png", "shard s.tar sample k1 (blur)"),
        lambda: formats.decode_pil(bomb, "shard s.tar sample k1 (blur)"),
    ):
        with pytest.raises(DataError, match=r"shard s.tar sample k1 \(blur\): .*pixels"):
            decoder()
    with pytest.raises(ValueError, match="pixels"):  # the start-up header check: a bad sample
        image_size(bomb, "png", len(bomb))


def test_the_cap_allows_gopro_frames_and_large_photos():
    assert Image.MAX_IMAGE_PIXELS == formats.MAX_PIXELS >= 4 * 1280 * 720
    frame = _save(Image.new("RGB", (1280, 720), (1, 2, 3)))
    assert formats.decode(frame, "png", "frame").shape == (720, 1280, 3)
    assert image_size(frame, "png", len(frame)) == (720, 1280)


# ---------------------------------------------------------------- .npy headers


def test_an_npy_header_claiming_more_than_its_bytes_is_refused_before_allocating():
    forged = _npy((3000, 4000, 3), b"\0" * 10)  # 36 MB claimed, 10 bytes held
    with pytest.raises(DataError, match=r"sample k1: .npy header claims shape \(3000, 4000, 3\).*holds 10"):
        formats.decode(forged, "blur.npy", "sample k1")
    with pytest.raises(ValueError, match="claims shape"):
        image_size(forged[:4096], "npy", len(forged))
    whole = _npy((2, 3, 3), bytes(range(18)))
    assert formats.decode(whole, "npy", "ok").tolist() == np.arange(18, dtype=np.uint8).reshape(2, 3, 3).tolist()
    assert image_size(whole, "npy", len(whole)) == (2, 3)
    with pytest.raises(DataError, match=r"sample k2: .npy header claims shape .*holds 19"):  # one byte too many
        formats.decode(whole + b"\0", "npy", "sample k2")


def test_an_npy_header_claiming_a_huge_frame_is_refused_by_the_pixel_cap():
    forged = _npy((100_000, 100_000, 3), b"\0" * 10)  # 30 GB if allocated
    with pytest.raises(DataError, match=r"sample k1: image of 100000x100000 = .* pixels, more than"):
        formats.decode(forged, "npy", "sample k1")
    with pytest.raises(ValueError):
        image_size(forged, "npy", len(forged))


@pytest.mark.parametrize(
    "head, why",
    [
        (b"\x93NUMPY\x01\x00\x10", "cut inside the header length (struct.error before)"),
        (b"\x93NUMPY\x01\x00" + struct.pack("<H", 60000) + b"{" * 4086, "oversized header length"),
        (_npy((2, 3, 3), b"", extra="")[:40], "cut inside the header"),
        (
            b"\x93NUMPY\x01\x00"
            + struct.pack("<H", 54)
            + b"{'descr': '|u1', 'fortran_order': False}".ljust(53)
            + b"\n",
            "no shape key (KeyError before)",
        ),
        (_npy((2, 3, 3), b"\0" * 18, extra="'evil': 1, "), "an extra header key"),
        (b"\x93NUMPY\x01\x00" + struct.pack("<H", 22) + b"[1, 2, 3]".ljust(21) + b"\n", "not a dict (AttributeError)"),
        (b"\x93NUMPY\x01\x00" + struct.pack("<H", 22) + b"(" * 21 + b"\n", "a syntax error"),
    ],
)
def test_malformed_npy_headers_are_bad_samples_not_crashes(head, why):
    with pytest.raises(ValueError):
        image_size(head, "npy", len(head))
    with pytest.raises(DataError, match="sample k9: .npy image cannot be read"):
        formats.decode(head, "npy", "sample k9")


@pytest.fixture(scope="module")
def npy_shards(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("hostile")
    src = write_gopro(base / "GOPRO_Large", train=4, test=2, height=32, width=48)
    shard_gopro(src, base / "npy", image_format="npy", test_format="png", maxcount=2, workers=1, progress=False)
    return base / "npy"


def test_a_forged_npy_member_is_named_by_the_startup_check_and_the_loader(npy_shards, tmp_path):
    import shutil

    out = tmp_path / "npy"
    shutil.copytree(npy_shards, out)
    shard = shard_paths(out, read_manifest(out), "train")[0]
    sample = index_shard(shard)[1]
    data = bytearray(shard.read_bytes())
    for kind in ("blur", "sharp"):  # both, so that no blur/sharp size mismatch gives it away
        offset, size = sample.members[f"{kind}.npy"]
        head = bytes(data[offset : offset + 128])
        assert b"(32, 48, 3)" in head
        data[offset : offset + 128] = head.replace(b"(32, 48, 3)", b"(99, 48, 3)")
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"shard {shard} sample {sample.key}: blur .*claims shape \(99, 48, 3\)"):
        check_split(out, "train")
    checked = check_split(out, "train", on_bad_sample="skip")
    assert checked.n_bad == 1 and checked.n_samples == 3
    pairs = ShardPairs(out, "train")
    index = next(i for i, ref in enumerate(pairs.refs) if ref.key == sample.key)
    with pytest.raises(DataError, match=rf"shard {shard} sample {sample.key} \(blur\): .npy header claims"):
        pairs.load(index)


# ---------------------------------------------------------------- 16-bit and alpha


def test_16_bit_greyscale_is_scaled_not_clipped():
    raw = b"\0" + struct.pack(">HHHH", 0x0000, 0x00FF, 0x1234, 0xFFFF)
    png = _png(4, 1, 16, 0, raw)
    with Image.open(io.BytesIO(png)) as img:
        assert img.mode.startswith("I")  # what Pillow makes of it: clipped to 255 by a plain convert("RGB")
    expected = np.array([0x00, 0x00, 0x12, 0xFF], np.uint8)[None, :, None].repeat(3, axis=2)
    for decoded in (formats.decode(png, "png", "grey16"), formats.decode_pil(png, "grey16")):
        assert decoded.dtype == np.uint8 and decoded.tolist() == expected.tolist()
    rgb16 = _png(1, 1, 16, 2, b"\0" + struct.pack(">HHH", 0x1234, 0x8000, 0xFFFF))  # Pillow: the high byte too
    assert formats.decode(rgb16, "png", "rgb16").tolist() == [[[0x12, 0x80, 0xFF]]]


def test_alpha_is_composited_over_black_and_opaque_pixels_are_unchanged():
    rgba = np.array([[[200, 100, 50, 128], [200, 100, 50, 255], [9, 9, 9, 0]]], np.uint8)
    data = _save(Image.fromarray(rgba))
    expected = [[[(v * 128 + 127) // 255 for v in (200, 100, 50)], [200, 100, 50], [0, 0, 0]]]
    assert formats.decode(data, "png", "rgba").tolist() == expected
    assert formats.decode_pil(data, "rgba").tolist() == expected
    grey_alpha = _save(Image.fromarray(np.array([[[100, 51]]], np.uint8)))
    assert formats.decode_pil(grey_alpha, "la").tolist() == [[[20, 20, 20]]]


def test_float_and_32_bit_images_are_refused_by_name():
    data = _save(Image.fromarray(np.full((2, 2), 0.5, np.float32)), "TIFF")
    with pytest.raises(DataError, match="image x.tiff: .*mode F"):
        formats.decode_pil(data, "image x.tiff")


def test_the_sharder_refuses_a_translucent_source_frame(tmp_path):
    rgba = np.zeros((6, 8, 4), np.uint8)
    rgba[..., 3] = 255
    Image.fromarray(rgba).save(tmp_path / "opaque.png")
    rgba[0, 0, 3] = 10
    Image.fromarray(rgba).save(tmp_path / "translucent.png")
    assert check_pair(Pair("s", "1", tmp_path / "opaque.png", tmp_path / "opaque.png")) == (6, 8)
    with pytest.raises(DataError, match="translucent.png has transparent pixels"):
        check_pair(Pair("s", "1", tmp_path / "opaque.png", tmp_path / "translucent.png"))


def test_a_source_frame_over_the_cap_is_refused_by_name(tmp_path):
    (tmp_path / "bomb.png").write_bytes(_png(20000, 20000, 8, 2, b"\0" * 64))
    Image.new("RGB", (8, 6)).save(tmp_path / "ok.png")
    with pytest.raises(DataError, match="bomb.png"):
        check_pair(Pair("s", "1", tmp_path / "ok.png", tmp_path / "bomb.png"))


def test_deblur_refuses_oversized_files_and_bombs_by_name(tmp_path, monkeypatch):
    from golf_dist.inference import deblur

    monkeypatch.setattr(deblur, "load_trained", lambda output_dir, device, iterations: (torch.nn.Identity(), None))
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as fh:  # sparse: no disk used, and never read
        fh.truncate(deblur.MAX_INPUT_BYTES + 1)
    with pytest.raises(DataError, match=rf"image {huge} is {deblur.MAX_INPUT_BYTES + 1} bytes"):
        deblur.deblur_files(tmp_path, [str(huge)], tmp_path / "out", iterations=0, device="cpu")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png(20000, 20000, 8, 2, b"\0" * 64))
    with pytest.raises(DataError, match=rf"image {bomb}: .*pixels"):
        deblur.deblur_files(tmp_path, [str(bomb)], tmp_path / "out", iterations=0, device="cpu")
    ok = tmp_path / "ok.png"
    Image.fromarray(np.full((4, 6, 4), 255, np.uint8)).save(ok)  # RGBA, opaque: decoded as its RGB
    assert deblur.deblur_files(tmp_path, [str(ok)], tmp_path / "out", iterations=0, device="cpu") == [
        tmp_path / "out" / "ok.png"
    ]
    with Image.open(tmp_path / "out" / "ok.png") as out:
        assert out.mode == "RGB" and np.asarray(out).min() == 255
