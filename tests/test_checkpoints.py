import warnings

import pytest
import torch

from golf_dist.checkpoints import (
    best_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    load_weights,
    prune,
    save_checkpoint,
    save_weights,
)
from golf_dist.errors import DataError


def _save(root, step, psnr=None, value=0.0):
    model = {"w": torch.full((2, 2), value)}
    opt = {"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    return save_checkpoint(root, step, model, {"optimizer": opt, "scheduler": {"last_epoch": step}}, {"val_psnr": psnr})


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    torch.manual_seed(5)
    path = _save(tmp_path, 7, psnr=21.5, value=3.0)
    expected = torch.rand(3)
    torch.manual_seed(99)
    ckpt = load_checkpoint(path)
    assert ckpt["state"]["step"] == 7 and ckpt["state"]["val_psnr"] == 21.5
    assert torch.equal(ckpt["model"]["w"], torch.full((2, 2), 3.0))
    assert torch.equal(ckpt["optimizer"]["optimizer"]["state"][0]["exp_avg"], torch.ones(2))
    from golf_dist.checkpoints import set_rng_state

    set_rng_state(ckpt["rng"])
    assert torch.equal(torch.rand(3), expected)


def test_temporary_folders_are_never_listed(tmp_path):
    _save(tmp_path, 1)
    (tmp_path / ".tmp-step-00000002-123").mkdir()
    (tmp_path / "step-00000003").mkdir()  # no state.json: incomplete, not a checkpoint
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001"]


def test_prune_keeps_last_k_and_the_best(tmp_path):
    for step, psnr in [(1, 20.0), (2, 25.0), (3, 21.0), (4, 22.0), (5, None)]:
        _save(tmp_path, step, psnr)
    removed = prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == ["step-00000001", "step-00000003"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000004", "step-00000005"]
    assert best_checkpoint(tmp_path).name == "step-00000002"


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path):
    _save(tmp_path, 1, value=1.0)
    newest = _save(tmp_path, 2, value=2.0)
    (newest / "model.safetensors").write_bytes(b"\0" * 10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = load_latest(tmp_path)
    assert ckpt["state"]["step"] == 1 and torch.equal(ckpt["model"]["w"], torch.full((2, 2), 1.0))
    assert any("step-00000002" in str(w.message) and "falling back" in str(w.message) for w in caught)


def test_saving_the_same_step_again_replaces_it_whole(tmp_path):
    _save(tmp_path, 4, value=1.0)
    _save(tmp_path, 4, value=2.0)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000004"]
    assert torch.equal(load_checkpoint(tmp_path / "step-00000004")["model"]["w"], torch.full((2, 2), 2.0))


def test_weights_files_are_atomic_and_checked(tmp_path):
    path = save_weights({"a": torch.arange(4.0)}, tmp_path / "w.safetensors", {"stage": "f"})
    assert torch.equal(load_weights(path)["a"], torch.arange(4.0))
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    with pytest.raises(DataError, match="bad.safetensors"):
        load_weights(tmp_path / "bad.safetensors")
