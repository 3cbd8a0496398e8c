"""Preemption without SLURM: a signal or the stop file mid-run -> checkpoint at the next step boundary,
marker, clean exit; the rerun resumes and ends where an uninterrupted run ends (bitwise, 1 process)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    LONG_F,
    ONE_THREAD,
    ROOT,
    assert_weights_equal,
    run_cli,
    start_cli,
    wait_for_first_checkpoint,
    write_config,
)


def _env():
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(PYTHONUNBUFFERED="1", **ONE_THREAD)
    return env


def _steps(ckpts: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in ckpts.iterdir() if p.name.startswith("step-"))


@pytest.mark.slow
def test_sigusr2_checkpoints_exits_cleanly_and_the_rerun_matches_an_uninterrupted_run(
    shards, long_f_reference, tmp_path
):
    out = tmp_path / "cut"
    cfg = write_config(tmp_path / "cut.yaml", shards, out, train=LONG_F)
    run = start_cli("launch/train.py", "--config", cfg, "--stage", "f", env=ONE_THREAD)
    wait_for_first_checkpoint(run, out / "f" / "checkpoints")
    os.kill(run.pid, signal.SIGUSR2)
    status = run.wait(timeout=300)
    stdout, stderr = run.stdout, run.stderr
    assert status == 0, stderr[-3000:]
    assert "received SIGUSR2" in stderr
    assert not (out / "f.safetensors").exists(), "the run finished before the signal arrived"

    marker = json.loads((out / "f" / "PREEMPTED").read_text())
    stopped_at = marker["step"]
    assert 6 <= stopped_at < 60 and marker["reason"] == "signal"
    assert _steps(out / "f" / "checkpoints")[-1] == stopped_at  # the stop wrote its own checkpoint
    assert Path(marker["checkpoint"]).name == f"step-{stopped_at:08d}"
    assert f"stopped for preemption (signal) after step {stopped_at} of 60" in stdout

    resumed = run_cli("launch/train.py", "--config", cfg, "--stage", "f", env=ONE_THREAD, check=True)
    assert f"resuming stage f from {out / 'f' / 'checkpoints' / f'step-{stopped_at:08d}'}" in resumed.stdout
    assert not (out / "f" / "PREEMPTED").exists(), "a finished run keeps no preemption marker"
    assert_weights_equal(long_f_reference, out / "f.safetensors")


@pytest.mark.slow
def test_stop_file_stops_two_ranks_at_the_same_step_and_the_rerun_finishes(shards, tmp_path):
    """torchrun does not forward SIGUSR2, so the batch script touches OUTPUT_DIR/<stage>/STOP."""
    out = tmp_path / "two"
    # 24 steps: the stop lands a step or two after the first checkpoint (step 6), and the rerun has less to do
    cfg = write_config(tmp_path / "two.yaml", shards, out, train={**LONG_F, "steps": 24, "val_every": 24})
    cmd = [
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
    ]
    env = {**_env(), "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_first_checkpoint(proc, out / "f" / "checkpoints")
    stop_file = out / "f" / "STOP"
    stop_file.touch()
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]  # both ranks left cleanly (no hang, no kill)
    assert not (out / "f.safetensors").exists(), "the run finished before the stop file was seen"
    marker = json.loads((out / "f" / "PREEMPTED").read_text())
    assert marker["reason"] == f"stop file {stop_file}" and marker["step"] < 24
    assert _steps(out / "f" / "checkpoints")[-1] == marker["step"]
    assert stdout.count("stopped for preemption") == 1  # printed by the main process only

    # the STOP file is still there: the rerun must remove it rather than stop again at once
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"removed {stop_file} left by an earlier stop" in proc.stdout
    assert f"step-{marker['step']:08d} (step {marker['step']} of 24)" in proc.stdout
    assert (out / "f.safetensors").is_file() and not stop_file.exists()
    assert not (out / "f" / "PREEMPTED").exists()
    assert _steps(out / "f" / "checkpoints")[-1] == 24


def test_loader_workers_leave_sigterm_and_sigusr2_to_their_rank_and_still_end_on_its_own_sigterm():
    """The PyTorch loader's worker_init_fn: a SIGTERM or SIGUSR2 from anyone but the worker's rank (SLURM, a
    launcher signalling the rank's process group) leaves the worker serving batches; the rank's own SIGTERM
    (how the DataLoader and multiprocessing end their workers) still ends it."""
    import time

    import torch

    from golf_dist.training.preemption import leave_stop_signals_to_the_rank

    loader = torch.utils.data.DataLoader(
        range(1000), batch_size=1, num_workers=1, worker_init_fn=leave_stop_signals_to_the_rank
    )
    batches = iter(loader)
    assert int(next(batches)) == 0
    (worker,) = batches._workers  # the one worker process (multiprocessing.Process)
    for sig in ("TERM", "USR2"):  # sent by another process, as SLURM or torchrun sends it
        subprocess.run(["kill", f"-{sig}", str(worker.pid)], check=True)
    time.sleep(0.5)
    assert worker.is_alive()
    assert [int(next(batches)) for _ in range(3)] == [1, 2, 3]
    os.kill(worker.pid, signal.SIGTERM)  # from its parent, as Process.terminate() sends it
    worker.join(timeout=10)
    assert worker.exitcode == 0
    del batches
