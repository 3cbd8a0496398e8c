"""Shard formats (png, jp2, npy): lossless per format, read back by ShardPairs and by a real DALI
reader (CPU mode) through the DALI index files written beside the shards."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from golf_dist.data.formats import FORMATS, decode, encode
from golf_dist.data.prep.gopro import scan_gopro
from golf_dist.data.prep.sharding import shard_gopro
from golf_dist.data.prep.synthetic import make_synthetic_gopro
from golf_dist.data.shard_reader import (
    dali_index,
    index_path,
    index_paths,
    index_shard,
    read_manifest,
    read_member,
    shard_paths,
    split_format,
)
from golf_dist.data.torch_loader import ShardPairs
from golf_dist.errors import DataError
from golf_dist.files import sha256_file

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fmt_gopro(tmp_path_factory) -> Path:
    """5 train + 2 test synthetic pairs of 40x56; one sharp frame saved as a palette PNG, one blur frame as
    RGBA, so 'the source pixels' means PIL's RGB conversion of what is on disk."""
    root = tmp_path_factory.mktemp("fmt") / "GOPRO_Large"
    make_synthetic_gopro(
        root, seed=2, workers=1, train_pairs=5, test_pairs=2, height=40, width=56, frames_per_scene=2, progress=False
    )
    pairs = scan_gopro(root, "train")
    with Image.open(pairs[0].sharp_path) as im:
        im.convert("RGB").quantize(64).save(pairs[0].sharp_path)
    with Image.open(pairs[1].blur_path) as im:
        im.convert("RGBA").save(pairs[1].blur_path)
    return root


@pytest.fixture(scope="module")
def fmt_shards(fmt_gopro, tmp_path_factory) -> dict[str, Path]:
    """The same set in each format (test split always png: a per-split format), 2 pairs per shard."""
    base = tmp_path_factory.mktemp("fmt_shards")
    out = {}
    for fmt in FORMATS:
        out[fmt] = base / fmt
        shard_gopro(fmt_gopro, out[fmt], image_format=fmt, test_format="png", maxcount=2, workers=1, progress=False)
    return out


def _source_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_encode_decode_is_lossless_per_format():
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (37, 53, 3), dtype=np.uint8),  # noise, odd sizes
        np.zeros((8, 8, 3), np.uint8),
        np.full((9, 5, 3), 255, np.uint8),
        np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (3, 1, 3)),  # every value in a row
    ]
    for fmt in FORMATS:
        for image in images:
            data = encode(image, fmt)
            back = decode(data, fmt, "test image")
            assert back.dtype == np.uint8 and np.array_equal(back, image), (fmt, image.shape)
            assert encode(image, fmt) == data, f"{fmt} encoding is not deterministic"
    assert encode(images[0], "jp2")[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n", "jp2 should be the JP2 container"
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        encode(np.zeros((4, 4), np.uint8), "npy")
    with pytest.raises(ValueError, match="unknown image format"):
        encode(images[0], "webp")


def test_decode_errors_name_the_sample():
    image = np.zeros((6, 7, 3), np.uint8)
    jp2 = encode(image, "jp2")
    with pytest.raises(DataError, match="shard x.tar sample k1 .blur.: image cannot be decoded"):
        decode(jp2[: len(jp2) // 2], "blur.jp2", "shard x.tar sample k1 (blur)")
    with pytest.raises(DataError, match="sample k2: .npy image cannot be read"):
        decode(b"\x93NUMPY garbage", "npy", "sample k2")
    buf = io.BytesIO()
    np.save(buf, np.zeros((6, 7, 3), np.float32))
    with pytest.raises(DataError, match="sample k3: .npy image is float32 .6, 7, 3., not HxWx3 uint8"):
        decode(buf.getvalue(), "sharp.npy", "sample k3")
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="sample k4: .npy image cannot be read"):  # allow_pickle=False
        decode(buf.getvalue(), "npy", "sample k4")
    with pytest.raises(DataError, match="sample k5: unknown image extension .webp"):
        decode(b"RIFF", "blur.webp", "sample k5")


def test_every_format_decodes_to_the_source_pixels(fmt_gopro, fmt_shards):
    for fmt, out in fmt_shards.items():
        manifest = read_manifest(out)
        assert manifest["image_format"] == fmt
        assert split_format(manifest, "train") == fmt and split_format(manifest, "test") == "png"
        for split in ("train", "test"):
            sources = {f"{p.scene}-{p.frame}": p for p in scan_gopro(fmt_gopro, split)}
            pairs = ShardPairs(out, split)
            assert len(pairs) == len(sources)
            ext = split_format(manifest, split)
            for i in range(len(pairs)):
                blur, sharp, key = pairs.load(i)
                assert np.array_equal(blur, _source_pixels(sources[key].blur_path)), (fmt, split, key)
                assert np.array_equal(sharp, _source_pixels(sources[key].sharp_path)), (fmt, split, key)
                assert (pairs.refs[i].blur_ext, pairs.refs[i].sharp_ext) == (ext, ext)
            for shard in shard_paths(out, manifest, split):
                for ref in index_shard(shard):
                    assert list(ref.members) == [f"blur.{ext}", f"sharp.{ext}", "json"]
                    if ext == "png":  # png members are the source bytes, unchanged
                        data = read_member(shard, *ref.members["blur.png"])
                        assert data == sources[ref.key].blur_path.read_bytes()


def test_npy_and_jp2_shards_are_reproducible_and_sized_as_planned(fmt_gopro, fmt_shards, tmp_path):
    for fmt in ("jp2", "npy"):
        again = tmp_path / fmt
        shard_gopro(fmt_gopro, again, image_format=fmt, test_format="png", maxcount=2, workers=2, progress=False)
        files = sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(fmt_shards[fmt]) for p in fmt_shards[fmt].rglob("*") if p.is_file())
        for rel in files:
            assert (again / rel).read_bytes() == (fmt_shards[fmt] / rel).read_bytes(), rel
    # an npy member is the 128-byte header and the raw pixels
    shard = shard_paths(fmt_shards["npy"], read_manifest(fmt_shards["npy"]), "train")[0]
    _, size = index_shard(shard)[0].members["blur.npy"]
    assert size == 128 + 40 * 56 * 3


@pytest.mark.slow
def test_dali_index_files_match_wds2idx_and_the_manifest(fmt_shards, tmp_path):
    tool = shutil.which("wds2idx")
    for fmt, out in fmt_shards.items():
        manifest = read_manifest(out)
        for split in ("train", "test"):
            shards = shard_paths(out, manifest, split)
            indexes = index_paths(out, manifest, split)
            assert indexes == [index_path(s) for s in shards] and all(p.suffix == ".idx" for p in indexes)
            for shard, idx, entry in zip(shards, indexes, manifest["splits"][split]["shards"]):
                assert entry["index"] == {
                    "path": idx.relative_to(out).as_posix(),
                    "bytes": idx.stat().st_size,
                    "sha256": sha256_file(idx),
                }
                assert idx.read_bytes() == dali_index(index_shard(shard))
                lines = idx.read_text().splitlines()
                assert lines[0] == f"v1.2 {entry['samples']}" and len(lines) == entry["samples"] + 1
                if tool:  # DALI's own indexer, from the nvidia-dali wheel, writes the same bytes
                    theirs = tmp_path / f"{fmt}-{split}-{shard.stem}.idx"
                    subprocess.run([tool, str(shard), str(theirs)], check=True, capture_output=True)
                    assert theirs.read_bytes() == idx.read_bytes(), (fmt, shard)
    assert tool, "wds2idx (shipped with nvidia-dali) should be on PATH"


def test_real_dali_reader_with_index_paths_gives_the_source_pixels(fmt_gopro, fmt_shards):
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(num_threads=1, device_id=None, prefetch_queue_depth=1)
    def pipe(paths, indexes, fmt):
        blur, sharp, info = fn.readers.webdataset(
            paths=paths,
            index_paths=indexes,
            ext=[f"blur.{fmt}", f"sharp.{fmt}", "json"],
            missing_component_behavior="error",
            random_shuffle=False,
            name="reader",
        )
        if fmt != "npy":  # DALI's CPU decoder (OpenJPEG for jp2); npy members are raw arrays
            blur = fn.decoders.image(blur, device="cpu", output_type=types.RGB)
            sharp = fn.decoders.image(sharp, device="cpu", output_type=types.RGB)
        return blur, sharp, info

    for fmt, out in fmt_shards.items():
        manifest = read_manifest(out)
        paths = [str(p) for p in shard_paths(out, manifest, "train")]
        indexes = [str(p) for p in index_paths(out, manifest, "train")]
        n = manifest["splits"]["train"]["pairs"]
        p = pipe(paths, indexes, fmt, batch_size=n)
        p.build()
        assert p.reader_meta("reader")["epoch_size"] == n
        blur, sharp, info = p.run()
        sources = {f"{q.scene}-{q.frame}": q for q in scan_gopro(fmt_gopro, "train")}
        seen = []
        for i in range(n):
            meta = json.loads(bytes(np.array(info[i])))
            key = f"{meta['scene']}-{meta['frame']}"
            seen.append(key)
            b, s = np.array(blur[i]), np.array(sharp[i])
            if fmt == "npy":
                b, s = decode(b.tobytes(), "npy", key), decode(s.tobytes(), "npy", key)
            assert np.array_equal(b, _source_pixels(sources[key].blur_path)), (fmt, key)
            assert np.array_equal(s, _source_pixels(sources[key].sharp_path)), (fmt, key)
        assert sorted(seen) == sorted(sources)


def test_old_manifest_without_formats_or_indexes_still_reads(fmt_shards, tmp_path):
    out = tmp_path / "old"
    shutil.copytree(fmt_shards["png"], out)
    manifest = json.loads((out / "manifest.json").read_text())
    for info in manifest["splits"].values():
        del info["image_format"]
        for shard in info["shards"]:
            del shard["index"]
            (out / index_path(shard["path"])).unlink()
    (out / "manifest.json").write_text(json.dumps(manifest))
    manifest = read_manifest(out)
    assert split_format(manifest, "train") == "png" and index_paths(out, manifest, "train") is None
    assert len(ShardPairs(out, "train")) == 5


def test_cli_format_flags_and_summary(fmt_gopro, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "data_prep" / "shard_gopro.py"),
            "--src",
            str(fmt_gopro),
            "--out",
            str(tmp_path / "s"),
            "--format",
            "npy",
            "--splits",
            "train",
            "--workers",
            "1",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "train: 5 pairs in 1 shard of npy, 56x40, " in proc.stdout and "MB per pair" in proc.stdout
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "data_prep" / "shard_gopro.py"),
            "--src",
            str(fmt_gopro),
            "--out",
            str(tmp_path / "s"),
            "--format",
            "jp2",
            "--splits",
            "train",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 1 and "--overwrite" in proc.stderr and "Traceback" not in proc.stderr
    assert str(tmp_path / "s" / "train" / "train-000000.tar") in proc.stderr
