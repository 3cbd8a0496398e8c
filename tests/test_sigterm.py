"""SIGTERM under the launchers, as SLURM delivers it, and every rank resuming from the main rank's choice.

SLURM's SIGTERM (scancel, the time limit, preemption with a grace time) reaches every process of a job step,
and the launchers pass theirs on (torchrun's agent forwards its own to its workers): a trainer must take all
of them as one request, finish its step, checkpoint, write the PREEMPTED marker and exit. The runs here get: a
SIGTERM to the launcher's process group and to each worker (torchrun starts its workers in sessions of their
own, so a killpg of the launcher's group alone reaches only the launcher), then, once both ranks have said
they received it, a SIGTERM to each worker again. The SLURM case itself (scancel) is in tests/test_slurm.py.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, assert_weights_equal, write_config

pytestmark = pytest.mark.slow  # signals to real launchers and trainers: training runs, most of them several ranks

# steps of ~0.3 s on 2 loaded cores: the stop lands a few steps after the first checkpoint, well before the end
TRAIN = {"steps": 24, "checkpoint_every": 4, "val_every": 24, "log_every": 4, "keep_last": 3}
ACK = "received SIGTERM: will checkpoint"


def _env():
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    return env


def _torchrun(cfg: Path) -> list[str]:
    return [
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


def _accelerate(cfg: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
        str(ROOT / "launch/train.py"),
        "--config",
        str(cfg),
        "--stage",
        "f",
    ]


def _run(cmd: list[str], log: Path) -> str:
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(), stdout=fh, stderr=subprocess.STDOUT, timeout=600)
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    return text


def _children() -> dict[int, list[int]]:
    table: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            table.setdefault(ppid, []).append(int(entry.name))
    return table


def _descendants(pid: int) -> list[int]:
    table, found, todo = _children(), [], [pid]
    while todo:
        for child in table.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _term(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def _steps(ckpts: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in ckpts.iterdir() if p.name.startswith("step-"))


def _progress(log: Path) -> int:
    """The last step the main rank's progress bar shows as done."""
    return max(map(int, re.findall(r"(\d+)/24 \[", log.read_text())), default=0)


def _sigterm_mid_run(cmd: list[str], out: Path, log: Path, launcher_only: bool = False) -> tuple[int, str]:
    """Start the launcher, SIGTERM everything (or `launcher_only`: the launcher's process alone, as Kubernetes or
    a user sends it) after a step past the first checkpoint; (launcher status, log)."""
    ckpts = out / "f" / "checkpoints"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    workers: list[int] = []
    try:
        deadline = time.time() + 300
        # past the first checkpoint (step 4) by a step: the stop then writes a checkpoint of its own
        while not (ckpts.is_dir() and _steps(ckpts) and _progress(log) > 4):
            assert proc.poll() is None and time.time() < deadline, "no step 5 within 300 s:\n" + log.read_text()[-3000:]
            time.sleep(0.01)
        workers = _descendants(proc.pid)
        assert workers, "the launcher has no worker processes"
        if launcher_only:
            os.kill(proc.pid, signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGTERM)  # the launcher's process group ...
            _term(workers)  # ... and the workers in their own sessions: every process of the run, as SLURM does
        while log.read_text().count(ACK) < 2:  # both ranks have taken the first one
            assert time.time() < deadline, "the ranks did not report the SIGTERM:\n" + log.read_text()[-3000:]
            time.sleep(0.01)
        if not launcher_only:
            _term(workers)  # again, as a launcher passing its own on does (after the first was handled: not merged)
        code = proc.wait(timeout=120)
        while any(map(_alive, workers)):  # a launcher may leave before its workers are done
            assert time.time() < deadline + 60, "workers still running 60 s after the launcher ended"
            time.sleep(0.05)
    finally:  # nothing left running when the test failed (the workers are outside the launcher's group)
        for pid in [*_descendants(proc.pid), *workers]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return code, log.read_text()


def _assert_stopped_with_marker(out: Path, text: str) -> int:
    assert not (out / "f.safetensors").exists(), "the run finished before the SIGTERM:\n" + text[-3000:]
    marker_file = out / "f" / "PREEMPTED"
    assert marker_file.is_file(), "no PREEMPTED marker:\n" + text[-4000:]
    marker = json.loads(marker_file.read_text())
    step = marker["step"]
    assert marker["reason"] == "signal" and 4 < step < 24, marker
    assert _steps(out / "f" / "checkpoints")[-1] == step  # the stop wrote its own checkpoint, whole
    assert Path(marker["checkpoint"]) == out / "f" / "checkpoints" / f"step-{step:08d}"
    assert text.count(f"stopped for preemption (signal) after step {step} of 24") == 1, text[-3000:]
    return step


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """One folder for the module's configs: their runs share one MLflow database (made once)."""
    return tmp_path_factory.mktemp("sigterm")


@pytest.fixture(scope="module")
def uninterrupted(shards, base) -> Path:
    """The 2-process run (torchrun, gloo) that the preempted and resumed ones must end equal to."""
    cfg = write_config(base / "ref.yaml", shards, base / "ref", train=TRAIN)
    _run(_torchrun(cfg), base / "ref.log")
    return base / "ref" / "f.safetensors"


def test_torchrun_sigterm_to_every_process_checkpoints_and_the_rerun_resumes(shards, base, uninterrupted):
    out = base / "torchrun"
    cfg = write_config(base / "torchrun.yaml", shards, out, train=TRAIN)
    _, text = _sigterm_mid_run(_torchrun(cfg), out, base / "torchrun.log")
    step = _assert_stopped_with_marker(out, text)  # torchrun itself exits 1 (SignalException): the marker counts

    rerun = _run(_torchrun(cfg), base / "torchrun-rerun.log")
    assert (
        rerun.count(f"resuming stage f from {out / 'f' / 'checkpoints' / f'step-{step:08d}'} (step {step} of 24)") == 1
    )
    assert not (out / "f" / "PREEMPTED").exists()
    assert_weights_equal(uninterrupted, out / "f.safetensors")


def test_torchrun_sigterm_to_the_launcher_alone_with_pytorch_loader_workers_checkpoints(shards, base):
    """One SIGTERM to torchrun only: its agent passes it to each rank's process group, loader workers included.
    The workers leave it to their rank (killed by it, they failed the rank before it could checkpoint)."""
    out = base / "launcher-only"
    cfg = write_config(
        base / "launcher-only.yaml", shards, out, train=TRAIN, data={"loader": "torch", "num_workers": 1}
    )
    _, text = _sigterm_mid_run(_torchrun(cfg), out, base / "launcher-only.log", launcher_only=True)
    assert "killed by signal" not in text, text[-3000:]
    _assert_stopped_with_marker(out, text)


def test_accelerate_sigterm_then_a_damaged_newest_checkpoint_every_rank_resumes_from_rank_0s_choice(
    shards, base, uninterrupted
):
    """accelerate launch (2 CPU processes, torchrun's agent inside). Then the stop's checkpoint is damaged: rank 0
    alone chooses (one fallback warning, not one per rank) and both ranks resume from the previous checkpoint.
    Rank 0's final weights equal the uninterrupted run's only if rank 1 resumed from the same weights too
    (DDP averages the two ranks' gradients at every step)."""
    out = base / "accelerate"
    cfg = write_config(base / "accelerate.yaml", shards, out, train=TRAIN)
    _, text = _sigterm_mid_run(_accelerate(cfg), out, base / "accelerate.log")
    step = _assert_stopped_with_marker(out, text)

    ckpts = out / "f" / "checkpoints"
    previous = ckpts / f"step-{[s for s in _steps(ckpts) if s < step][-1]:08d}"
    damaged = ckpts / f"step-{step:08d}" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])  # a torn file, as a dying node or a stale cache shows it
    rerun = _run(_accelerate(cfg), base / "accelerate-rerun.log")
    assert rerun.count("falling back to the previous checkpoint") == 1, rerun[-4000:]
    assert len(re.findall(r"resuming stage f from ", rerun)) == 1, rerun[-4000:]
    assert f"resuming stage f from {previous} (step {int(previous.name[5:])} of 24)" in rerun
    assert_weights_equal(uninterrupted, out / "f.safetensors")


def _node_launcher_sigterm(shards, base: Path, name: str, train: dict, data: dict, **launch_env: str) -> str:
    """infra/slurm/node_launch.sh run as srun would run it on one node (SLURM's variables set by hand), then
    SIGTERM to every process of the step once the first checkpoint is there, as SLURM sends it. The launcher
    must end after its trainers, status 0, with the PREEMPTED marker already written; returns the log."""
    from conftest import free_port

    out = base / name
    cfg = write_config(base / f"{name}.yaml", shards, out, train=train, data=data)
    env = {k: v for k, v in _env().items() if k != "ACCELERATE_USE_CPU"}
    env.update(
        GOLF_ROOT=str(ROOT),
        GOLF_HEAD="127.0.0.1",
        GOLF_PORT=str(free_port()),
        GOLF_NNODES="1",
        SLURM_NODEID="0",
        SLURM_JOB_ID="4243",
        **launch_env,
    )
    log = base / f"{name}.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            ["bash", str(ROOT / "infra/slurm/node_launch.sh"), "--config", str(cfg), "--stage", "f"],
            cwd=base,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    workers: list[int] = []
    try:
        ckpts, deadline = out / "f" / "checkpoints", time.time() + 300
        while not (ckpts.is_dir() and _steps(ckpts)):
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.01)
        workers = _descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGTERM)
        _term(workers)  # every process of the step (loader workers included), as SLURM signals them
        code = proc.wait(timeout=120)
        marker_when_launcher_ended = (out / "f" / "PREEMPTED").is_file()
    finally:
        for pid in [*_descendants(proc.pid), *workers]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    assert code == 0 and marker_when_launcher_ended, f"launcher status {code}:\n{text[-3000:]}"
    assert json.loads((out / "f" / "PREEMPTED").read_text())["reason"] == "signal"
    assert "stopped for preemption (signal)" in text
    return text


def test_slurm_node_launcher_with_the_single_gpu_config_outlives_its_trainer_on_sigterm(shards, base):
    """`accelerate launch` with one process (single_gpu.yaml) installs its own SIGTERM handler (accelerate >= 1.16,
    whatever SIGTERM's disposition was), exits 143 and kills the trainer writing its checkpoint; under SLURM the
    step goes with it. infra/slurm/node_launch.sh starts one process with no launcher in between: the srun task
    ends with the trainer (on CPU here, where accelerate falls back to the CPU)."""
    # single_gpu.yaml asks for bf16, slow on a CPU without oneDNN bf16 kernels: the first checkpoint after one step
    _node_launcher_sigterm(
        shards,
        base,
        "single",
        {**TRAIN, "checkpoint_every": 1},
        {},
        GOLF_GPUS_PER_NODE="1",
        ACCELERATE_CONFIG=str(ROOT / "configs/accelerate/single_gpu.yaml"),
    )


def test_slurm_node_launcher_on_cpu_with_pytorch_loader_workers_checkpoints_on_sigterm_to_every_process(shards, base):
    """CPU nodes: node_launch.sh -> golf_dist.commands.launch torchrun -> torchrun -> 2 ranks, each with a PyTorch
    loader worker, and SIGTERM to all of them. The loader workers leave the signal to their rank (a worker killed
    by it fails the rank: "DataLoader worker ... is killed by signal: Terminated", no checkpoint)."""
    _node_launcher_sigterm(
        shards, base, "cpu", TRAIN, {"loader": "torch", "num_workers": 1}, GOLF_GPUS_PER_NODE="0", GOLF_CPU_PROCS="2"
    )


def test_accelerate_launch_of_one_process_becomes_the_trainer_with_accelerates_environment(tmp_path):
    """`python -m golf_dist.commands.launch accelerate-launch` (what node_launch.sh runs on GPU nodes) with one process:
    the script runs in the launcher's own process (exec, no launcher left to die on SIGTERM), with the variables
    `accelerate launch` gives its child for the same config file (mixed precision, visible GPUs, CPU flag)."""
    script = tmp_path / "show_env.py"
    script.write_text(
        "import json, os, sys\n"
        "keys = sorted(k for k in os.environ if k.startswith('ACCELERATE_') or k == 'CUDA_VISIBLE_DEVICES')\n"
        "json.dump({'pid': os.getpid(), 'argv': sys.argv[1:], 'env': {k: os.environ[k] for k in keys}},"
        " open(sys.argv[1], 'w'))\n"
    )
    config = ["--config_file", str(ROOT / "configs/accelerate/single_gpu.yaml")]
    env = {k: v for k, v in _env().items() if not k.startswith("ACCELERATE_")}
    ours = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "golf_dist.commands.launch",
            "accelerate-launch",
            "--",
            *config,
            str(script),
            str(tmp_path / "ours.json"),
            "--stage",
            "f",
        ],
        cwd=ROOT,
        env=env,
    )
    assert ours.wait(timeout=120) == 0
    subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            *config,
            str(script),
            str(tmp_path / "theirs.json"),
            "--stage",
            "f",
        ],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=120,
    )
    got, expected = (json.loads((tmp_path / f"{who}.json").read_text()) for who in ("ours", "theirs"))
    assert got["pid"] == ours.pid  # the launcher's process became the script: nothing between SLURM and it
    assert got["argv"][1:] == ["--stage", "f"]
    assert got["env"] == expected["env"] and got["env"]["ACCELERATE_MIXED_PRECISION"] == "bf16", (got, expected)


def _checkpoint(folder: Path, step: int, damaged: bool = False) -> Path:
    from golf_dist.checkpoints import save_checkpoint

    path = save_checkpoint(
        folder,
        step,
        {"w": torch.full((3,), float(step))},
        {"optimizer": {}, "scheduler": {}},
        {"stage": "f", "steps": 24},
    )
    if damaged:
        model = path / "model.safetensors"
        model.write_bytes(model.read_bytes()[:50])
    return path


def test_resume_checkpoint_every_rank_loads_rank_0s_choice_or_all_stop_naming_it(tmp_path):
    """2 gloo processes, each given its own checkpoints folder (as a stale cache or a damaged file can show
    ranks different folders): rank 1 loads the checkpoint rank 0 chose, not its own newest; when it cannot,
    both ranks stop with one error naming rank 0's checkpoint, the rank and its folder."""
    # rank 0 sees step 4 damaged and falls back to step 2; rank 1 sees a whole step 4
    _checkpoint(tmp_path / "stale" / "rank0", 2)
    _checkpoint(tmp_path / "stale" / "rank0", 4, damaged=True)
    _checkpoint(tmp_path / "stale" / "rank1", 2)
    _checkpoint(tmp_path / "stale" / "rank1", 4)
    # rank 0 chooses step 6, which rank 1 does not have
    chosen = _checkpoint(tmp_path / "missing" / "rank0", 6)
    _checkpoint(tmp_path / "missing" / "rank1", 2)
    # rank 0 has none: every rank starts from step 0, whatever it sees
    (tmp_path / "fresh" / "rank0").mkdir(parents=True)
    _checkpoint(tmp_path / "fresh" / "rank1", 2)

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(ROOT / "tests" / "resume_ranks_worker.py"),
        str(tmp_path),
        "stale",
        "missing",
        "fresh",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]  # the "missing" case stopped both ranks: no hang, non-zero
    results = {
        (case, rank): json.loads((tmp_path / f"{case}-rank{rank}.json").read_text())
        for case in ("stale", "missing", "fresh")
        for rank in (0, 1)
    }

    assert results["stale", 0] == {"path": str(tmp_path / "stale" / "rank0" / "step-00000002"), "step": 2, "value": 2.0}
    assert results["stale", 1] == {"path": str(tmp_path / "stale" / "rank1" / "step-00000002"), "step": 2, "value": 2.0}
    assert output.count("falling back to the previous checkpoint") == 1, output[-3000:]  # rank 0 alone chose

    missing = tmp_path / "missing" / "rank1" / "step-00000006"
    for rank in (0, 1):
        error = results["missing", rank]["error"]
        expected = f"rank 0 resumes from checkpoint {chosen}, but rank(s) 1 cannot load it (rank 1: {missing}: "
        assert error.startswith(expected), error
        assert "every node sees the same" in error
    assert results["fresh", 0] == results["fresh", 1] == {"path": None}


def test_the_launchers_say_at_start_when_torch_is_too_old_to_leave_sigterm_to_the_trainers():
    """PET_SIGNALS_TO_HANDLE (node_launch.sh: torchrun's agent must not handle SIGTERM) is read from torch 2.9
    on; an environment with an older torch gets one warning line from the torchrun and accelerate wrappers."""
    from golf_dist.commands.launch import agent_sigterm_warning

    old = agent_sigterm_warning("2.8.0+cu126")
    assert old and "PET_SIGNALS_TO_HANDLE" in old and "torch>=2.9" in old and "2.8.0+cu126" in old
    assert agent_sigterm_warning("2.6.0") is not None
    for new in ("2.9.0", "2.9.1+cpu", "2.10.0a0+git1234", "2.13.0+cpu", "3.0.0"):
        assert agent_sigterm_warning(new) is None, new
