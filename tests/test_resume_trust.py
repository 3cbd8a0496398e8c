"""What a resume trusts (issue 27): a remote checkpoint without digests is refused unless
train.resume_unverified; with GOLF_CHECKPOINT_KEY every checkpoint carries an HMAC of its state.json and one
without a valid HMAC is refused; an explicit resume point is exact (its newest checkpoint or an error) and
only that checkpoint is downloaded; rank 0 resolves train.resume_from for every rank; state.json is
type-checked; prune renames before it deletes; the uploaded copies of pruned checkpoints go too; what a
killed download left is removed at the next start."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_DATA, mlflow_template, run_cli, write_config
from safetensors.torch import save_file

from golf_dist.checkpoints import clean_stale_temporaries, load_checkpoint, load_latest, read_state, save_checkpoint
from golf_dist.errors import DataError
from golf_dist.training.remote import load_resume_checkpoint
from golf_dist.training.state import TrainingState

KEY = "k3y-5d1e0c"  # stands for the team's secret: it must never be written or printed
FIRST = {"steps": 4, "checkpoint_every": 2, "keep_last": 1, "val_every": 4, "log_every": 2}


def _save(root: Path, step: int, value: float = 0.0, **state) -> Path:
    opt = {"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    return save_checkpoint(
        root,
        step,
        {"w": torch.full((4, 4), value)},
        {"optimizer": opt, "scheduler": {"last_epoch": step}},
        {"stage": "f", **state},
    )


def _edit_state(path: Path, edit) -> None:
    state = json.loads((path / "state.json").read_text())
    edit(state)
    (path / "state.json").write_text(json.dumps(state))


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A real MLflow SQLite store with its artifacts beside it, and one run to upload checkpoints to."""
    from mlflow.tracking import MlflowClient

    from golf_dist.tracking import local_artifact_root

    base = tmp_path_factory.mktemp("store")
    shutil.copyfile(mlflow_template(), base / "mlflow.db")
    uri = f"sqlite:///{base / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("trust", artifact_location=local_artifact_root(uri))
    return {"uri": uri, "client": client, "run_id": client.create_run(exp).info.run_id, "base": base}


def test_with_a_key_each_checkpoint_is_signed_and_a_forged_or_unsigned_one_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("GOLF_CHECKPOINT_KEY", KEY)
    path = _save(tmp_path, 3, value=1.0)
    signed = (path / "state.json").read_text()
    assert KEY not in signed and len(json.loads(signed)["state_hmac_sha256"]) == 64
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.full((4, 4), 1.0))

    # what the digests alone cannot catch: other weights, and their digest rewritten in state.json
    save_file({"w": torch.full((4, 4), 9.0)}, str(path / "model.safetensors"))
    forged = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    _edit_state(path, lambda s: s["file_sha256"].update({"model.safetensors": forged}))
    state_file = path / "state.json"
    with pytest.raises(DataError, match=f"checkpoint file {state_file}: its state_hmac_sha256 does not match"):
        load_checkpoint(path)
    # the HMAC removed as well: refused, unless train.resume_unverified (then one warning)
    _edit_state(path, lambda s: s.pop("state_hmac_sha256"))
    with pytest.raises(
        DataError,
        match=f"checkpoint file {state_file} carries no state_hmac_sha256 although GOLF_CHECKPOINT_KEY is set",
    ):
        load_checkpoint(path)
    with pytest.warns(UserWarning, match="loaded unverified"):
        assert load_checkpoint(path, allow_unverified=True)["model"]["w"][0, 0] == 9.0
    # the checkpoint as written, read with another key: refused, even under train.resume_unverified
    state_file.write_text(signed)
    save_file({"w": torch.full((4, 4), 1.0)}, str(path / "model.safetensors"))
    monkeypatch.setenv("GOLF_CHECKPOINT_KEY", "another key")
    with pytest.raises(DataError, match="does not match .*signed with another GOLF_CHECKPOINT_KEY"):
        load_checkpoint(path, allow_unverified=True)
    # a run's own checkpoints written before the key was set: the restart stops, not passes over them to step 0
    monkeypatch.delenv("GOLF_CHECKPOINT_KEY")
    unsigned = _save(tmp_path / "before", 2)
    monkeypatch.setenv("GOLF_CHECKPOINT_KEY", KEY)
    with pytest.raises(DataError, match=f"checkpoint file {unsigned / 'state.json'} carries no state_hmac_sha256"):
        load_latest(tmp_path / "before")


def test_a_remote_checkpoint_without_digests_is_refused_unless_opted_in(store, tmp_path):
    ckpt = _save(tmp_path / "local", 3, value=3.0)
    _edit_state(ckpt, lambda s: s.pop("file_sha256"))  # anyone who can write the store can do this
    store["client"].log_artifacts(store["run_id"], str(ckpt), "unsigned/step-00000003")
    uri = f"runs:/{store['run_id']}/unsigned/step-00000003"
    scratch = tmp_path / "scratch"
    with pytest.raises(DataError) as err:
        load_resume_checkpoint(uri, scratch, store["uri"])
    assert str(err.value).startswith(
        f"train.resume_from={uri}: checkpoint file {uri}/state.json records no file_sha256"
    ), err.value
    assert "train.resume_unverified=true" in str(err.value)
    with pytest.warns(UserWarning, match="records no sha256"):
        loaded = load_resume_checkpoint(uri, scratch, store["uri"], allow_unverified=True)
    assert loaded["path"] == uri and torch.equal(loaded["model"]["w"], torch.full((4, 4), 3.0))
    with pytest.warns(UserWarning, match="records no sha256"):  # a local one: the disk's trust, as before
        assert load_resume_checkpoint(str(ckpt), scratch, None)["state"]["step"] == 3
    assert not list(scratch.iterdir()), "a download was left behind"


def test_an_explicit_folder_resumes_from_its_newest_checkpoint_exactly(store, tmp_path):
    # a local folder whose newest checkpoint was altered: an error naming the file, not the older one instead
    _save(tmp_path / "local", 1, value=1.0)
    newest = _save(tmp_path / "local", 2, value=2.0)
    model = newest / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[8 + struct.unpack("<Q", data[:8])[0] + 1] ^= 0x40
    model.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"checkpoint file {model} does not match the sha256"):
        load_resume_checkpoint(str(tmp_path / "local"), tmp_path / "scratch", None)

    # a folder in the store: only its newest checkpoint is downloaded (an older one the store cannot serve,
    # a file that is a dangling link, would stop a download of the whole folder)
    _save(tmp_path / "remote", 1, value=1.0)
    _save(tmp_path / "remote", 2, value=2.0)
    store["client"].log_artifacts(store["run_id"], str(tmp_path / "remote"), "folder")
    [older] = store["base"].glob(f"mlartifacts/{store['run_id']}/artifacts/folder/step-00000001")
    (older / "broken").symlink_to(tmp_path / "nowhere")
    uri = f"runs:/{store['run_id']}/folder"
    loaded = load_resume_checkpoint(uri, tmp_path / "scratch", store["uri"])
    assert loaded["path"] == f"{uri}/step-00000002" and loaded["model"]["w"][0, 0] == 2.0


@pytest.mark.slow
def test_resume_from_every_rank_loads_rank_0s_choice_or_all_stop_naming_it(tmp_path):
    """2 gloo processes, each seeing its own copy of the same relative train.resume_from (node-local disks):
    rank 1 loads the checkpoint rank 0 resolved, not its own newest; when its copy of that checkpoint
    differs, both ranks stop with one error naming it."""
    chosen = _save(tmp_path / "stale" / "rank0" / "checkpoints", 3, value=3.0)
    shutil.copytree(chosen, tmp_path / "stale" / "rank1" / "checkpoints" / chosen.name)
    _save(tmp_path / "stale" / "rank1" / "checkpoints", 5, value=5.0)  # newer, on rank 1 only
    _save(tmp_path / "changed" / "rank0" / "checkpoints", 3, value=3.0)
    _save(tmp_path / "changed" / "rank1" / "checkpoints", 3, value=7.0)  # the same name, other weights
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(ROOT / "tests" / "resume_ranks_worker.py"),
        "--resume-from",
        str(tmp_path),
        "stale",
        "changed",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]  # the "changed" case stopped both ranks: no hang, non-zero
    results = {
        (case, rank): json.loads((tmp_path / f"{case}-rank{rank}.json").read_text())
        for case in ("stale", "changed")
        for rank in (0, 1)
    }
    for rank in (0, 1):
        assert results["stale", rank] == {"path": "checkpoints/step-00000003", "step": 3, "value": 3.0}, results
        error = results["changed", rank]["error"]
        assert error.startswith(
            "rank 0 resumes from checkpoint checkpoints/step-00000003, but rank(s) 1 cannot "
            "load it (rank 1: checkpoints/step-00000003: its state.json differs from the one "
            "rank 0 loaded"
        ), error


def test_a_state_json_of_the_wrong_type_is_refused_naming_file_and_key(tmp_path):
    _save(tmp_path, 1, value=1.0)
    bad = _save(tmp_path, 2, value=2.0)
    _edit_state(bad, lambda s: s.update(step="3x"))  # valid JSON, not a step
    with pytest.raises(DataError, match=f"checkpoint {bad}: state.json's step is '3x', not a step number"):
        read_state(bad)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_latest(tmp_path)["path"].name == "step-00000001"
    assert any("step-00000002: state.json's step is '3x'" in str(w.message) for w in caught), caught
    for key, value in (("val_psnr", "high"), ("global_batch", "4"), ("global_batch", True), ("stage", 6)):
        with pytest.raises(DataError, match=f"checkpoint file {bad}/state.json: {key} is {value!r}, not a"):
            TrainingState.from_json({"step": 2, key: value}, source=bad / "state.json")


@pytest.mark.slow
def test_a_kill_mid_prune_leaves_whole_checkpoints_and_a_temporary_that_is_cleaned(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step, value=float(step))
    # prune(keep_last=1) in a process that SIGKILLs itself right after its first file deletion
    code = (
        "import os, signal, sys; from pathlib import Path; from golf_dist.checkpoints import prune\n"
        "real = os.unlink\n"
        "def unlink(*args, **kwargs):\n"
        "    real(*args, **kwargs); os.kill(os.getpid(), signal.SIGKILL)\n"
        "os.unlink = unlink\n"
        "prune(Path(sys.argv[1]), keep_last=1)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    clean_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003"]
    assert load_checkpoint(tmp_path / "step-00000003")["model"]["w"][0, 0] == 3.0


def test_a_download_of_a_killed_process_is_removed_at_the_next_start(tmp_path):
    stale = tmp_path / f".resume-ab12cd-{_dead_pid()}"
    live = tmp_path / f".resume-ef34gh-{os.getppid()}"  # a running process's download stays
    for folder in (stale, live):
        (folder / "step-00000003").mkdir(parents=True)
    assert clean_stale_temporaries(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name]


# ---- the command line: a run that signs its checkpoints and uploads them to a SQLite store ------------


@pytest.fixture(scope="module")
def signed_run(tiny_shards, tmp_path_factory):
    base = tmp_path_factory.mktemp("signed")
    cfg = write_config(
        base / "a.yaml", tiny_shards, base / "a", data=TINY_DATA, train=FIRST, tracking={"log_checkpoints": True}
    )
    proc = run_cli("launch/train.py", "--config", cfg, "--stage", "f", env={"GOLF_CHECKPOINT_KEY": KEY}, check=True)
    run_id = json.loads((base / "a" / "f_run.json").read_text())["mlflow_run_id"]
    return {"base": base, "run_id": run_id, "proc": proc, "store": base / "mlartifacts"}


@pytest.mark.slow
def test_uploaded_checkpoints_are_pruned_with_the_local_ones(signed_run):
    [uploaded] = signed_run["store"].glob("*/artifacts")  # one run, keep_last 1: step 2 went, here and there
    assert sorted(p.name for p in (uploaded / "checkpoints").iterdir()) == ["step-00000004"]
    assert sorted(p.name for p in (signed_run["base"] / "a" / "f" / "checkpoints").iterdir()) == ["step-00000004"]


@pytest.mark.slow
def test_a_signed_run_resumes_from_its_uploaded_folder_and_refuses_another_key(signed_run, tiny_shards):
    base, uri = signed_run["base"], f"runs:/{signed_run['run_id']}/checkpoints"
    stale = base / "b" / "f" / f".resume-ab12cd-{_dead_pid()}"  # what a killed download left
    stale.mkdir(parents=True)
    cfg = write_config(base / "b.yaml", tiny_shards, base / "b", data=TINY_DATA, train={**FIRST, "steps": 6})
    proc = run_cli(
        "launch/train.py",
        "--config",
        cfg,
        "--stage",
        "f",
        f"train.resume_from={uri}",
        env={"GOLF_CHECKPOINT_KEY": "another key"},
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    print("\n" + last)
    assert last.startswith(
        f"error: train.resume_from={uri}: checkpoint file {uri}/step-00000004/state.json: its "
        "state_hmac_sha256 does not match"
    ), last
    assert not (base / "b" / "f.safetensors").exists() and not list((base / "b" / "f").glob("checkpoints/step-*"))

    proc = run_cli(
        "launch/train.py",
        "--config",
        cfg,
        "--stage",
        "f",
        f"train.resume_from={uri}",
        env={"GOLF_CHECKPOINT_KEY": KEY},
        check=True,
    )
    assert f"resuming stage f from {uri}/step-00000004 (step 4 of 6)" in proc.stdout, proc.stdout[-2000:]
    assert not list((base / "b" / "f").glob(".resume-*")), "a download was left behind"
    everything = signed_run["proc"].stdout + signed_run["proc"].stderr + proc.stdout + proc.stderr
    assert KEY not in everything and not any(
        KEY in p.read_text(errors="replace")
        for p in base.rglob("*")
        if p.is_file() and p.suffix in (".json", ".yaml", ".jsonl")
    )


def test_a_mistyped_state_json_stops_a_resume_naming_file_and_key(tiny_shards, tmp_path):
    ckpt = _save(tmp_path / "elsewhere", 2, global_batch="2")  # valid JSON; before: a batch-size mismatch
    cfg = write_config(tmp_path / "c.yaml", tiny_shards, tmp_path / "out", data=TINY_DATA, train=FIRST)
    proc = run_cli("launch/train.py", "--config", cfg, "--stage", "f", f"train.resume_from={ckpt}")
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"error: checkpoint file {ckpt}/state.json: global_batch is '2', not an int (damaged or altered)"
    assert "Traceback" not in proc.stderr and not (tmp_path / "out" / "f.safetensors").exists()
