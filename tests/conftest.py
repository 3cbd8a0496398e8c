"""Shared fixtures: a small synthetic GoPro set, its shards and a tiny training config, made once
per test session through the project's own command lines."""

from __future__ import annotations

import atexit
import functools
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

# Under pytest-xdist the workers share the cores: unless OMP_NUM_THREADS is set, each worker, and every
# command it runs (they inherit its environment), gets cores / workers threads. Two workers whose torch each
# ran a thread per core would keep twice as many busy threads as cores, waiting on each other.
# Set before numpy and torch are imported: both size their thread pools at import.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and "OMP_NUM_THREADS" not in os.environ:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ["OMP_NUM_THREADS"] = str(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

import numpy as np
import pytest
import torch
import yaml
from fork_runs import Run, forked_run, start_forked, start_up_part
from PIL import Image
from plain_runs import FORK_SERVER, start_plain
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
_LOG_DATE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")


@pytest.fixture(autouse=True)
def _mlflow_tracking_uri_left_as_it_was():
    """MLFLOW_TRACKING_URI wins over a config's tracking.uri (golf_dist.tracking.resolve_uri), so a test that
    leaves it changed (mlflow.set_tracking_uri writes it) sends the runs of every later test in its pytest
    process to another store. Under pytest-xdist one did: the disk-full fault test found its metrics missing
    from its own store. Fail the test that leaves it changed instead."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    after = os.environ.get("MLFLOW_TRACKING_URI")
    assert after == before, f"the test left MLFLOW_TRACKING_URI={after!r} (it was {before!r})"


def log_lines(text: str) -> list[str]:
    """The lines of a run's stdout or stderr with golf_dist.log's date taken off each log line."""
    return [_LOG_DATE.sub("", line) for line in text.splitlines()]


def _cli_env(env: dict | None = None) -> dict[str, str]:
    """The environment of a command line a test runs: the test's, less MLFLOW_TRACKING_URI (each config names
    its store), unbuffered output, and `env`."""
    full = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    full["PYTHONUNBUFFERED"] = "1"
    return {**full, **{k: str(v) for k, v in (env or {}).items()}}


def start_cli(script: str, *args, env: dict | None = None) -> Run:
    """Start one of the project's command lines in a process of its own (a child of the fork server,
    tests/fork_runs.py) and return at once: a Run to poll (`running()`, `wait()`), signal (`pid`, the leader
    of its own process group) or kill, whose output is in `stdout` and `stderr`. GOLF_TESTS_FORKSERVER=0: a
    plain subprocess (tests/plain_runs.py)."""
    return (start_forked if FORK_SERVER else start_plain)(script, args, _cli_env(env))


def wait_for_first_checkpoint(proc: subprocess.Popen | Run, ckpts: Path, timeout: float = 300) -> None:
    """Until `ckpts` holds a step-* folder; fails if the run (a Popen or a `start_cli` Run) ends first."""
    deadline = time.time() + timeout
    while not (ckpts.is_dir() and any(p.name.startswith("step-") for p in ckpts.iterdir())):
        ended = not proc.running() if isinstance(proc, Run) else proc.poll() is not None
        if ended or time.time() > deadline:
            detail = proc.stderr[-3000:] if isinstance(proc, Run) else ""
            raise AssertionError(f"run ended before its first checkpoint\n{detail}")
        time.sleep(0.02)


def run_cli(
    script: str, *args: str, env: dict | None = None, timeout: int = 600, check: bool = False, fresh: bool = False
):
    """Run one of the project's command lines as a user would, in a process of its own; returns the
    CompletedProcess. Where `env` leaves the variables read at start-up (PYTHONPATH, OMP_NUM_THREADS, ...) as
    the suite's, the process is a child of the fork server (tests/fork_runs.py), which has done the imports
    already; otherwise, or with `fresh`, or with GOLF_TESTS_FORKSERVER=0, a new interpreter (what a command's own
    imports do is then tested)."""
    base_env, full_env = _cli_env(), _cli_env(env)
    if FORK_SERVER and not fresh and start_up_part(full_env) == start_up_part(base_env):
        proc = forked_run(script, [str(a) for a in args], full_env, timeout)
    else:
        proc = subprocess.run(
            [sys.executable, str(ROOT / script), *map(str, args)],
            capture_output=True,
            text=True,
            env=full_env,
            timeout=timeout,
            cwd=ROOT,
        )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{script} {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def built_once(tmp_path_factory, name: str, build):
    """`build(folder)` run once per test session and its JSON result returned. Under pytest-xdist the workers
    share it: the first to ask builds it in the session's common temp folder under a file lock, the others wait
    and read its result (each worker would otherwise make its own copy of the same data and runs). A build
    that failed is retried by the next worker to ask, in a fresh folder."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return build(tmp_path_factory.mktemp(name))
    from filelock import FileLock  # a dependency of torch

    common = tmp_path_factory.getbasetemp().parent  # pytest-N/, holding each worker's popen-gwN/
    folder, result = common / f"shared-{name}", common / f"shared-{name}.json"
    with FileLock(str(common / f"shared-{name}.lock")):
        if not result.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            result.write_text(json.dumps(build(folder)))
        return json.loads(result.read_text())


def _make_shards(base: Path, train: int = 12, test: int = 4, height: int = 64, width: int = 96) -> str:
    run_cli(
        "data_prep/synth_gopro.py",
        "--out",
        base / "GOPRO_Large",
        "--train-pairs",
        train,
        "--test-pairs",
        test,
        "--height",
        height,
        "--width",
        width,
        "--seed",
        3,
        check=True,
    )
    run_cli(
        "data_prep/shard_gopro.py",
        "--src",
        base / "GOPRO_Large",
        "--out",
        base / "shards",
        "--maxcount",
        4,
        "--workers",
        1,
        "--format",
        "png",
        check=True,
    )
    return str(base / "shards")


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """12 train + 4 test synthetic pairs of 64x96, sharded 4 pairs per shard, PNG in both splits (not the
    CLI's npy default for training): the bad-sample tests rewrite PNG members (of a copy: tests only read
    this folder, which every worker shares); npy shards have their own fixtures (tests/test_dali.py,
    tests/test_shard_formats.py)."""
    return Path(built_once(tmp_path_factory, "data", _make_shards))


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """4 train + 1 test synthetic pairs of 32x48, PNG: for the bf16 runs. On a CPU without oneDNN bf16
    kernels (AVX2 only) a bf16 convolution takes a reference path whose time grows faster than the pixel
    count: F on one of these frames is over ten times faster than on one 64x96 frame of `shards`."""
    return Path(
        built_once(tmp_path_factory, "tiny-data", functools.partial(_make_shards, train=4, test=1, height=32, width=48))
    )


# the data section of the bf16 runs on `tiny_shards`: the smallest crop the config allows (32), 2 per batch
TINY_DATA = {"crop": 32, "batch_size": 2}


@functools.cache
def mlflow_template() -> Path:
    """An empty MLflow SQLite store with its schema in place, made once per session by MLflow itself."""
    folder = Path(tempfile.mkdtemp(prefix="golf-mlflow-template-"))
    atexit.register(shutil.rmtree, folder, True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    subprocess.run(
        [sys.executable, str(ROOT / "tests" / "mlflow_template.py"), str(folder / "mlflow.db")],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return folder / "mlflow.db"


def write_config(path: Path, shards: Path, output_dir: Path, **sections) -> Path:
    """A tiny CPU config: 32x32 crops, batch 4, no perceptual term, MLflow in a SQLite store beside the config
    (a copy of `mlflow_template()` where none is there yet, unless `tracking` names another store)."""
    db = path.parent / "mlflow.db"
    cfg = {
        "seed": 1,
        "output_dir": str(output_dir),
        "data": {"shards": str(shards), "crop": 32, "batch_size": 4, "num_workers": 0},
        "loss": {"perceptual_weight": 0},
        "train": {
            "steps": 6,
            "lr": 1e-3,
            "lr_decays": 1,
            "unroll": 3,
            "log_every": 2,
            "val_every": 3,
            "checkpoint_every": 3,
            "keep_last": 2,
        },
        "val": {"max_pairs": 2, "sample_images": 1},
        "eval": {"iterations": 2},
        "tracking": {"uri": f"sqlite:///{db}", "experiment": "golf-test"},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    if cfg["tracking"]["uri"] == f"sqlite:///{db}" and not db.exists():
        shutil.copyfile(mlflow_template(), db)
    path.write_text(yaml.safe_dump(cfg))
    return path


# A stage f long enough to be interrupted mid-run (preemption, SLURM requeue), and its uninterrupted run
# with one thread (sums in one order), which every interrupted run must end equal to, bit for bit.
LONG_F = {"steps": 60, "checkpoint_every": 6, "val_every": 30, "log_every": 6, "keep_last": 4}
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the same in every run compared bitwise: thread count changes float sums


@pytest.fixture(scope="session")
def long_f_reference(shards, tmp_path_factory) -> Path:
    """f.safetensors of LONG_F run without interruption, with ONE_THREAD."""

    def train(base: Path) -> str:
        cfg = write_config(base / "ref.yaml", shards, base / "out", train=LONG_F)
        run_cli("launch/train.py", "--config", cfg, "--stage", "f", env=ONE_THREAD, check=True)
        return str(base / "out" / "f.safetensors")

    return Path(built_once(tmp_path_factory, "long_f_reference", train))


@pytest.fixture(scope="session")
def small_run(shards, tmp_path_factory):
    """Stage f (4 steps, clipping on), stage g (unroll 3) and an evaluation with 4 G iterations; what each
    command printed on stderr is kept for the tests that read it. Every worker shares it: tests only read it."""

    def train(base: Path) -> dict:
        out = base / "out"
        cfg = write_config(
            base / "c.yaml",
            shards,
            out,
            train={"grad_clip": 0.01, "steps": 4, "val_every": 2, "log_every": 2, "checkpoint_every": 4},
        )
        procs = [
            run_cli("launch/train.py", "--config", cfg, "--stage", "f", check=True),
            run_cli("launch/train.py", "--config", cfg, "--stage", "g", "--unroll", "3", check=True),
            run_cli("launch/evaluate.py", "--output-dir", out, "--iterations", "4", check=True),
        ]
        return {"out": str(out), "db": str(base / "mlflow.db"), "stderr": [p.stderr for p in procs]}

    run = built_once(tmp_path_factory, "small_run", train)
    return {**run, "out": Path(run["out"]), "db": Path(run["db"])}


def write_gopro(root: Path, train: int = 4, test: int = 2, height: int = 32, width: int = 48) -> Path:
    """A GOPRO_Large-shaped folder of noise frames (no synthetic blur: only the layout matters here)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        for i in range(n):
            for kind in ("blur", "sharp"):
                folder = root / split / f"GOPR{i // 2:04d}_00_00" / kind
                folder.mkdir(parents=True, exist_ok=True)
                image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                Image.fromarray(image).save(folder / f"{i:06d}.png")
    return root


class AffineMap(nn.Module):
    """x -> 0.5 x + 0.5, with a parameter so checkpointing has something to differentiate."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        return self.scale * x + 0.5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> dict[str, str]:
    """A real S3-compatible server (moto_server, its own process) on loopback for the whole session.

    Yields the environment a client needs: the endpoint through AWS_ENDPOINT_URL (and
    MLFLOW_S3_ENDPOINT_URL) and throwaway credentials through the standard variables. Tests pass it
    to the command lines they run (`run_cli(..., env=s3_server)`) and create their own buckets.
    """
    exe = shutil.which("moto_server")
    if exe is None:
        pytest.skip("moto_server is not installed (pip install 'moto[server]'); S3 tests need it")
    port = free_port()
    log = tmp_path_factory.mktemp("s3") / "moto_server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto_server did not start on {endpoint}; log:\n{log.read_text()}") from None
            time.sleep(0.2)
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "golf-test-key",
        "AWS_SECRET_ACCESS_KEY": "golf-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    yield env
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def make_bucket(env: dict[str, str], name: str) -> None:
    """Create bucket `name` on the loopback S3 server described by `env` (from the s3_server fixture)."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    client.create_bucket(Bucket=name)


@contextmanager
def tmpfs(path: Path, size: int):
    """A tmpfs of `size` bytes mounted at `path` for the block (the tests run as root); skip where impossible."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs to fill needs root")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (mount: {proc.stderr.strip() or proc.returncode})")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def rewrite_shard(path: Path, edit) -> None:
    """Rewrite a shard member by member; edit(name, data) -> new bytes, or None to leave the member out."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            data = edit(name, data)
            if data is None:
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def assert_weights_equal(a: Path, b: Path) -> None:
    """Two safetensors files hold the same tensors, bit for bit."""
    from safetensors.torch import load_file

    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
