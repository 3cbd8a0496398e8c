"""Synthetic GoPro, the GOPRO_Large reader, shard writing and the shard read-side helpers."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from golf_dist.data.prep.gopro import Pair, check_pair, scan_gopro
from golf_dist.data.prep.sharding import shard_gopro
from golf_dist.data.prep.synthetic import kernel_size, make_synthetic_gopro, motion_kernel
from golf_dist.data.shard_reader import index_shard, read_manifest, read_member, shard_paths
from golf_dist.errors import ConfigError, DataError
from golf_dist.files import sha256_file

REPO = Path(__file__).resolve().parents[1]
SCENE_NAME = re.compile(r"^GOPR\d{4}_\d{2}_\d{2}$")
TINY = dict(train_pairs=6, test_pairs=3, height=48, width=64, frames_per_scene=2, progress=False)


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under root, by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _shard(src: Path, out: Path, **kw):
    kw.setdefault("maxcount", 4)
    kw.setdefault("workers", 1)
    return shard_gopro(src, out, progress=False, **kw)


def _cli(script: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "data_prep" / script), *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


@pytest.fixture(scope="module")
def dp_gopro(tmp_path_factory) -> Path:
    """6 train + 3 test synthetic pairs of 48x64, two frames per scene."""
    root = tmp_path_factory.mktemp("dp") / "GOPRO_Large"
    make_synthetic_gopro(root, seed=0, workers=1, **TINY)
    return root


@pytest.fixture(scope="module")
def dp_shards(dp_gopro, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dp_shards") / "shards"
    _shard(dp_gopro, out, workers=2)
    return out


# ---------------------------------------------------------------- synthetic set


def test_synthetic_layout_and_gopro_like_names(dp_gopro):
    counts = {}
    scenes = {}
    for split in ("train", "test"):
        pairs = scan_gopro(dp_gopro, split)
        counts[split] = len(pairs)
        scenes[split] = {p.scene for p in pairs}
        for pair in pairs:
            assert SCENE_NAME.match(pair.scene), pair.scene
            assert re.fullmatch(r"\d{6}", pair.frame) and int(pair.frame) > 1
            assert pair.blur_path == dp_gopro / split / pair.scene / "blur" / f"{pair.frame}.png"
            assert check_pair(pair) == (48, 64)
            with Image.open(pair.sharp_path) as im:
                assert im.mode == "RGB"
        frames = [p.frame for p in pairs]
        assert len(frames) > len(set(frames)), f"{split}: frame numbers should repeat across scenes"
    assert counts == {"train": 6, "test": 3}
    assert len(scenes["train"]) == 3 and len(scenes["test"]) == 2
    assert not scenes["train"] & scenes["test"]
    assert sorted(p.name for p in dp_gopro.iterdir()) == ["test", "train"]


def test_synthetic_same_seed_same_bytes_in_any_worker_count(dp_gopro, tmp_path):
    make_synthetic_gopro(tmp_path / "again", seed=0, workers=2, **TINY)
    make_synthetic_gopro(tmp_path / "other", seed=1, workers=1, **TINY)
    first = _tree(dp_gopro)
    assert _tree(tmp_path / "again") == first
    assert _tree(tmp_path / "other") != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "other"], "temporary folders left behind"


def test_motion_kernel_is_normalised_and_not_a_delta():
    rng = np.random.default_rng(0)
    for size in (7, 11, 31):
        for _ in range(10):
            k = motion_kernel(size, rng)
            assert k.shape == (size, size)
            assert k.min() >= 0
            assert k.sum() == pytest.approx(1.0, abs=1e-9)
            assert (k > 1e-3).sum() >= 2
            # centred on the kernel's centre of mass: the blur does not shift the image
            ys, xs = np.mgrid[:size, :size]
            assert (k * ys).sum() == pytest.approx((size - 1) / 2, abs=0.5)
            assert (k * xs).sum() == pytest.approx((size - 1) / 2, abs=0.5)
    assert np.array_equal(motion_kernel(11, np.random.default_rng(5)), motion_kernel(11, np.random.default_rng(5)))
    assert not np.array_equal(motion_kernel(11, np.random.default_rng(5)), motion_kernel(11, np.random.default_rng(6)))
    with pytest.raises(ValueError):
        motion_kernel(8, rng)
    assert kernel_size(720, 1280) == 31 and kernel_size(256, 448) == 11 and kernel_size(48, 64) == 7


def test_blurred_frames_differ_from_sharp_but_stay_aligned(dp_gopro):
    for pair in scan_gopro(dp_gopro, "train") + scan_gopro(dp_gopro, "test"):
        blur = np.asarray(Image.open(pair.blur_path), dtype=np.float64)
        sharp = np.asarray(Image.open(pair.sharp_path), dtype=np.float64)
        err = np.abs(blur - sharp).mean()
        assert err > 0.5, f"{pair.blur_path} is barely blurred"
        assert err < np.abs(blur - np.roll(sharp, 4, axis=1)).mean(), f"{pair.blur_path} is shifted against sharp"
        assert abs(blur.mean() - sharp.mean()) < 2.0, "the kernel should keep brightness"


def test_synthetic_noise_range_sets_how_far_blurred_frames_stray_and_a_bad_range_is_refused(dp_gopro, tmp_path):
    """--noise LOW HIGH: the sigma (of 255) of each blurred frame's Gaussian noise. The default (1 2) is what the
    fixture set has; more noise on the same views and kernels moves the blurred frames further from the sharp ones,
    and only the blurred ones. A reversed or negative range is refused, naming --noise, with nothing written."""
    make_synthetic_gopro(tmp_path / "noisy", seed=0, workers=1, noise=(6.0, 8.0), **TINY)
    light, noisy = scan_gopro(dp_gopro, "train"), scan_gopro(tmp_path / "noisy", "train")

    def err(pair):
        return np.abs(
            np.asarray(Image.open(pair.blur_path), float) - np.asarray(Image.open(pair.sharp_path), float)
        ).mean()

    for a, b in zip(light, noisy):
        assert Image.open(a.sharp_path).tobytes() == Image.open(b.sharp_path).tobytes()
        assert err(b) > err(a) + 1.0, b.blur_path
    for bad in ((3.0, 2.0), (-1.0, 2.0)):
        with pytest.raises(ConfigError, match="--noise"):
            make_synthetic_gopro(tmp_path / "bad", seed=0, workers=1, noise=bad, **TINY)
    assert not (tmp_path / "bad").exists()


def test_synthetic_refuses_existing_splits_unless_overwrite(tmp_path):
    out = tmp_path / "set"
    (out / "train").mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match=re.escape(str(out / "train"))):
        make_synthetic_gopro(out, seed=0, workers=1, **TINY)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "train"]
    make_synthetic_gopro(out, seed=0, workers=1, overwrite=True, **TINY)
    assert len(scan_gopro(out, "train")) == 6 and (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


# ---------------------------------------------------------------- GoPro reader


def test_scan_gopro_errors_name_the_problem(dp_gopro, tmp_path):
    with pytest.raises(DataError, match="synth_gopro.py"):
        scan_gopro(tmp_path / "nowhere", "train")
    with pytest.raises(DataError, match="blur_gamma"):
        scan_gopro(dp_gopro, "train", blur_dir="blur_gamma")
    src = tmp_path / "src"
    shutil.copytree(dp_gopro, src)
    lonely = next((src / "test").iterdir()) / "sharp" / "000999.png"
    shutil.copy(next(lonely.parent.iterdir()), lonely)
    with pytest.raises(DataError, match=re.escape(str(lonely)) + ".*no blur twin"):
        scan_gopro(src, "test")


def test_check_pair_rejects_non_png_and_16_bit(tmp_path):
    rgb = Image.new("RGB", (8, 6), (10, 20, 30))
    rgb.save(tmp_path / "b.png")
    rgb.save(tmp_path / "s.jpg.png", format="JPEG")
    Image.new("I;16", (8, 6)).save(tmp_path / "s16.png")
    assert check_pair(Pair("s", "1", tmp_path / "b.png", tmp_path / "b.png")) == (6, 8)
    with pytest.raises(DataError, match="s.jpg.png.*not a PNG"):
        check_pair(Pair("s", "1", tmp_path / "b.png", tmp_path / "s.jpg.png"))
    with pytest.raises(DataError, match="s16.png.*mode"):
        check_pair(Pair("s", "1", tmp_path / "b.png", tmp_path / "s16.png"))


# ---------------------------------------------------------------- shards


def test_shard_round_trip(dp_gopro, dp_shards):
    manifest = read_manifest(dp_shards)
    assert manifest["format_version"] == 1 and manifest["blur_dir"] == "blur" and manifest["maxcount"] == 4
    for split, n in (("train", 6), ("test", 3)):
        info = manifest["splits"][split]
        assert (info["pairs"], info["height"], info["width"]) == (n, 48, 64)
        assert [s["samples"] for s in info["shards"]] == [min(4, n - i) for i in range(0, n, 4)]
        sources = {f"{p.scene}-{p.frame}": p for p in scan_gopro(dp_gopro, split)}
        keys = []
        for entry, path in zip(info["shards"], shard_paths(dp_shards, manifest, split)):
            assert path == dp_shards / entry["path"]
            assert sha256_file(path) == entry["sha256"] and path.stat().st_size == entry["bytes"]
            refs = index_shard(path)
            assert len(refs) == entry["samples"]
            for ref in refs:
                pair = sources[ref.key]
                assert list(ref.members) == ["blur.png", "sharp.png", "json"]
                assert read_member(path, *ref.members["blur.png"]) == pair.blur_path.read_bytes()
                assert read_member(path, *ref.members["sharp.png"]) == pair.sharp_path.read_bytes()
                meta = json.loads(read_member(path, *ref.members["json"]))
                assert meta == {
                    "scene": pair.scene,
                    "frame": pair.frame,
                    "split": split,
                    "blur_dir": "blur",
                    "height": 48,
                    "width": 64,
                    "blur_src": f"{split}/{pair.scene}/blur/{pair.frame}.png",
                    "sharp_src": f"{split}/{pair.scene}/sharp/{pair.frame}.png",
                }
                keys.append(ref.key)
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    assert (member.mtime, member.mode, member.uid, member.gid) == (0, 0o444, 0, 0)
                    assert member.uname == member.gname == ""
        assert sorted(keys) == sorted(sources), "every pair exactly once, keys unique across scenes"

        urls = [str(p) for p in shard_paths(dp_shards, manifest, split)]
        samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
        assert [s["__key__"] for s in samples] == keys
        for s in samples:
            assert s["blur.png"] == sources[s["__key__"]].blur_path.read_bytes()
            assert s["sharp.png"] == sources[s["__key__"]].sharp_path.read_bytes()


def test_same_input_same_bytes(dp_gopro, dp_shards, tmp_path):
    _shard(dp_gopro, tmp_path / "again", workers=1)
    assert _tree(tmp_path / "again") == _tree(dp_shards)


def test_train_is_shuffled_across_scenes_by_seed_and_test_is_sorted(dp_gopro, dp_shards, tmp_path):
    def keys(out, split):
        manifest = read_manifest(out)
        return [r.key for p in shard_paths(out, manifest, split) for r in index_shard(p)]

    train = keys(dp_shards, "train")
    assert train != sorted(train)
    assert len({k.rsplit("-", 1)[0] for k in train[:4]}) > 1, "the first shard should mix scenes"
    assert keys(dp_shards, "test") == sorted(keys(dp_shards, "test"))
    _shard(dp_gopro, tmp_path / "seed1", seed=1)
    assert keys(tmp_path / "seed1", "train") != train
    assert sorted(keys(tmp_path / "seed1", "train")) == sorted(train)
    assert keys(tmp_path / "seed1", "test") == keys(dp_shards, "test")


def test_interrupted_run_is_finished_byte_identical(dp_gopro, dp_shards, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(dp_shards, out)
    (out / "manifest.json").unlink()
    (out / "train" / "train-000001.tar").unlink()
    (out / "train" / "train-000001.tar.tmp-123").write_bytes(b"half a shard")
    (out / "manifest.json.tmp-123").write_text("{")
    result = _shard(dp_gopro, out, workers=2)
    assert (result.written, result.reused) == (1, 2)
    assert _tree(out) == _tree(dp_shards)


def test_other_plan_in_out_is_refused_unless_overwrite(dp_gopro, dp_shards, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(dp_shards, out)
    before = _tree(out)
    with pytest.raises(DataError, match=re.escape(str(out / "train" / "train-000000.tar"))):
        _shard(dp_gopro, out, seed=7)
    with pytest.raises(DataError, match=re.escape(str(out / "train")) + ".*--overwrite"):
        _shard(dp_gopro, out, maxcount=3)
    assert _tree(out) == before
    _shard(dp_gopro, out, maxcount=3, overwrite=True)
    manifest = read_manifest(out)
    assert manifest["maxcount"] == 3 and len(manifest["splits"]["train"]["shards"]) == 2
    assert sorted(p.name for p in (out / "train").iterdir()) == [
        "train-000000.idx",
        "train-000000.tar",
        "train-000001.idx",
        "train-000001.tar",
    ]


def test_read_manifest_and_shard_paths_errors(dp_shards, tmp_path):
    with pytest.raises(DataError, match="does not exist.*shard_gopro.py"):
        read_manifest(tmp_path / "none")
    out = tmp_path / "shards"
    shutil.copytree(dp_shards, out)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    with pytest.raises(DataError, match="split 'val'"):
        shard_paths(out, manifest, "val")
    missing = out / "test" / "test-000000.tar"
    missing.unlink()
    with pytest.raises(DataError, match=re.escape(str(missing)) + " is listed in"):
        read_manifest(out)
    shutil.copy(dp_shards / "test" / "test-000000.tar", missing)
    manifest_path.write_text("{not json")
    with pytest.raises(DataError, match="not readable JSON"):
        read_manifest(out)
    del manifest["splits"]["train"]["shards"][0]["sha256"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"splits.train.shards\[0\] lacks sha256"):
        read_manifest(out)
    manifest_path.unlink()
    with pytest.raises(DataError, match=re.escape(str(manifest_path)) + " is missing"):
        read_manifest(out)


def test_index_shard_rejects_truncated_and_incomplete_shards(dp_shards, tmp_path):
    shard = dp_shards / "train" / "train-000000.tar"
    data, refs = shard.read_bytes(), index_shard(shard)

    def end_of(member):  # where the next header would start
        offset, size = member
        return offset + -(-size // 512) * 512

    # mid-member, exactly at a header boundary, and with the end-of-archive blocks cut off
    for cut in (len(data) // 2, end_of(refs[0].members["blur.png"]), end_of(refs[-1].members["json"])):
        bad = tmp_path / f"cut{cut}.tar"
        bad.write_bytes(data[:cut])
        with pytest.raises(DataError, match=re.escape(str(bad))):
            index_shard(bad)
    lacking = tmp_path / "lacking.tar"
    with tarfile.open(lacking, "w") as tar:
        for name in ("a-1.blur.png", "a-1.sharp.png", "a-2.blur.png", "a-2.json"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(DataError, match=re.escape(str(lacking)) + ".*a-2 has no sharp image member"):
        index_shard(lacking)


# ---------------------------------------------------------------- command lines


@pytest.mark.slow
def test_help_of_both_clis():
    for script, flags in (
        ("synth_gopro.py", ("--out", "--train-pairs", "--test-pairs", "--height", "--frames-per-scene", "--overwrite")),
        (
            "shard_gopro.py",
            (
                "--src",
                "--out",
                "--blur-dir",
                "--maxcount",
                "--workers",
                "--seed",
                "--splits",
                "--format",
                "--test-format",
                "--verify",
                "--num-parts",
                "--part",
                "--merge",
                "s3://",
            ),
        ),
    ):
        proc = _cli(script, "--help")
        assert proc.returncode == 0, proc.stderr
        assert all(flag in proc.stdout for flag in flags)
    assert "GOPRO_Large" in proc.stdout and "GOPRO_shards" in proc.stdout


@pytest.mark.slow
def test_clis_end_to_end_with_default_paths(tmp_path):
    proc = _cli(
        "synth_gopro.py",
        "--out",
        "GOPRO_Large",
        "--train-pairs",
        "4",
        "--test-pairs",
        "2",
        "--height",
        "48",
        "--width",
        "64",
        "--no-progress",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "shard_gopro.py --src GOPRO_Large" in proc.stdout
    proc = _cli("shard_gopro.py", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "GOPRO_shards" in proc.stdout and "manifest.json" in proc.stdout
    manifest = read_manifest(tmp_path / "GOPRO_shards")
    assert manifest["splits"]["train"]["pairs"] == 4
    # the default formats: npy for training (the fastest to load), png for the test split (compact)
    for split, ext in (("train", "npy"), ("test", "png")):
        for shard in sorted((tmp_path / "GOPRO_shards" / split).glob("*.tar")):
            with tarfile.open(shard) as tar:
                names = tar.getnames()
            assert names and all(n.endswith((f".blur.{ext}", f".sharp.{ext}", ".json")) for n in names), names
    proc = _cli("synth_gopro.py", "--out", "GOPRO_Large", "--height", "48", "--width", "64", cwd=tmp_path)
    assert proc.returncode == 1 and "--overwrite" in proc.stderr and "Traceback" not in proc.stderr


def _break_missing_source(src: Path) -> tuple[Path, Path]:
    shutil.rmtree(src)
    return src, src


def _break_empty_source(src: Path) -> tuple[Path, Path]:
    shutil.rmtree(src)
    src.mkdir()
    return src, src / "train"


def _break_lonely_blur(src: Path) -> tuple[Path, Path]:
    sharp = sorted((src / "test").glob("*/sharp/*.png"))[-1]
    sharp.unlink()
    return src, sharp.parent.parent / "blur" / sharp.name


def _break_size_mismatch(src: Path) -> tuple[Path, Path]:
    sharp = sorted((src / "train").glob("*/sharp/*.png"))[-1]
    Image.new("RGB", (64, 40)).save(sharp)
    return src, sharp


def _break_undecodable(src: Path) -> tuple[Path, Path]:
    blur = sorted((src / "test").glob("*/blur/*.png"))[0]
    blur.write_bytes(b"\x89PNG\r\n\x1a\n this is not a PNG body" * 10)
    return src, blur


@pytest.mark.parametrize(
    "breaker",
    [_break_missing_source, _break_empty_source, _break_lonely_blur, _break_size_mismatch, _break_undecodable],
)
def test_bad_input_fails_before_writing_anything(breaker, dp_gopro, tmp_path):
    src = tmp_path / "GOPRO_Large"
    shutil.copytree(dp_gopro, src)
    src, culprit = breaker(src)
    out = tmp_path / "shards"
    proc = _cli("shard_gopro.py", "--src", str(src), "--out", str(out), "--workers", "2", "--no-progress")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert str(culprit) in proc.stderr
    assert not out.exists()
    if breaker is _break_missing_source:
        assert "synth_gopro.py" in proc.stderr and "CC BY 4.0" in proc.stderr


def test_motion_kernels_always_spread_over_most_of_their_canvas():
    """No near-delta kernels: a 'blurred' frame that is nearly sharp teaches little (and the demo's
    F learned to over-sharpen such frames), so every path reaches 60-100% of the canvas."""
    rng = np.random.default_rng(0)
    for size in (7, 11, 31):
        for _ in range(20):
            ys, xs = np.nonzero(motion_kernel(size, rng) > 1e-9)
            centre = (size - 1) / 2  # the path's time average sits here
            reach = max(np.abs(xs - centre).max(), np.abs(ys - centre).max())
            assert reach >= 0.6 * (centre - 0.5) - 1, (size, reach)


# ---------------------------------------------------------------- integrity: --verify and SIGKILL


@pytest.mark.slow
def test_verify_names_each_missing_truncated_or_changed_file(dp_shards, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(dp_shards, out)
    proc = _cli("shard_gopro.py", "--verify", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("ok: 6 files (") and str(out) in proc.stdout  # 3 shards + 3 indexes

    flipped = out / "train" / "train-000000.tar"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 3] ^= 0x01
    flipped.write_bytes(bytes(data))
    truncated = out / "train" / "train-000001.tar"
    truncated.write_bytes(truncated.read_bytes()[:-700])
    missing = out / "test" / "test-000000.tar"
    missing.unlink()
    missing_index = out / "train" / "train-000001.idx"
    missing_index.unlink()
    proc = _cli("shard_gopro.py", "--verify", str(out), "--no-progress")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"4 of 6 files in {out} are bad:"
    assert any(line.startswith(f"  changed: {flipped} has sha256 ") for line in lines), proc.stdout
    assert f"  truncated: {truncated} has {truncated.stat().st_size} of {truncated.stat().st_size + 700} bytes" in lines
    assert f"  missing: {missing}" in lines and f"  missing: {missing_index}" in lines
    assert not any("test-000000.idx" in line or "train-000000.idx" in line for line in lines), "good files named"

    (out / "manifest.json").unlink()
    proc = _cli("shard_gopro.py", "--verify", str(out))
    assert proc.returncode == 1 and str(out / "manifest.json") in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def kill_gopro(tmp_path_factory) -> Path:
    """Frames big enough (8 + 2 pairs of 192x256, jp2, one pair per shard) that a kill lands mid-run."""
    root = tmp_path_factory.mktemp("kill") / "GOPRO_Large"
    make_synthetic_gopro(
        root, seed=4, workers=1, train_pairs=8, test_pairs=2, height=192, width=256, frames_per_scene=2, progress=False
    )
    return root


KILL_ARGS = ("--format", "jp2", "--maxcount", "1", "--workers", "2", "--no-progress")


@pytest.fixture(scope="module")
def kill_reference(kill_gopro, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("kill_ref") / "shards"
    proc = _cli("shard_gopro.py", "--src", str(kill_gopro), "--out", str(out), *KILL_ARGS)
    assert proc.returncode == 0, proc.stderr
    return _tree(out)


def _finals(out: Path) -> dict[str, bytes]:
    """Files under their final names (not *.tmp-*)."""
    return {k: v for k, v in _tree(out).items() if ".tmp-" not in k} if out.exists() else {}


@pytest.mark.slow
@pytest.mark.parametrize("when", ["first temporary file", "first shard", "fifth shard"])
def test_sigkill_then_rerun_gives_the_uninterrupted_bytes(when, kill_gopro, kill_reference, tmp_path):
    """SIGKILL the whole process group (as SLURM or the OOM killer would) at a point of the run; every file
    under a final name is whole at any time, and the rerun ends byte-identical to an uninterrupted run."""
    import os
    import signal
    import time

    out = tmp_path / "shards"
    cmd = [
        sys.executable,
        str(REPO / "data_prep" / "shard_gopro.py"),
        "--src",
        str(kill_gopro),
        "--out",
        str(out),
        *KILL_ARGS,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            names = [p.name for p in out.rglob("*")] if out.exists() else []
            tars = [n for n in names if n.endswith(".tar")]
            if (
                (when == "first temporary file" and any(".tmp-" in n for n in names))
                or (when == "first shard" and tars)
                or (when == "fifth shard" and len(tars) >= 5)
            ):
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.002)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended ({proc.returncode}) before the kill at {when}"
    time.sleep(0.2)  # pool workers die with their group; let the file system settle
    finals = _finals(out)
    assert "manifest.json" not in finals
    for name, data in finals.items():
        assert kill_reference[name] == data, f"{name} is visible under its final name but not whole"
    rerun = _cli("shard_gopro.py", "--src", str(kill_gopro), "--out", str(out), *KILL_ARGS)
    assert rerun.returncode == 0, rerun.stderr
    assert _tree(out) == kill_reference


def test_lost_index_is_rewritten_on_rerun(dp_gopro, dp_shards, tmp_path):
    """A kill between a shard's rename and its index's: the rerun keeps the shard and rewrites the index."""
    out = tmp_path / "shards"
    shutil.copytree(dp_shards, out)
    (out / "manifest.json").unlink()
    (out / "train" / "train-000000.idx").unlink()
    (out / "test" / "test-000000.idx").write_text("v1.2 1\nstale\n")
    result = _shard(dp_gopro, out, workers=1)
    assert (result.written, result.reused) == (0, 3)
    assert _tree(out) == _tree(dp_shards)


# ---------------------------------------------------------------- parts (SLURM job arrays)


@pytest.mark.slow
def test_parts_then_merge_give_the_single_run_bytes(dp_gopro, dp_shards, tmp_path):
    out = tmp_path / "shards"
    # PNG in both splits, as the library call that made dp_shards writes them (the CLI's default for
    # training is npy)
    common = (
        "--src",
        str(dp_gopro),
        "--out",
        str(out),
        "--maxcount",
        "4",
        "--workers",
        "1",
        "--no-progress",
        "--format",
        "png",
    )
    proc = _cli("shard_gopro.py", *common, "--num-parts", "2", "--part", "1")
    assert proc.returncode == 0, proc.stderr
    assert sorted(_tree(out)) == ["parts/part-00001-of-00002.json", "train/train-000001.idx", "train/train-000001.tar"]
    proc = _cli("shard_gopro.py", *common, "--num-parts", "2", "--merge")
    assert proc.returncode == 1 and "1 of 2 parts are missing" in proc.stderr
    assert str(out / "parts" / "part-00000-of-00002.json") in proc.stderr and "--part 0" in proc.stderr
    assert not (out / "manifest.json").exists()
    assert _cli("shard_gopro.py", *common, "--num-parts", "2", "--part", "0").returncode == 0
    proc = _cli("shard_gopro.py", *common, "--num-parts", "2", "--merge", "--seed", "5")
    assert proc.returncode == 1 and "part-00000-of-00002.json was written with other arguments" in proc.stderr
    proc = _cli("shard_gopro.py", *common, "--num-parts", "2", "--merge")
    assert proc.returncode == 0, proc.stderr
    assert "merged 2 parts (3 shards)" in proc.stdout
    tree = _tree(out)
    assert {k: v for k, v in tree.items() if not k.startswith("parts/")} == _tree(dp_shards)
    # a part's shard lost after its record was written: --merge names it
    (out / "train" / "train-000001.tar").unlink()
    proc = _cli("shard_gopro.py", *common, "--num-parts", "2", "--merge")
    assert proc.returncode == 1 and f"{out / 'train' / 'train-000001.tar'} is missing: rerun part 1" in proc.stderr
    for bad in (("--num-parts", "2", "--part", "2"), ("--num-parts", "2", "--part", "0", "--merge"), ("--part", "0")):
        proc = _cli("shard_gopro.py", *common, *bad)
        assert proc.returncode == 2 and "--part" in proc.stderr, bad
