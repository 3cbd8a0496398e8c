"""Fixtures of the fault-injection suite: the outcome recorder, the fork server that starts training runs
cheaply, the reference (uninterrupted) runs, small tmpfs disks, and helpers to compare runs bit for bit.

Every fault test appends one JSON line per fault it injected to the results file
($GOLF_FAULT_RESULTS, default <repo>/runs/faults/results.jsonl, emptied once per pytest session):
    {"fault": ..., "target": ..., "injections": N, "outcome": "identical" | "named error" | "data lost", "detail": ...}
and still asserts the outcome it expects: a "data lost" row fails its test. A test that fails before it
records anything leaves a row with outcome "failed". launch/reliability_table.py turns the file into the
docs/reliability.md's table.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import (
    ROOT,
    mlflow_template,
    run_cli,
    write_config,
)  # tests/conftest.py (this folder is the package `faults`)
from filelock import FileLock
from fork_runs import ForkServer, server_for
from plain_runs import FORK_SERVER, PlainServer

OUTCOMES = ("identical", "named error", "data lost")
RESULTS_ENV = "GOLF_FAULT_RESULTS"

# The training runs of the suite: 6 steps of 32x32 crops, 4 per batch, a checkpoint every 2 steps, a log line
# every step (the step counter a test watches), validation only at the end; one thread (bitwise equality).
STEPS = 6
TRAIN = {"steps": STEPS, "checkpoint_every": 2, "log_every": 1, "val_every": STEPS, "keep_last": 2, "unroll": 2}
ONE_THREAD = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# ---------------------------------------------------------------- the results file


def results_path() -> Path:
    return Path(os.environ.get(RESULTS_ENV) or ROOT / "runs" / "faults" / "results.jsonl")


_lock = threading.Lock()
_fresh = False  # checked yet in this process
# One id for the whole pytest run: xdist gives its workers a shared one; a run without xdist is one process.
RUN_ID = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid-{os.getpid()}"


def _start_results() -> None:
    """Empty the results file once per pytest run, not once per worker: the file names the run that emptied it
    (a sidecar `.run` file, under a file lock), so a worker whose first fault test comes late does not wipe the
    rows the other worker already wrote."""
    global _fresh
    with _lock:
        if _fresh:
            return
        path = results_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        owner = path.with_name(path.name + ".run")
        with FileLock(str(path) + ".lock"):
            if not owner.exists() or owner.read_text() != RUN_ID:
                path.write_text("")
                owner.write_text(RUN_ID)
        _fresh = True


def write_row(row: dict) -> None:
    _start_results()
    with _lock, open(results_path(), "a") as fh:
        fh.write(json.dumps(row, sort_keys=True) + "\n")


@pytest.fixture(scope="session", autouse=True)
def _results_file():
    """The results file starts empty in each session that runs a fault test."""
    _start_results()
    yield results_path()


class Recorder:
    """`record(fault, target, injections, outcome, detail)` for one test; `expect` names what the test injects,
    so that a test failing before it records still leaves a row ("failed")."""

    def __init__(self, nodeid: str):
        self.nodeid = nodeid
        self.rows: list[dict] = []
        self.fault, self.target, self.injections = nodeid.rsplit("::", 1)[-1], "", 0

    def expect(self, fault: str, target: str) -> Recorder:
        self.fault, self.target = fault, target
        return self

    def __call__(self, fault: str, target: str, injections: int, outcome: str, detail: str = "") -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome {outcome!r} is not one of {OUTCOMES}")
        row = {
            "fault": fault,
            "target": target,
            "injections": int(injections),
            "outcome": outcome,
            "detail": detail,
            "test": self.nodeid,
        }
        self.rows.append(row)
        write_row(row)
        if outcome == "data lost":
            raise AssertionError(f"data lost: {fault} ({target}): {detail}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture()
def record(request):
    rec = Recorder(request.node.nodeid)
    yield rec
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed and not any(r["outcome"] == "data lost" for r in rec.rows):
        message = str(getattr(report, "longrepr", "") or "").strip().splitlines()
        last = next((line for line in reversed(message) if line.startswith("E ")), message[-1] if message else "")
        write_row(
            {
                "fault": rec.fault,
                "target": rec.target,
                "injections": rec.injections,
                "outcome": "failed",
                "detail": last[:300],
                "test": rec.nodeid,
            }
        )


class _OutageRecorder:
    """Rows for tests outside this folder when they run in the same session (the whole suite): the MLflow server
    killed mid-run and down from the start (tests/test_tracking_outage.py), a speed switch that fails on the
    machine (tests/test_speed_fallback.py), a hung trainer under SLURM (tests/test_slurm.py). Registered
    globally, so it sees tests outside this folder. Each passing test adds its rows; a failing one, "failed"."""

    OUTAGE = "training finished; every metric in metrics.jsonl; failed MLflow calls counted"
    TESTS = {
        ("test_tracking_outage.py", "test_server_killed_mid_run_training_finishes_and_nothing_is_lost"): [
            (
                "MLflow server SIGKILLed mid-run",
                "training run, stage f (tests/test_tracking_outage.py)",
                "identical",
                OUTAGE,
            )
        ],
        ("test_tracking_outage.py", "test_server_down_from_the_start_training_runs_and_reports"): [
            (
                "MLflow server down from the start",
                "training run, stage f (tests/test_tracking_outage.py)",
                "identical",
                OUTAGE,
            )
        ],
        (
            "test_speed_fallback.py",
            "test_training_falls_back_to_unfused_adam_when_the_fused_step_fails_and_matches_an_unfused_run",
        ): [
            (
                "fused Adam's step fails (speed.fused_adam=try)",
                "training run, stage f (tests/test_speed_fallback.py)",
                "identical",
                "fell back to the unfused Adam at start-up (warning, speed_fallback.json, MLflow tag); "
                "weights bitwise those of speed.fused_adam=off",
            )
        ],
        ("test_speed_fallback.py", "test_fused_adam_set_on_fails_the_run_with_its_error"): [
            (
                "fused Adam's step fails (speed.fused_adam=on)",
                "training run, stage f (tests/test_speed_fallback.py)",
                "named error",
                "the run failed at start-up with the fused step's error, before any checkpoint",
            )
        ],
        (
            "test_speed_fallback.py",
            "test_training_falls_back_when_the_fused_norm_kernel_fails_to_build_and_fails_with_it_set_on",
        ): [
            (
                "the Triton fused-norm kernel fails to build (speed.fused_norm=try)",
                "training run, stage f (tests/test_speed_fallback.py)",
                "identical",
                "fell back to eager InstanceNorm + ReLU at start-up (warning, speed_fallback.json, MLflow tag); "
                "weights bitwise those of speed.fused_norm=off",
            ),
            (
                "the Triton fused-norm kernel fails to build (speed.fused_norm=on)",
                "training run, stage f (tests/test_speed_fallback.py)",
                "named error",
                "the run failed at start-up with the build's error, before any checkpoint",
            ),
        ],
        ("test_slurm.py", "test_a_hung_training_is_requeued_where_configured_at_most_the_configured_times"): [
            (
                "a hung trainer (watchdog exit 124) under SLURM, GOLF_REQUEUE_ON_HANG=1 and =0",
                "SLURM job, stage f (tests/test_slurm.py)",
                "named error",
                "requeued while SLURM_RESTART_COUNT < GOLF_REQUEUE_ON_HANG_MAX, then FAILED; without the switch FAILED "
                "at once; the job log says why each time",
            )
        ],
    }

    def pytest_runtest_logreport(self, report):
        path, _, name = report.nodeid.partition("::")
        rows = self.TESTS.get((path.rsplit("/", 1)[-1], name))
        if rows is None or report.when != "call" or report.skipped:
            return
        for fault, target, outcome, detail in rows:
            write_row(
                {
                    "fault": fault,
                    "target": target,
                    "injections": 1,
                    "outcome": outcome if report.passed else "failed",
                    "detail": detail if report.passed else "the test failed",
                    "test": report.nodeid,
                }
            )


def pytest_configure(config):
    if not config.pluginmanager.has_plugin("golf-faults-outage-recorder"):
        config.pluginmanager.register(_OutageRecorder(), "golf-faults-outage-recorder")


# ---------------------------------------------------------------- the fork server


@pytest.fixture(scope="session")
def forkserver():
    """The fork server (tests/fork_runs.py) of single-threaded runs: the one `run_cli` uses under pytest-xdist.
    Runs write MLflow to a copy of the suite's initialised store (tests/conftest.py, `mlflow_template`), which
    `write_config` makes and the tests that make a store themselves make too. GOLF_TESTS_FORKSERVER=0: plain
    subprocesses instead (tests/plain_runs.py)."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, **ONE_THREAD}
    if FORK_SERVER:
        server = server_for(env)
    else:  # the environment server_for gives its children: without golf variables (each run sets its own)
        server = PlainServer({**{k: v for k, v in env.items() if not k.startswith("GOLF_")}, "PYTHONUNBUFFERED": "1"})
    mlflow_template()  # made while the server imports, not inside the first test's timing
    server.ready()
    return server


def train_config(path: Path, shards: Path, output_dir: Path, **sections) -> Path:
    """The suite's tiny config (TRAIN) writing MLflow to a copy of the initialised store beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    train = {**TRAIN, **sections.pop("train", {})}
    cfg = write_config(
        path,
        shards,
        output_dir,
        train=train,
        val={"max_pairs": 2, "sample_images": 0},
        eval={"iterations": 2},
        **sections,
    )
    return cfg


def train_argv(cfg: Path, stage: str, *overrides: str) -> list[str]:
    return ["launch/train.py", "--config", str(cfg), "--stage", stage, *overrides]


# ---------------------------------------------------------------- reference runs


class References:
    """Uninterrupted runs, one per (loader, stage), made on first use and shared by every test of the session.
    Stage g starts from the torch stage f reference's F (train.f_weights), as every stage g run here does."""

    def __init__(self, server: ForkServer, shards: Path, base: Path):
        self.server, self.shards, self.base = server, shards, base
        self._done: dict[tuple[str, str], Path] = {}

    def f_weights(self) -> Path:
        return self.get("torch", "f") / "f.safetensors"

    def overrides(self, loader: str, stage: str) -> list[str]:
        over = [f"data.loader={loader}"]
        if stage == "g":
            over.append(f"train.f_weights={self.f_weights()}")
        return over

    def _make(self, loader: str, stage: str) -> Path:
        folder = self.base / f"{loader}-{stage}"
        cfg = train_config(folder / "cfg.yaml", self.shards, folder / "out")
        run = self.server.run(train_argv(cfg, stage, *self.overrides(loader, stage)), folder / "run")
        run.check()
        return folder / "out"

    def get(self, loader: str, stage: str) -> Path:
        key = (loader, stage)
        if key not in self._done:
            self._done[key] = self._make(loader, stage)
        return self._done[key]

    def prefetch(self, keys: list[tuple[str, str]]) -> None:
        """Make several references two at a time (the runs are single-threaded: one per core)."""
        missing = [k for k in keys if k not in self._done]
        if any(stage == "g" for _, stage in missing):
            self.f_weights()
            missing = [k for k in missing if k not in self._done]
        in_parallel(*[(lambda k=k: self.get(*k)) for k in missing])


@pytest.fixture(scope="session")
def references(forkserver, shards, tmp_path_factory) -> References:
    return References(forkserver, shards, tmp_path_factory.mktemp("references"))


def in_parallel(*jobs):
    """Run the callables two at a time (2 cores); return their results in order, raise the first error."""
    if len(jobs) <= 1:
        return [job() for job in jobs]
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(job) for job in jobs]
        return [f.result() for f in futures]


# ---------------------------------------------------------------- comparing runs


def tensors_of(path: Path) -> dict:
    """Every tensor of a weights file, or of a checkpoint folder (model, EMA, Adam state), by name."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_file():
        return load_file(str(path))
    out = {f"model/{k}": v for k, v in load_file(str(path / "model.safetensors")).items()}
    optimizer = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    for pid, state in optimizer["optimizer"]["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                out[f"adam/{pid}/{name}"] = value
    return out


def differences(ref_out: Path, out: Path, stage: str) -> list[str]:
    """What differs between two output folders of a stage: the exported weights, the best weights and the
    last checkpoint's model and Adam state, bit for bit (empty: identical)."""
    import torch

    diffs = []
    last = f"{stage}/checkpoints/step-{STEPS:08d}"
    for rel in (f"{stage}.safetensors", f"{stage}_best.safetensors", last):
        a, b = Path(ref_out) / rel, Path(out) / rel
        if not b.exists():
            diffs.append(f"{rel} is missing")
            continue
        ta, tb = tensors_of(a), tensors_of(b)
        if ta.keys() != tb.keys():
            diffs.append(f"{rel}: other tensors")
            continue
        diffs += [f"{rel}:{k}" for k in ta if not torch.equal(ta[k], tb[k])][:3]
    return diffs


def leftovers(folder: Path) -> list[str]:
    """Temporaries under `folder`: what a writer leaves when it dies (.tmp-*, .old-*)."""
    return sorted(
        str(p.relative_to(folder)) for p in Path(folder).rglob("*") if ".tmp-" in p.name or p.name.startswith(".old-")
    )


# ---------------------------------------------------------------- small disks


def resize(path: Path, size: int) -> None:
    """Give a mounted tmpfs more room (an operator freeing space)."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True, capture_output=True)


# ---------------------------------------------------------------- shards


SHARD_ARGS = ("--format", "jp2", "--maxcount", 1, "--workers", 2, "--no-progress")  # 16 shards, ~1 s


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file under a final name (not a temporary `NAME.tmp-HOST-PID`, not a dot-file such as the cache state)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file()
        and ".tmp-" not in p.name
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    }


@pytest.fixture(scope="session")
def shard_source(shards) -> Path:
    """The GOPRO_Large-shaped source of the session's `shards` (12 train + 4 test pairs of 64x96)."""
    return shards.parent / "GOPRO_Large"


@pytest.fixture(scope="session")
def shard_reference(shard_source, tmp_path_factory) -> dict[str, bytes]:
    """The files of an uninterrupted `shard_gopro.py ... SHARD_ARGS` run: 16 shards, their indexes, the manifest."""
    out = tmp_path_factory.mktemp("shard-reference") / "shards"
    run_cli("data_prep/shard_gopro.py", "--src", shard_source, "--out", out, *SHARD_ARGS, check=True)
    files = files_of(out)
    assert sum(k.endswith(".tar") for k in files) == 16 and "manifest.json" in files
    return files
