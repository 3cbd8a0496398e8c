"""The DALI loader, in DALI's CPU-only mode: the PyTorch loader's batches, pixels, alignment, full-frame coverage,
exact resume with either loader at another world size, loader choice."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, log_lines, run_cli, start_cli, wait_for_first_checkpoint, write_config
from safetensors.torch import load_file
from test_loader import coordinate_shards  # noqa: F401  (pytest fixture: pixels that encode their coordinates)

from golf_dist.data.crop_plan import CropPlan, paired_crop
from golf_dist.data.dali import DaliTrainLoader, dali_full_frames
from golf_dist.data.loaders import make_train_loader, resolve_loader
from golf_dist.data.split_check import check_split, open_pairs
from golf_dist.data.torch_loader import ShardPairs, full_frame_loader, to_tensor, train_loader
from golf_dist.errors import ConfigError


def _loader(shard_dir, split="train", **kw):
    args = dict(
        crop=32, flips=True, crops_per_frame=1, per_device=4, rank=0, world=1, seed=1, device="cpu", num_threads=1
    )
    args.update(kw)
    return DaliTrainLoader(check_split(shard_dir, split), **args)


def _key(source: str) -> str:
    return source.rsplit(" ", 1)[-1]


def test_dali_crops_equal_the_torch_loader_crops_for_the_same_window_and_flips(shards):
    """Each DALI crop equals the PyTorch loader's decode of the same pair, cut with DALI's window and flips."""
    pairs = ShardPairs(shards, "train")
    by_key = {ref.key: i for i, ref in enumerate(pairs.refs)}
    loader = _loader(shards, crops_per_frame=2)
    flips_seen = set()
    for _ in range(4):
        blur, sharp = next(loader)
        assert blur.shape == sharp.shape == (4, 3, 32, 32) and blur.dtype == torch.float32
        for j, (window, source) in enumerate(zip(loader.last_windows, loader.last_sources)):
            top, left, hflip, vflip = (int(v) for v in window)
            flips_seen.add((hflip, vflip))
            frame_blur, frame_sharp, _ = pairs.load(by_key[_key(source)])
            b, s = paired_crop(frame_blur, frame_sharp, top, left, 32, bool(hflip), bool(vflip))
            assert torch.equal(blur[j], to_tensor(b)) and torch.equal(sharp[j], to_tensor(s)), source
    assert flips_seen == {(0, 0), (0, 1), (1, 0), (1, 1)}


@pytest.fixture(scope="module")
def format_shards(shards, tmp_path_factory):
    """The `shards` fixture's source pairs sharded again as png, jp2 and npy."""
    base = tmp_path_factory.mktemp("formats")
    out = {"png": shards}
    for fmt in ("jp2", "npy"):
        run_cli(
            "data_prep/shard_gopro.py",
            "--src",
            shards.parent / "GOPRO_Large",
            "--out",
            base / fmt,
            "--maxcount",
            4,
            "--workers",
            1,
            "--format",
            fmt,
            "--test-format",
            fmt,
            check=True,
        )
        out[fmt] = base / fmt
    return out


@pytest.mark.parametrize("fmt", ["png", "jp2", "npy"])
def test_dali_full_frames_equal_the_torch_loader_full_frames(format_shards, fmt):
    shards = format_shards[fmt]
    assert check_split(shards, "test").fmt == fmt
    torch_frames = {key: (b, s) for b, s, key, _ in full_frame_loader(ShardPairs(shards, "test"), 0, 1)}
    dali_frames = {key: (b, s) for b, s, key in dali_full_frames(check_split(shards, "test"), 0, 1)}
    assert dali_frames.keys() == torch_frames.keys() and len(dali_frames) == 4
    for key, (b, s) in dali_frames.items():
        assert torch.equal(b, torch_frames[key][0]) and torch.equal(s, torch_frames[key][1]), key


@pytest.mark.parametrize("fmt", ["jp2", "npy"])
def test_dali_crops_of_every_format_equal_the_png_pixels(format_shards, fmt):
    """Lossless formats through DALI: each crop equals the same window of the PNG source, via the torch loader."""
    pairs = ShardPairs(format_shards["png"], "train")
    by_key = {ref.key: i for i, ref in enumerate(pairs.refs)}
    loader = _loader(format_shards[fmt])
    for _ in range(3):
        blur, sharp = next(loader)
        for j, (window, source) in enumerate(zip(loader.last_windows, loader.last_sources)):
            top, left, hflip, vflip = (int(v) for v in window)
            b, s = paired_crop(*pairs.load(by_key[_key(source)])[:2], top, left, 32, bool(hflip), bool(vflip))
            assert torch.equal(blur[j], to_tensor(b)) and torch.equal(sharp[j], to_tensor(s)), source


def test_blur_and_sharp_share_window_and_flips(coordinate_shards):  # noqa: F811
    """Pixels encode (row, col); blur = sharp + 1 in blue: every crop pair must match position for position."""
    loader = _loader(coordinate_shards, crop=16, per_device=4, crops_per_frame=2)
    seen_flips, windows_per_frame = set(), []
    for _ in range(8):
        blur, sharp = (t.mul(255).round().byte().permute(0, 2, 3, 1).numpy() for t in next(loader))
        for b, s in zip(blur, sharp):
            assert np.array_equal(b[..., :2], s[..., :2])  # same window, same flips
            assert np.all(b[..., 2].astype(int) - s[..., 2] == 1)
            rows, cols = s[..., 0].astype(int), s[..., 1].astype(int)
            assert abs(cols[0, -1] - cols[0, 0]) == 15 and abs(rows[-1, 0] - rows[0, 0]) == 15
            seen_flips.add((bool(cols[0, 0] > cols[0, -1]), bool(rows[0, 0] > rows[-1, 0])))
        # crops_per_frame=2: crops 2j and 2j + 1 come from one decoded frame, each with its own window
        sources, windows = loader.last_sources, [tuple(w) for w in loader.last_windows]
        assert sources[0] == sources[1] != sources[2] == sources[3]
        windows_per_frame += [windows[0] != windows[1], windows[2] != windows[3]]
    assert seen_flips == {(False, False), (True, False), (False, True), (True, True)}
    assert sum(windows_per_frame) >= len(windows_per_frame) - 1  # two draws rarely give one window


@pytest.mark.parametrize("split, world", [("test", 3), ("train", 5), ("train", 1)])
def test_full_frames_cover_the_split_once_across_ranks(shards, split, world):
    checked = check_split(shards, split)
    per_rank = [[key for _, _, key in dali_full_frames(checked, rank, world)] for rank in range(world)]
    flat = [key for keys in per_rank for key in keys]
    assert sorted(flat) == sorted(ref.key for ref in ShardPairs(shards, split).refs)
    assert len(set(flat)) == len(flat)  # no padding repeat, no rank overlap


def test_ranks_read_disjoint_samples_in_training(shards):
    """Two ranks over one epoch of the 12 training pairs: 6 each, none shared."""
    keys = []
    for rank in range(2):
        loader = _loader(shards, per_device=2, rank=rank, world=2, flips=False)
        mine = set()
        for _ in range(3):
            next(loader)
            mine.update(_key(s) for s in loader.last_sources)
        keys.append(mine)
    assert len(keys[0]) == len(keys[1]) == 6 and not keys[0] & keys[1]


@pytest.mark.parametrize("crops_per_frame", [1, 2])
def test_dali_hands_out_the_torch_loaders_batches_from_any_step(shards, crops_per_frame):
    """Two ranks, two micro-batches per step, started at step 2 and run across the 12-pair epoch's end: every
    micro-batch DALI makes equals the PyTorch loader's, bit for bit (so a resume needs only the step)."""
    pairs = open_pairs(shards, "train")
    plan = CropPlan(len(pairs), 32, True, 1, crops_per_frame)
    for rank in range(2):
        torch_batches = iter(train_loader(pairs, plan, 8, 2, 2, rank, 2, 6, num_workers=0))
        dali = _loader(shards, per_device=2, accum=2, rank=rank, world=2, crops_per_frame=crops_per_frame, start_step=2)
        for _ in range(4 * 2):
            (b, s, _), (b2, s2) = next(torch_batches), next(dali)
            assert torch.equal(b, b2) and torch.equal(s, s2)
        dali.close()


def test_gradient_accumulation_does_not_change_what_dali_draws(shards):
    """One run per optimizer step: 2 micro-batches of 2 are the step's batch of 4, split."""
    whole, split = _loader(shards, per_device=4), _loader(shards, per_device=2, accum=2)
    for _ in range(3):
        b, s = next(whole)
        (b0, s0), (b1, s1) = next(split), next(split)
        assert torch.equal(b, torch.cat([b0, b1])) and torch.equal(s, torch.cat([s0, s1]))


def test_crops_per_frame_must_divide_the_per_device_batch(shards):
    with pytest.raises(ConfigError, match="data.crops_per_frame"):
        _loader(shards, per_device=4, crops_per_frame=3)
    with pytest.raises(ConfigError, match="data.crops_per_frame"):  # a frame's crops stay in one micro-batch
        _loader(shards, per_device=2, accum=2, crops_per_frame=4)


def test_auto_picks_dali_when_it_builds(shards):
    kind, why = resolve_loader("auto", check_split(shards, "train"), torch.device("cpu"))
    assert kind == "dali" and "auto" in why
    assert resolve_loader("torch")[0] == "torch"
    with pytest.raises(ConfigError, match="data.loader"):
        resolve_loader("fast")


# ---- through the trainer ---------------------------------------------------------------------------


def _no_dali_env(tmp_path: Path) -> dict:
    """A Python path on which `import nvidia.dali` fails, as on a machine without DALI."""
    fake = tmp_path / "no_dali" / "nvidia" / "dali"
    fake.mkdir(parents=True)
    (fake.parent / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("raise ImportError('No module named nvidia.dali (simulated: not installed)')\n")
    return {"PYTHONPATH": os.pathsep.join([str(fake.parent.parent), str(ROOT), str(ROOT / "tests")])}


@pytest.mark.slow
def test_auto_falls_back_to_torch_with_one_line_and_dali_without_dali_is_an_error(shards, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "out", train={"steps": 1, "log_every": 1})
    env = _no_dali_env(tmp_path)
    proc = run_cli("launch/train.py", "--config", cfg, "--stage", "f", "data.loader=auto", env=env, check=True)
    lines = [line for line in log_lines(proc.stdout) if line.startswith("data loader:")]
    assert lines == [lines[0]] and lines[0].startswith("data loader: torch (data.loader=auto and DALI is not usable")
    assert "simulated: not installed" in lines[0]
    proc = run_cli(
        "launch/train.py",
        "--config",
        cfg,
        "--stage",
        "f",
        "data.loader=dali",
        f"output_dir={tmp_path / 'out2'}",
        env=env,
    )
    assert proc.returncode == 2 and "data.loader" in proc.stderr and "Traceback" not in proc.stderr


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.mark.slow
def test_kill_and_resume_with_dali_is_bitwise_exact(shards, tmp_path):
    """SIGKILL after the first checkpoint, start again: the weights equal an uninterrupted DALI run's, bit for bit."""
    steps = {"steps": 12, "checkpoint_every": 4, "val_every": 12, "log_every": 4}
    data = {"loader": "dali"}
    ref_cfg = write_config(tmp_path / "ref.yaml", shards, tmp_path / "ref", train=steps, data=data)
    ref = run_cli("launch/train.py", "--config", ref_cfg, "--stage", "f", check=True)
    assert "data loader: dali" in ref.stdout

    cfg = write_config(tmp_path / "cut.yaml", shards, tmp_path / "cut", train=steps, data=data)
    run = start_cli("launch/train.py", "--config", cfg, "--stage", "f")
    ckpts = tmp_path / "cut" / "f" / "checkpoints"
    wait_for_first_checkpoint(run, ckpts)
    run.kill()  # SIGKILL
    assert not (tmp_path / "cut" / "f.safetensors").exists(), "the run finished before it was killed"
    first = sorted(p for p in ckpts.iterdir() if p.name.startswith("step-"))[0]
    state = json.loads((first / "state.json").read_text())
    assert state["data_loader"] == "dali" and "dali_reader_states" not in state  # the step is the position

    resumed = run_cli("launch/train.py", "--config", cfg, "--stage", "f", check=True)
    assert "resuming stage f from" in resumed.stdout
    _assert_same_weights(tmp_path / "ref" / "f.safetensors", tmp_path / "cut" / "f.safetensors")


@pytest.mark.slow
def test_a_two_process_dali_run_resumes_with_one_process_and_either_loader_to_the_same_weights(shards, tmp_path):
    """Two processes (gloo) with DALI for 2 steps; then the same checkpoint resumed with one process, once with
    DALI and once with the PyTorch loader: both hand out the same crops, so both end with the same weights."""
    cfg = write_config(
        tmp_path / "c.yaml",
        shards,
        tmp_path / "out",
        data={"loader": "dali"},
        train={"steps": 2, "checkpoint_every": 2, "val_every": 4, "log_every": 2},
    )
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(ROOT / "launch/train.py"),
            "--config",
            str(cfg),
            "--stage",
            "f",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = json.loads((tmp_path / "out" / "f" / "checkpoints" / "step-00000002" / "state.json").read_text())
    assert state["world_size"] == 2 and state["data_loader"] == "dali"
    shutil.copytree(tmp_path / "out", tmp_path / "out_torch")

    for loader, out in (("dali", tmp_path / "out"), ("torch", tmp_path / "out_torch")):
        more = run_cli(
            "launch/train.py",
            "--config",
            cfg,
            "--stage",
            "f",
            "train.steps=4",
            f"output_dir={out}",
            f"data.loader={loader}",
            check=True,
        )
        assert f"resuming stage f from {out / 'f' / 'checkpoints' / 'step-00000002'}" in more.stdout
    assert "was made with the dali loader, which hands out the same crops" in more.stdout
    _assert_same_weights(tmp_path / "out" / "f.safetensors", tmp_path / "out_torch" / "f.safetensors")


def test_factory_gives_the_torch_loader_the_same_contract(shards):
    from golf_dist.config import load_config

    cfg = load_config("gopro", "f", [f"data.shards={shards}", "data.crop=32", "data.num_workers=0", "seed=1"])
    pairs = ShardPairs(shards, "train")
    first = {}
    for kind in ("torch", "dali"):
        loader = make_train_loader(
            cfg, pairs, global_batch=4, accum=1, world=1, rank=0, start_step=0, device=torch.device("cpu"), loader=kind
        )
        blur, sharp = next(iter(loader))
        assert loader.kind == kind and blur.shape == sharp.shape == (4, 3, 32, 32)
        assert blur.dtype == torch.float32 and 0 <= float(blur.min()) and float(blur.max()) <= 1
        first[kind] = blur
        loader.close()
    assert torch.equal(first["torch"], first["dali"])


@pytest.mark.slow
def test_data_benchmark_prints_one_json_line_per_format_and_loader(format_shards):
    proc = run_cli(
        "launch/benchmark.py",
        "--what",
        "data",
        "--shards",
        format_shards["png"],
        format_shards["npy"],
        "--crop",
        32,
        "--batch",
        4,
        "--steps",
        2,
        "--warmup",
        1,
        "--repeats",
        1,
        "--workers",
        1,
        check=True,
    )
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert set(out["pairs_per_s"]) == {"png/torch", "png/dali", "npy/torch", "npy/dali"}
    assert all(v > 0 for v in out["pairs_per_s"].values())
    assert out["settings"]["crop"] == 32 and out["settings"]["batch"] == 4 and out["machine"] and out["cpu"]
    assert {r["frame"] for r in out["results"]} == {"96x64"}
    wrong = run_cli("launch/benchmark.py", "--what", "data")
    assert wrong.returncode == 2 and "--shards" in wrong.stderr
