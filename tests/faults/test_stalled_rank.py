"""A stalled rank: two processes under torchrun (gloo on the CPU); once training has checkpointed, rank 1 is
frozen with SIGSTOP (a peer that hangs without dying: torchrun sees nothing wrong). Rank 0 then waits in a
collective; after train.hang_timeout_s without progress its watchdog must dump every thread's stack, naming
the rank, to stderr and to f/hang-rank0.txt, end the MLflow run as FAILED and exit 124, so that torchrun exits
non-zero instead of the allocation burning until the process group's timeout."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import mlflow
import psutil
import pytest
from conftest import ROOT, wait_for_first_checkpoint  # tests/conftest.py

from .conftest import leftovers, train_config

HANG_TIMEOUT_S = 5  # the first step, checkpoints and validation get 3x this


def _rank_process(torchrun: subprocess.Popen, rank: int) -> psutil.Process:
    for child in psutil.Process(torchrun.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child
        except psutil.Error:
            continue
    raise AssertionError(f"no process of rank {rank} under torchrun")


@pytest.mark.slow
def test_a_stalled_rank_makes_the_other_dump_its_stacks_and_fail(shards, tmp_path, record):
    record.expect("a stalled rank (SIGSTOP on rank 1 of 2)", "training run, stage f, torchrun with 2 processes (gloo)")
    out = tmp_path / "out"
    cfg = train_config(
        tmp_path / "cfg.yaml", shards, out, train={"steps": 500, "val_every": 500, "hang_timeout_s": HANG_TIMEOUT_S}
    )
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    log = tmp_path / "torchrun.log"
    with open(log, "w") as fh:
        torchrun = subprocess.Popen(
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
                "data.loader=torch",
            ],
            cwd=ROOT,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    stalled = None
    try:
        wait_for_first_checkpoint(torchrun, out / "f" / "checkpoints", timeout=180)
        rank0, stalled = _rank_process(torchrun, 0), _rank_process(torchrun, 1)
        stalled.send_signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        rank0.wait(timeout=HANG_TIMEOUT_S * 3 + 30)  # a step (1x) or a checkpoint (3x), then the dump
        detected_s = time.monotonic() - frozen_at
        # torchrun would SIGKILL the frozen peer after its grace period (30 s); spare the test that wait
        stalled.kill()
        rc = torchrun.wait(timeout=60)
    finally:  # whatever failed: no process of the run left behind
        left = psutil.Process(torchrun.pid).children(recursive=True) if torchrun.poll() is None else []
        for proc in [*left, *([stalled] if stalled is not None else [])]:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        if torchrun.poll() is None:
            torchrun.kill()
            torchrun.wait()
    text = log.read_text(errors="replace")
    assert rc != 0, text[-3000:]
    # torchrun's report: rank 0 ended with the watchdog's status
    assert "124" in re.findall(r"exitcode\s*: (-?\d+)", text), text[-3000:]
    header = next((line for line in text.splitlines() if line.startswith("golf watchdog: rank 0 (pid ")), None)
    assert header is not None and "made no progress" in header and f"train.hang_timeout_s={HANG_TIMEOUT_S}" in header, (
        text[-3000:]
    )
    assert "golf watchdog: rank 1" not in text
    dump = (out / "f" / "hang-rank0.txt").read_text()
    assert dump.startswith(header) and "in _run_steps" in dump and "Thread 0x" in dump, dump[:3000]
    assert not leftovers(out)
    # the run is not left RUNNING in MLflow: rank 0's watchdog ended it as FAILED before exiting
    state = json.loads(next((out / "f" / "checkpoints").glob("step-*/state.json")).read_text())
    run = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(state["mlflow_run_id"])
    assert run.info.status == "FAILED", run.info.status
    record(
        "a stalled rank (SIGSTOP on rank 1 of 2)",
        "training run, stage f, torchrun with 2 processes (gloo)",
        1,
        "named error",
        f"rank 0 dumped every thread's stack (stderr, f/hang-rank0.txt) {detected_s:.0f} s after the "
        f"freeze (train.hang_timeout_s={HANG_TIMEOUT_S}) and exited 124; torchrun exited {rc}",
    )
