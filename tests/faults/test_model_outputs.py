"""What leaves the training tool must not destroy or mix what is there already: a deblur pointed at its own
inputs (issue 27: "an overwriting deblur") and ONNX graphs of two exports side by side ("a stale ONNX graph").
Each injected case is a real command line (launch/deblur.py, launch/export.py) on real files; the outcome is a
"named error" when the command refuses, exit status and message naming the file, and leaves every file as it
was; "data lost" when an input is replaced or a mismatched F + G pair runs."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image
from random_model import write_random_model


def _tree(root: Path) -> dict[str, str]:
    """Every file under root and the sha256 of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _photo(path: Path, seed: int, fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (10, 14, 3), dtype=np.uint8)).save(path, format=fmt)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_model(tmp_path_factory.mktemp("model"))


# ---------------------------------------------------------------- an overwriting deblur

OVERWRITE = "an overwriting deblur"


def test_deblur_never_overwrites_its_inputs(model_dir, tmp_path, record):
    """Each way of pointing --out at the inputs (their folder, a folder input's parent, the same through `..`,
    with --overwrite) is refused with exit 2 naming the input, and nothing under the photos' folder changes,
    not even the outputs of the other inputs of the same command (the whole plan is checked first)."""
    record.expect(OVERWRITE, "launch/deblur.py")
    photos = tmp_path / "photos"
    _photo(photos / "a.png", 0), _photo(photos / "sub" / "b.png", 1), _photo(photos / "c.jpg", 2, "JPEG")
    cases = {
        "--out the input file's folder": ([photos / "c.jpg", photos / "a.png"], photos, []),
        "--out the parent of a folder input": ([photos], tmp_path, []),
        "--out the parent, --overwrite": ([photos], tmp_path, ["--overwrite"]),
        "a folder input through '..'": ([photos / "sub" / ".."], tmp_path, ["--overwrite"]),
        "--out a subfolder of a folder input": ([photos / "sub" / "b.png"], photos / "sub", []),
    }
    for target, (inputs, out, flags) in cases.items():
        before = _tree(tmp_path)
        proc = run_cli(
            "launch/deblur.py",
            "--output-dir",
            model_dir,
            *inputs,
            "--out",
            out,
            "--iterations",
            "0",
            "--device",
            "cpu",
            *flags,
        )
        after = _tree(tmp_path)
        changed = sorted(name for name in set(before) | set(after) if before.get(name) != after.get(name))
        if any(name in before for name in changed):
            record(OVERWRITE, target, 1, "data lost", f"exit {proc.returncode}; replaced: {changed}")
        assert proc.returncode == 2 and "never overwrites its inputs" in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and not changed, changed  # the other inputs' outputs neither
        record(OVERWRITE, target, 1, "named error", proc.stderr.strip().splitlines()[-1][:200])


def test_deblur_keeps_existing_outputs_without_overwrite_and_stays_inside_out(model_dir, tmp_path, record):
    """An output that exists is replaced only with --overwrite (exit 2 naming the flag, nothing written,
    otherwise); a folder input given through `..` is written under --out, not beside it."""
    record.expect(OVERWRITE, "an existing output")
    photos, out = tmp_path / "in" / "photos", tmp_path / "out"
    _photo(photos / "a.png", 0), _photo(photos / "b.png", 1)
    earlier = _photo(out / "photos" / "b.png", 7)  # an earlier run's output
    kept = earlier.read_bytes()
    args = (
        "launch/deblur.py",
        "--output-dir",
        model_dir,
        photos / ".." / "photos",
        "--out",
        out,
        "--iterations",
        "0",
        "--device",
        "cpu",
    )
    proc = run_cli(*args)
    if earlier.read_bytes() != kept:
        record(OVERWRITE, "an existing output, no --overwrite", 1, "data lost", "replaced without --overwrite")
    assert proc.returncode == 2 and "--overwrite" in proc.stderr and str(earlier) in proc.stderr, proc.stderr[-2000:]
    assert not (out / "photos" / "a.png").exists()  # refused before anything was written
    record(
        OVERWRITE, "an existing output, no --overwrite", 1, "named error", proc.stderr.strip().splitlines()[-1][:200]
    )

    run_cli(*args, "--overwrite", check=True)
    assert _tree(tmp_path / "out").keys() == {"photos/a.png", "photos/b.png"} and earlier.read_bytes() != kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # nothing written beside --out


# ---------------------------------------------------------------- a stale ONNX graph

STALE = "a stale ONNX graph"


def _deblur_onnx(onnx_dir: Path, photo: Path, out: Path, iterations: int):
    return run_cli(
        "launch/deblur.py",
        "--output-dir",
        onnx_dir,
        photo,
        "--out",
        out,
        "--engine",
        "onnxruntime",
        "--iterations",
        str(iterations),
    )


@pytest.mark.slow
def test_onnx_graphs_of_two_exports_are_never_run_together(model_dir, tmp_path, record):
    """A G of another export beside F (swapped in by hand), a re-export of F alone over a pair, and a re-export
    whose G fails its parity check after F passed: the engine refuses a pair its manifest does not vouch for,
    naming the file; the export leaves no old G beside a new F and, when G fails, the folder as it was."""
    record.expect(STALE, "launch/export.py + launch/deblur.py --engine onnxruntime")
    onnx, photo = tmp_path / "onnx", _photo(tmp_path / "photo.png", 3)
    run_cli("launch/export.py", "--output-dir", model_dir, "--onnx", onnx, check=True)
    assert {p.name for p in onnx.iterdir()} == {"f.onnx", "g.onnx", "onnx.json"}
    assert _deblur_onnx(onnx, photo, tmp_path / "out", 1).returncode == 0

    # 1. g.onnx replaced by another graph (a real one: F's, which takes and gives the same shapes)
    swapped = tmp_path / "swapped"
    shutil.copytree(onnx, swapped)
    shutil.copy(onnx / "f.onnx", swapped / "g.onnx")
    proc = _deblur_onnx(swapped, photo, tmp_path / "out-swapped", 1)
    if proc.returncode == 0:
        record(STALE, "g.onnx of another export", 1, "data lost", "deblur ran F with a G not exported with it")
    assert proc.returncode == 1 and str(swapped / "g.onnx") in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out-swapped").exists()
    record(STALE, "g.onnx of another export", 1, "named error", proc.stderr.strip().splitlines()[-1][:200])

    # 1b. graphs no manifest vouches for (an export by an older version, or one killed half way)
    unvouched = shutil.copytree(onnx, tmp_path / "unvouched", ignore=shutil.ignore_patterns("onnx.json"))
    proc = _deblur_onnx(unvouched, photo, tmp_path / "out-unvouched", 1)
    if proc.returncode == 0:
        record(STALE, "graphs without a manifest", 1, "data lost", "deblur ran a pair nothing says belongs together")
    assert proc.returncode == 1 and str(unvouched / "onnx.json") in proc.stderr, proc.stderr[-2000:]
    record(STALE, "graphs without a manifest", 1, "named error", proc.stderr.strip().splitlines()[-1][:200])

    # 2. the training output now holds F alone (another run): its export must not leave the old G
    f_alone = tmp_path / "f-alone"
    write_random_model(f_alone, seed=1, with_g=False)
    stale = shutil.copytree(onnx, tmp_path / "stale")
    run_cli("launch/export.py", "--output-dir", f_alone, "--onnx", stale, check=True)
    proc = _deblur_onnx(stale, photo, tmp_path / "out-stale", 1)
    if proc.returncode == 0:
        record(STALE, "F re-exported alone over a pair", 1, "data lost", "deblur ran the new F with the old G")
    assert proc.returncode == 1 and "F alone" in proc.stderr and not (stale / "g.onnx").exists(), proc.stderr[-2000:]
    assert _deblur_onnx(stale, photo, tmp_path / "out-f-alone", 0).returncode == 0  # F alone still runs
    record(STALE, "F re-exported alone over a pair", 1, "named error", proc.stderr.strip().splitlines()[-1][:200])

    # 3. a new F passes its check, the new G fails it (NaN weights): nothing in the folder may change
    bad_g = write_random_model(tmp_path / "bad-g", seed=2, nan_g=True)
    before = _tree(onnx)
    proc = run_cli("launch/export.py", "--output-dir", bad_g, "--onnx", onnx)
    if _tree(onnx) != before:
        record(STALE, "G failing its parity check after F", 1, "data lost", "the folder changed: a new F, the old G")
    assert proc.returncode == 1 and "ONNX graph of G differs" in proc.stderr, proc.stderr[-2000:]
    assert _deblur_onnx(onnx, photo, tmp_path / "out-kept", 1).returncode == 0  # the old pair still runs
    record(STALE, "G failing its parity check after F", 1, "named error", proc.stderr.strip().splitlines()[-1][:200])
