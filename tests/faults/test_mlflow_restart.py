"""The MLflow server SIGKILLed and restarted in the middle of a training run (tests/test_tracking_outage.py
kills it without a restart, and runs in the whole suite; its outcome is recorded there too).

A real `mlflow server` (SQLite store) is SIGKILLed once the run has logged its second step; the trainer is
held (SIGSTOP) while a new server starts on the same port and store, then let go (SIGCONT). Expected: the
run finishes bitwise equal to an uninterrupted run, every step is in metrics.jsonl, the calls MLflow did
not get are counted in one line, and the restarted server holds what was logged before the kill and takes
new writes to the same run."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest
from conftest import log_lines, mlflow_template  # tests/conftest.py
from mlflow_servers import MlflowServer

from .conftest import STEPS, differences, train_argv, train_config
from .test_kill_training import logged_steps

FAULT = "MLflow server SIGKILLed and restarted mid-run"
TARGET = "training run, stage f (torch)"


@pytest.mark.slow
def test_mlflow_server_killed_and_restarted_mid_run(forkserver, references, tmp_path, record):
    import shutil

    record.expect(FAULT, TARGET)
    ref = references.get("torch", "f")
    store = tmp_path / "store"
    store.mkdir()
    shutil.copyfile(mlflow_template(), store / "mlflow.db")
    args = ["--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", "--artifacts-destination", str(store / "art")]
    quick = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job workers: a server up in half the time
    server = MlflowServer(args, log=store / "server.log", env=quick)
    restarted = None
    out = tmp_path / "out"
    cfg = train_config(tmp_path / "run" / "cfg.yaml", references.shards, out, tracking={"uri": server.url})
    run = forkserver.run(train_argv(cfg, "f", *references.overrides("torch", "f")), tmp_path / "train")
    metrics = out / "f" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 240
        while not (steps := logged_steps(metrics, 0)) or steps[-1] < 2:
            assert run.running(), f"the run ended before step 2:\n{run.stderr[-3000:]}"
            assert time.monotonic() < deadline, "no step 2 in 240 s"
            time.sleep(0.005)
        server.kill()
        record.injections = 1
        killed_after = logged_steps(metrics, 0)[-1]
        while "warning: MLflow call" not in run.stderr:  # the run meets the dead server (its next log line)
            assert run.running(), f"the run ended without meeting the dead server:\n{run.stderr[-3000:]}"
            assert time.monotonic() < deadline, "the run did not call MLflow after the kill"
            time.sleep(0.005)
        met_at = logged_steps(metrics, 0)[-1]
        os.killpg(run.pid, signal.SIGSTOP)  # the run is held while the server comes back
        try:
            restarted = MlflowServer(args, log=store / "server-2.log", env=quick, port=server.port)
        finally:
            os.killpg(run.pid, signal.SIGCONT)
        record.injections = 2
        rc = run.wait()
        assert rc == 0, f"the run stopped ({rc}):\n{run.stderr[-3000:]}"
        assert killed_after < STEPS, "the run had finished before the server was killed"

        diffs = differences(ref, out, "f")
        steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if "loss" in line]
        summary = [line for line in log_lines(run.stderr) if line.startswith("tracking: ")]
        assert len(summary) == 1 and re.search(r"tracking: \d+ MLflow call\(s\) could not be logged", summary[0]), (
            run.stderr[-3000:]
        )
        run_id = json.loads((out / "f_run.json").read_text())["mlflow_run_id"]

        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=restarted.url)
        before = [m.step for m in client.get_metric_history(run_id, "loss")]
        client.log_batch(run_id, metrics=[Metric("after_restart", 1.0, int(time.time() * 1000), 0)])
        after = client.get_run(run_id).data.metrics
        if diffs or steps != list(range(1, STEPS + 1)) or before[:1] != [1] or "after_restart" not in after:
            record(
                FAULT,
                TARGET,
                2,
                "data lost",
                f"differs from an uninterrupted run: {diffs}; metrics.jsonl steps {steps}; MLflow after the "
                f"restart holds loss steps {before}; a new write {'taken' if 'after_restart' in after else 'lost'}",
            )
    finally:
        if run.running():
            run.kill()
        for s in (server, restarted):
            if s is not None:
                s.kill()  # nothing of it is needed any more: no graceful shutdown to wait for
    record(
        FAULT,
        TARGET,
        2,
        "identical",
        f"killed after step {killed_after}; the run met the dead server by step {met_at} (one warning), was held "
        f"while a new server started on the same port and store, and went on; it "
        f"ended bitwise equal to an uninterrupted run, all {STEPS} steps in metrics.jsonl, "
        f"{summary[0].split(' (')[0][len('tracking: ') :]}; the restarted server has the {len(before)} step(s) logged "
        "before the kill and takes new writes to the run",
    )
