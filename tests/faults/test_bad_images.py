"""Each bad image of issue 9 (item 8) put into a real shard as one sample's member, then read by every reader
of the training data: the start-up check (check_split, data.on_bad_sample error and skip), the PyTorch
loader (ShardPairs.load) and the DALI loader (CPU). Each must be refused by a DataError naming the shard
and the sample (the start-up check: a bad sample left out under skip), or decoded to the pixels
golf_dist.data.formats documents: 16-bit scaled, not clipped; alpha composited over black. A bare
exception, a silent clip, or two loaders that read different pixels fail the test."""

from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import rewrite_shard
from PIL import Image

from golf_dist.data.dali import DaliTrainLoader
from golf_dist.data.prep.sharding import shard_gopro
from golf_dist.data.shard_reader import index_shard, read_manifest, shard_paths
from golf_dist.data.split_check import check_split
from golf_dist.data.torch_loader import ShardPairs
from golf_dist.errors import DataError

from .conftest import train_argv, train_config

FAULT = "bad image in a shard"
H, W = 64, 96  # the session shards' frames


# ---------------------------------------------------------------- image bytes


def _png_bytes(width: int, height: int, bit_depth: int, color_type: int, raw: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _save(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _npy(shape, data: bytes, descr: str = "|u1", extra: str = "") -> bytes:
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape!r}, {extra}}}"
    header += " " * (63 - (10 + len(header)) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin-1") + data


GREY16 = np.arange(H * W, dtype=np.uint16).reshape(H, W) * 7  # every high byte and low byte
RGBA = np.random.default_rng(9).integers(0, 256, (H, W, 4), dtype=np.uint8)


def _corrupt(good_png: bytes) -> bytes:
    """A PNG whose header is good and whose pixel data is not: found only when decoded."""
    return good_png[: 8 + 8 + 13 + 4] + struct.pack(">I", 2048) + b"IDAT" + bytes(range(256)) * 8 + b"\0" * 4


def _cases(good_png: bytes) -> list[dict]:
    """name, format, the member bytes (blur and sharp alike), and what must happen: 'startup' (a bad sample at
    start-up), 'load' (found when decoded), or an expected HxWx3 array (decoded as documented)."""
    corrupt = _corrupt(good_png)
    return [
        {
            "name": "decompression bomb (20000x20000 claimed)",
            "fmt": "png",
            "data": _png_bytes(20000, 20000, 8, 2, b"\0" * 64),
            "expect": "startup",
        },
        {"name": "not an image", "fmt": "png", "data": b"this is not an image " * 20, "expect": "startup"},
        {
            "name": "PNG followed by 2 MB of padding",
            "fmt": "png",
            "data": good_png + b"\0" * (2 << 20),
            "expect": "startup",
        },
        {"name": "corrupt data behind a good header", "fmt": "png", "data": corrupt, "expect": "load"},
        {"name": "truncated PNG", "fmt": "png", "data": good_png[: len(good_png) // 2], "expect": "load"},
        {
            "name": "float image (TIFF, mode F)",
            "fmt": "png",
            "data": _save(Image.fromarray(np.full((H, W), 0.5, np.float32)), "TIFF"),
            "expect": "startup",
        },
        {
            "name": "16-bit greyscale PNG",
            "fmt": "png",
            "data": _save(Image.fromarray(GREY16)),
            "expect": np.repeat((GREY16 >> 8).astype(np.uint8)[:, :, None], 3, axis=2),
        },
        {"name": "RGBA PNG", "fmt": "png", "data": _save(Image.fromarray(RGBA)), "expect": "startup"},
        {
            "name": ".npy header claiming more than its bytes",
            "fmt": "npy",
            "data": _npy((H * 2, W, 3), b"\0" * (H * W * 3)),
            "expect": "startup",
        },
        {
            "name": ".npy header claiming 100000x100000",
            "fmt": "npy",
            "data": _npy((100_000, 100_000, 3), b"\0" * 10),
            "expect": "startup",
        },
        {"name": ".npy header cut short", "fmt": "npy", "data": b"\x93NUMPY\x01\x00\x10", "expect": "startup"},
        {
            "name": ".npy header without a shape",
            "fmt": "npy",
            "data": b"\x93NUMPY\x01\x00"
            + struct.pack("<H", 54)
            + b"{'descr': '|u1', 'fortran_order': False}".ljust(53)
            + b"\n",
            "expect": "startup",
        },
        {
            "name": ".npy header not a dict",
            "fmt": "npy",
            "data": b"\x93NUMPY\x01\x00" + struct.pack("<H", 22) + b"[1, 2, 3]".ljust(21) + b"\n",
            "expect": "startup",
        },
    ]


# ---------------------------------------------------------------- shards holding one bad sample


def with_bad_sample(base: Path, dest: Path, fmt: str, data: bytes, split: str = "train") -> tuple[Path, Path, str]:
    """A copy of the shard set `base` whose first `split` shard's second sample has `data` as both images."""
    shutil.copytree(base, dest)
    shard = shard_paths(dest, read_manifest(dest), split)[0]
    key = index_shard(shard)[1].key
    rewrite_shard(shard, lambda name, old: data if name in (f"{key}.blur.{fmt}", f"{key}.sharp.{fmt}") else old)
    return dest, shard, key


@pytest.fixture(scope="module")
def npy_shards(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bad-images") / "npy"
    shard_gopro(
        shards.parent / "GOPRO_Large", out, image_format="npy", test_format="png", maxcount=4, workers=1, progress=False
    )
    return out


def _dali(checked, **kw) -> DaliTrainLoader:
    return DaliTrainLoader(
        checked,
        crop=32,
        flips=False,
        crops_per_frame=1,
        per_device=4,
        rank=0,
        world=1,
        seed=0,
        device="cpu",
        num_threads=1,
        **kw,
    )


def _dali_crop_of(checked, key: str, steps: int = 6):
    """The first DALI crop of sample `key` within `steps` batches and its window: (crop HxWx3 uint8, top, left)."""
    loader = _dali(checked)
    try:
        for _ in range(steps):
            blur, _ = next(loader)
            for j, source in enumerate(loader.last_sources):
                if source.rsplit(" ", 1)[-1] == key:
                    top, left, _, _ = (int(v) for v in loader.last_windows[j])
                    crop = (blur[j] * 255).round().permute(1, 2, 0).numpy().astype(np.uint8)
                    return crop, top, left
    finally:
        loader.close()
    raise AssertionError(f"DALI never drew sample {key} in {steps} batches")


@pytest.mark.slow
def test_each_bad_image_is_refused_by_name_or_decoded_as_documented(shards, npy_shards, tmp_path, record):
    record.expect(FAULT, "start-up check, PyTorch loader, DALI loader")
    good_png = (shards.parent / "GOPRO_Large").rglob("*.png").__next__().read_bytes()
    rows = []
    for i, case in enumerate(_cases(good_png)):
        base = shards if case["fmt"] == "png" else npy_shards
        folder, shard, key = with_bad_sample(base, tmp_path / f"c{i}", case["fmt"], case["data"])
        where = f"shard {shard} sample {key}"
        record.injections = i + 1
        expect = case["expect"]
        if isinstance(expect, str) and expect == "startup":
            with pytest.raises(DataError) as caught:
                check_split(folder, "train", "error")
            assert where in str(caught.value), f"{case['name']}: {caught.value}"
            checked = check_split(folder, "train", "skip")
            assert checked.n_bad == 1 and [b.key for b in checked.bad] == [key], (case["name"], checked.bad)
            rows.append(
                (
                    "at start-up",
                    case["name"],
                    "named error",
                    "a bad sample: DataError naming shard and sample (error), left out and counted (skip)",
                )
            )
            continue
        checked = check_split(folder, "train", "error")  # a good header: the start-up check cannot see it
        assert checked.n_bad == 0, case["name"]
        pairs = ShardPairs(folder, "train")
        index = next(j for j, ref in enumerate(pairs.refs) if ref.key == key)
        if isinstance(expect, str) and expect == "load":
            with pytest.raises(DataError) as caught:
                pairs.load(index)
            assert where in str(caught.value), f"{case['name']} (torch): {caught.value}"
            with pytest.raises(DataError) as caught:
                _dali_crop_of(checked, key)
            assert where in str(caught.value), f"{case['name']} (DALI): {caught.value}"
            rows.append(
                (
                    "when decoded",
                    case["name"],
                    "named error",
                    "passes the header check; DataError naming shard and sample in both loaders",
                )
            )
            continue
        blur, sharp, _ = pairs.load(index)
        if not (np.array_equal(blur, expect) and np.array_equal(sharp, expect)):
            record(
                FAULT,
                case["name"],
                1,
                "data lost",
                f"the PyTorch loader decodes other pixels than documented (max diff "
                f"{np.abs(blur.astype(int) - expect.astype(int)).max()})",
            )
        detail = "decoded as documented by the PyTorch loader"
        crop, top, left = _dali_crop_of(checked, key)
        gap = int(np.abs(crop.astype(int) - expect[top : top + 32, left : left + 32].astype(int)).max())
        if gap > 1:
            record(FAULT, case["name"], 1, "data lost", f"the DALI loader reads other pixels (max diff {gap})")
        detail += f" and DALI (within {gap} level{'s' if gap != 1 else ''} of it)"
        rows.append((case["name"], case["name"], "identical", detail))
    groups: dict[tuple[str, str, str], list[str]] = {}
    for group, name, outcome, detail in rows:
        groups.setdefault((group, outcome, detail), []).append(name)
    for (group, outcome, detail), names in groups.items():
        target = group if names == [group] else f"found {group}: {', '.join(names)}"
        record(FAULT, target, len(names), outcome, detail)


def test_an_rgba_member_is_a_named_bad_sample_for_both_loaders(shards, tmp_path, record):
    """DALI's decoder drops alpha where formats.decode (the PyTorch loader) composites it over black, so an RGBA
    member would train on different pixels per loader: the start-up check refuses it by name (error) or
    leaves it out (skip), for both loaders alike."""
    record.expect(FAULT, "RGBA PNG (start-up check, both loaders)")
    folder, shard, key = with_bad_sample(shards, tmp_path / "rgba", "png", _save(Image.fromarray(RGBA)))
    with pytest.raises(DataError) as err:
        check_split(folder, "train", "error")
    message = str(err.value)
    assert f"sample {key}" in message and "alpha" in message and str(shard) in message, message
    skipped = check_split(folder, "train", "skip")
    assert [b.key for b in skipped.bad] == [key], skipped.bad
    assert key not in {ref.key for _, refs in skipped.shards for ref in refs}
    record(
        FAULT,
        "RGBA PNG (start-up check, both loaders)",
        1,
        "named error",
        f"refused naming the shard and sample ({message[:80]}...); with skip it is left out",
    )


def test_a_frame_smaller_than_the_crop_is_a_skipped_bad_sample(shards, tmp_path, record):
    from golf_dist.config import load_config
    from golf_dist.data.loaders import make_train_loader
    from golf_dist.data.split_check import open_pairs

    record.expect(FAULT, "frame smaller than data.crop, data.on_bad_sample=skip")
    small = _save(Image.fromarray(np.zeros((16, 16, 3), np.uint8)))
    folder, shard, key = with_bad_sample(shards, tmp_path / "small", "png", small)
    cfg = load_config(
        "gopro",
        "f",
        [f"data.shards={folder}", "data.crop=32", "data.num_workers=0", "data.on_bad_sample=skip", "train.steps=6"],
    )
    outcomes = {}
    for loader_kind in ("torch", "dali"):
        pairs = open_pairs(folder, "train", "skip", min_side=32)  # as the trainer opens it: min_side=data.crop
        loader = make_train_loader(
            cfg, pairs, global_batch=4, accum=1, world=1, rank=0, start_step=0, device="cpu", loader=loader_kind
        )
        try:
            for _ in range(6):  # two epochs of 12 pairs: the small one is drawn
                next(loader)
            outcomes[loader_kind] = ("identical", "left out as a bad sample")
        except DataError as err:
            named = f"sample {key}" in str(err)
            outcomes[loader_kind] = (
                "named error",
                f"training stops: DataError {'naming the sample' if named else 'naming only the folder'}: "
                f"{str(err)[:100]}",
            )
        finally:
            loader.close()
    for loader_kind, (outcome, detail) in outcomes.items():
        record(
            FAULT,
            f"frame smaller than data.crop, skip ({'DALI' if loader_kind == 'dali' else 'torch'} loader)",
            1,
            outcome,
            detail,
        )
    assert all(outcome == "identical" for outcome, _ in outcomes.values()), outcomes


def test_an_exif_orientation_tag_is_ignored_alike_by_both_loaders(shards, tmp_path, record):
    """Pillow (the PyTorch loader) ignores a PNG's EXIF orientation; DALI's decoder applies it unless told not
    to, so a member tagged 'rotate 90' (orientation 6) would train rotated against its pair under DALI alone.
    Both loaders must read the stored pixels."""
    target = "PNG with an EXIF orientation tag (6: rotate 90), both loaders"
    record.expect(FAULT, target)
    pixels = np.random.default_rng(5).integers(0, 256, (H, W, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", exif=exif)
    assert b"eXIf" in buf.getvalue()
    folder, shard, key = with_bad_sample(shards, tmp_path / "exif", "png", buf.getvalue())
    checked = check_split(folder, "train", "error")
    pairs = ShardPairs(folder, "train")
    blur, sharp, _ = pairs.load(next(j for j, ref in enumerate(pairs.refs) if ref.key == key))
    if not (np.array_equal(blur, pixels) and np.array_equal(sharp, pixels)):
        record(FAULT, target, 1, "data lost", "the PyTorch loader does not read the stored pixels")
    crop, top, left = _dali_crop_of(checked, key)
    if not np.array_equal(crop, pixels[top : top + 32, left : left + 32]):
        record(FAULT, target, 1, "data lost", "the DALI loader reads other pixels (the tag applied: rotated)")
    record(FAULT, target, 1, "identical", "the tag is ignored: both loaders read the stored pixels")


@pytest.mark.slow
def test_a_bad_validation_image_is_found_at_start_up(shards, forkserver, tmp_path, record):
    """A validation (test split) frame corrupt behind a good header: the start-up check decodes the validation
    frames, so `error` stops before the first step naming shard and sample (no worker traceback, no checkpoint:
    nothing trained is lost, and a restart is not stopped at the same step each time), and `skip` leaves the
    frame out, validates on the next one and counts it."""
    target = "validation frame, corrupt data behind a good header"
    record.expect(FAULT, target)
    good_png = next((shards.parent / "GOPRO_Large").rglob("*.png")).read_bytes()
    folder, shard, key = with_bad_sample(shards, tmp_path / "shards", "png", _corrupt(good_png), split="test")
    runs = {}
    for mode in ("error", "skip"):
        cfg = train_config(tmp_path / mode / "cfg.yaml", folder, tmp_path / mode / "out", data={"on_bad_sample": mode})
        runs[mode] = forkserver.run(train_argv(cfg, "f"), tmp_path / mode / "run")
    error, skip = runs["error"], runs["skip"]
    assert error.wait() == 1, error.stderr[-3000:]
    assert f"shard {shard} sample {key}" in error.stderr and "Traceback" not in error.stderr, error.stderr[-3000:]
    assert not any((tmp_path / "error" / "out").rglob("step-*")), "the run trained before it stopped"
    record(
        FAULT,
        f"{target}, data.on_bad_sample=error",
        1,
        "named error",
        "stopped at start-up, before any step, naming shard and sample; no traceback",
    )
    skip.check()
    assert "left out 1 bad test sample(s)" in skip.stdout and key in skip.stdout, skip.stdout[-3000:]
    metrics = [
        json.loads(line) for line in (tmp_path / "skip" / "out" / "f" / "metrics.jsonl").read_text().splitlines()
    ]
    val = [m for m in metrics if "val_psnr" in m.get("metrics", m)]
    assert val and all(m.get("metrics", m)["val_bad_samples_skipped"] == 1 for m in val), val
    record(
        FAULT,
        f"{target}, data.on_bad_sample=skip",
        1,
        "identical",
        "left out at start-up and counted (val_bad_samples_skipped); training and validation ran to the end",
    )
