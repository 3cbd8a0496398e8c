"""Checkpoint integrity (issue 9, item 7): state.json records every other file's sha256; a file that
differs from its digest (altered, replaced, missing or slipped in) is a damaged checkpoint. load_latest
passes over it naming the file and both digests, train.resume_from stops before any training, and a
checkpoint written before the digests still loads (one warning that nothing was checked)."""

from __future__ import annotations

import hashlib
import json
import struct
import warnings
from pathlib import Path

import pytest
import torch
from conftest import run_cli, write_config
from safetensors.torch import load_file, save_file

from golf_dist.checkpoints import best_checkpoint, exported_weights, load_checkpoint, load_latest, save_checkpoint
from golf_dist.errors import DataError


def _save(root, step, value=0.0, ema=None, psnr=None):
    model = {"w": torch.full((4, 4), value)}
    opt = {"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    return save_checkpoint(
        root,
        step,
        model,
        {"optimizer": opt, "scheduler": {"last_epoch": step}},
        {"val_psnr": psnr},
        ema_state=None if ema is None else {"w": torch.full((4, 4), ema)},
    )


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _flip_tensor_byte(path: Path) -> None:
    """Change one byte of tensor data, past the header: the file still parses, with other values."""
    data = bytearray(path.read_bytes())
    header = struct.unpack("<Q", data[:8])[0]
    data[8 + header + 1] ^= 0x40
    path.write_bytes(bytes(data))


def _recorded(path: Path) -> dict:
    return json.loads((path / "state.json").read_text())["file_sha256"]


def test_state_json_records_each_file_sha256(tmp_path):
    path = _save(tmp_path, 1, ema=0.5)
    files = sorted(p.name for p in path.iterdir() if p.name != "state.json")
    assert files == ["ema.safetensors", "model.safetensors", "optimizer.pt", "rng.pt"]
    assert _recorded(path) == {name: _sha(path / name) for name in files}


def test_an_altered_model_that_still_parses_is_refused_and_load_latest_falls_back(tmp_path):
    _save(tmp_path, 1, value=1.0)
    newest = _save(tmp_path, 2, value=2.0)
    model = newest / "model.safetensors"
    expected = _sha(model)
    _flip_tensor_byte(model)
    altered = load_file(str(model))["w"]  # whole to safetensors: only the digest tells
    assert not torch.equal(altered, torch.full((4, 4), 2.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = load_latest(tmp_path)
    assert ckpt["path"].name == "step-00000001" and torch.equal(ckpt["model"]["w"], torch.full((4, 4), 1.0))
    [warning] = [str(w.message) for w in caught]
    assert str(model) in warning and expected in warning and _sha(model) in warning, warning
    assert "falling back to the previous checkpoint" in warning
    with pytest.raises(DataError, match=f"checkpoint file {model} does not match the sha256"):
        load_checkpoint(newest)


def test_a_replaced_pt_file_is_refused_before_it_is_unpickled(tmp_path):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    # a different optimizer state, itself a valid torch file: it loads, so only the digest can refuse it
    torch.save({"optimizer": {"state": {}, "param_groups": []}, "scheduler": {}}, newest / "optimizer.pt")
    with pytest.raises(DataError, match=r"optimizer\.pt does not match the sha256"):
        load_checkpoint(newest)
    # rng.pt replaced by a pickle that weights_only refuses: the error is the digest's, so it was not opened
    (newest / "rng.pt").write_bytes(b"\x80\x04cos\nsystem\n.")
    newest_opt = newest / "optimizer.pt"
    newest_opt.unlink()
    with pytest.raises(DataError, match=r"optimizer\.pt is missing \(state\.json records it with sha256"):
        load_checkpoint(newest)
    _save(tmp_path, 2)
    (newest / "rng.pt").write_bytes(b"\x80\x04cos\nsystem\n.")
    with pytest.raises(DataError, match=r"rng\.pt does not match the sha256"):
        load_checkpoint(newest)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert load_latest(tmp_path)["path"].name == "step-00000001"


def test_a_missing_or_unlisted_ema_is_refused(tmp_path):
    with_ema = _save(tmp_path / "a", 1, ema=0.5)
    (with_ema / "ema.safetensors").unlink()  # without the fix: loaded silently as a run with no EMA
    with pytest.raises(DataError, match=r"ema\.safetensors is missing"):
        load_checkpoint(with_ema)
    without = _save(tmp_path / "b", 1)
    save_file({"w": torch.zeros(4, 4)}, str(without / "ema.safetensors"))  # slipped in afterwards
    with pytest.raises(DataError, match=r"ema\.safetensors is not listed in .*state\.json"):
        load_checkpoint(without)


def test_a_malformed_digest_map_names_state_json(tmp_path):
    path = _save(tmp_path, 1)
    state = json.loads((path / "state.json").read_text())
    for bad in ({"../model.safetensors": "0" * 64}, {"model.safetensors": "not-hex"}, ["model.safetensors"]):
        (path / "state.json").write_text(json.dumps({**state, "file_sha256": bad}))
        with pytest.raises(DataError, match=f"checkpoint {path}: state.json's file_sha256 is not a map"):
            load_checkpoint(path)


def test_the_best_checkpoint_export_skips_altered_weights(tmp_path):
    _save(tmp_path, 1, value=1.0, psnr=20.0)
    best = _save(tmp_path, 2, value=2.0, ema=2.5, psnr=30.0)
    _flip_tensor_byte(best / "ema.safetensors")  # the exported file of the best checkpoint
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert best_checkpoint(tmp_path).name == "step-00000001"
    assert any(str(best / "ema.safetensors") in str(w.message) for w in caught)
    with pytest.raises(DataError, match=r"ema\.safetensors does not match the sha256"):
        exported_weights(best)


def test_a_checkpoint_written_before_the_digests_still_loads_with_one_warning(tmp_path):
    path = _save(tmp_path, 3, value=3.0, ema=3.5)
    state = json.loads((path / "state.json").read_text())
    del state["file_sha256"]  # what golf-dist wrote before this change
    (path / "state.json").write_text(json.dumps(state))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = load_latest(tmp_path)
    assert ckpt["path"] == path and torch.equal(ckpt["ema"]["w"], torch.full((4, 4), 3.5))
    assert [str(w.message) for w in caught] == [
        f"checkpoint {path} records no sha256 of its files (written by an older golf-dist): loaded without "
        "an integrity check"
    ]
    assert torch.equal(exported_weights(path)["w"], torch.full((4, 4), 3.5))


@pytest.mark.slow
def test_resume_from_an_altered_checkpoint_exits_naming_the_file_before_training(shards, tmp_path):
    """train.resume_from=<one checkpoint> whose weights were altered after it was written (still a valid
    safetensors file): exit 1 naming the file and both digests; nothing trained or written."""
    ckpt = _save(tmp_path / "elsewhere", 3, value=0.25)
    state = json.loads((ckpt / "state.json").read_text())
    (ckpt / "state.json").write_text(json.dumps({**state, "stage": "f", "global_batch": 4}))
    model = ckpt / "model.safetensors"
    expected = _sha(model)
    _flip_tensor_byte(model)
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "out")
    proc = run_cli("launch/train.py", "--config", cfg, "--stage", "f", f"train.resume_from={ckpt}")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    print("\n" + last)
    assert last.startswith(f"error: train.resume_from={ckpt}: checkpoint file {model} does not match the sha256")
    assert expected in last and _sha(model) in last and "Traceback" not in proc.stderr
    assert "resuming" not in proc.stdout and "loss" not in proc.stdout
    out = tmp_path / "out"
    assert not (out / "f.safetensors").exists() and not list(out.glob("f/checkpoints/step-*"))
