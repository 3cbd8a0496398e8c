"""infra/slurm/ on a real one-node SLURM cluster (slurmctld + slurmd + munged on this machine).

The module fixture runs infra/slurm/local_cluster.sh, which installs Debian's slurmctld, slurmd,
slurm-client and munge where they are missing (root + apt-get) and starts a CPU-only cluster in a
temporary folder. Where SLURM cannot be installed, every test here is skipped and says why.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import LONG_F, ONE_THREAD, ROOT, assert_weights_equal, run_cli, write_config

pytestmark = pytest.mark.slow  # jobs on the local SLURM cluster (one suite at a time may use it)

CLUSTER = ROOT / "infra" / "slurm" / "local_cluster.sh"
TRAIN_SBATCH = ROOT / "infra" / "slurm" / "train.sbatch"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running one-node cluster; yields the environment its client commands need (SLURM_CONF)."""
    if sys.platform != "linux":
        pytest.skip("SLURM tests need Linux")
    base = tmp_path_factory.mktemp("slurm")
    # Under pytest-xdist each worker that runs tests of this file starts its own cluster. Both would number
    # their jobs from 1, and train.sbatch derives the rendezvous port from the job id: give each worker
    # its own range (gw0: 1, gw1: 1001, ...).
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    start_env = {**os.environ, "GOLF_SLURM_FIRST_JOB_ID": str(1 + 1000 * worker)}
    proc = subprocess.run(
        ["bash", str(CLUSTER), "start", str(base)], capture_output=True, text=True, timeout=600, env=start_env
    )
    if proc.returncode == 3:
        reason = f"SLURM cannot be installed on this machine: {proc.stderr.strip()}"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    assert proc.returncode == 0, f"the local SLURM cluster did not start:\n{proc.stdout}\n{proc.stderr}"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(
        SLURM_CONF=str(base / "etc" / "slurm.conf"),
        PYTHONUNBUFFERED="1",
        **ONE_THREAD,
        GOLF_SLURM_FIRST_JOB_ID=start_env["GOLF_SLURM_FIRST_JOB_ID"],
    )
    yield env
    subprocess.run(["bash", str(CLUSTER), "stop", str(base)], capture_output=True, text=True, timeout=120)


def _sbatch(env, log_dir: Path, *args, extra_env=None, sbatch_opts=()) -> str:
    proc = subprocess.run(
        ["sbatch", "--parsable", f"--output={log_dir}/%x-%j.log", *sbatch_opts, str(TRAIN_SBATCH), *map(str, args)],
        cwd=ROOT,
        env={**env, **(extra_env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def _job(env, job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def _wait_state(env, job: str, states: set[str], log: Path, timeout: float = 300) -> dict[str, str]:
    deadline = time.time() + timeout
    while True:
        info = _job(env, job)
        if info["JobState"] in states:
            return info
        if time.time() > deadline:
            text = log.read_text() if log.exists() else "(no log)"
            raise AssertionError(
                f"job {job} is {info['JobState']} ({info.get('Reason')}), not {states}:\n{text[-3000:]}"
            )
        time.sleep(0.5)


def _log(log_dir: Path, job: str) -> Path:
    return log_dir / f"golf-train-{job}.log"


def _first_checkpoints(ckpts: Path, env, job: str, count: int, log: Path) -> None:
    deadline = time.time() + 300
    while not (ckpts.is_dir() and len(list(ckpts.glob("step-*"))) >= count):
        state = _job(env, job)["JobState"]
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job} is {state}:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.2)


def _preempt_and_wait_for_requeue(env, job: str, log: Path) -> dict[str, str]:
    """USR2 to the batch shell; returns once the job is requeued, and holds it there.

    SLURM keeps a requeued job pending until its begin time (now + AuthInfo cred_expire + 1 s, 21 s on
    the local cluster): launching it earlier, as `scontrol update StartTime=now` right after the requeue
    did, can land in the same second the previous run's credential was revoked, and slurmctld then kills
    the job ("Job credential revoked", FAILED). The hold only keeps the job queued while the test looks
    at (or damages) its checkpoints; `_release` lifts it and SLURM starts the job at its begin time."""
    subprocess.run(["scancel", "--batch", "--signal=USR2", job], env=env, check=True, timeout=30)
    deadline = time.time() + 300
    while True:  # the job checkpoints, asks for its requeue and waits (Reason=BeginTime)
        info = _job(env, job)
        # Reason=None: requeued, but the scheduler has not looked at it yet (seen on a loaded machine)
        if info["JobState"] == "PENDING" and int(info.get("Restarts", "0")) >= 1 and info.get("Reason") != "None":
            subprocess.run(["scontrol", "hold", job], env=env, check=True, timeout=30)
            assert info["Reason"] == "BeginTime", f"job {job} pending for {info['Reason']}, not BeginTime"
            return info
        assert info["JobState"] in ("RUNNING", "COMPLETING", "REQUEUED", "PENDING"), log.read_text()[-3000:]
        assert time.time() < deadline, f"job {job} was not requeued:\n{log.read_text()[-3000:]}"
        time.sleep(0.3)


def _release(env, job: str) -> None:
    """Lift the test's hold; the job still starts no earlier than SLURM's begin time."""
    subprocess.run(["scontrol", "release", job], env=env, check=True, timeout=30)


def test_f_then_g_chain_with_afterok_completes(slurm, shards, tmp_path):
    """Stage f with two CPU processes (torchrun + gloo), stage g waiting on it with --dependency=afterok."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", shards, out)
    job_f = _sbatch(
        slurm,
        tmp_path,
        "--config",
        cfg,
        "--stage",
        "f",
        "--output-dir",
        out,
        extra_env={"GOLF_CPU_PROCS": "2"},
        sbatch_opts=["--cpus-per-task=2"],
    )
    job_g = _sbatch(
        slurm,
        tmp_path,
        "--config",
        cfg,
        "--stage",
        "g",
        "--output-dir",
        out,
        "--unroll",
        "2",
        sbatch_opts=[f"--dependency=afterok:{job_f}", "--cpus-per-task=1"],
    )
    info_f = _wait_state(slurm, job_f, {"COMPLETED", "FAILED", "CANCELLED"}, _log(tmp_path, job_f))
    log_f = _log(tmp_path, job_f).read_text()
    assert info_f["JobState"] == "COMPLETED", log_f[-3000:]
    assert "2 CPU process(es) per node, torchrun + gloo" in log_f
    # the job numbers come from this cluster's own range, and the rendezvous port from the job number
    first = int(slurm["GOLF_SLURM_FIRST_JOB_ID"])
    assert first <= int(job_f) < first + 1000
    assert f":{20000 + int(job_f) % 20000}, " in log_f
    assert "global batch 4 = 2 process(es) x 2 per device" in log_f
    info_g = _wait_state(slurm, job_g, {"COMPLETED", "FAILED", "CANCELLED"}, _log(tmp_path, job_g))
    log_g = _log(tmp_path, job_g).read_text()
    assert info_g["JobState"] == "COMPLETED", log_g[-3000:]
    assert f"stage g done: weights {out / 'g.safetensors'}" in log_g
    for stage in ("f", "g"):
        assert (out / f"{stage}.safetensors").is_file()
        assert (out / stage / "checkpoints" / "step-00000006").is_dir()


def test_preempted_job_requeues_falls_back_past_a_torn_checkpoint_and_matches_an_uninterrupted_run(
    slurm, shards, long_f_reference, tmp_path
):
    """One preemption, everything a requeue must survive: USR2 checkpoints and requeues the job; a job
    chained on it keeps waiting, and runs once F completes; a stage g submitted meanwhile fails naming the
    unfinished stage f; the newest checkpoint is torn while the job waits; the requeued job says so, resumes
    from the previous one and ends equal to the uninterrupted run. One job does all of it: each requeue
    costs SLURM's begin-time wait."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", shards, out, train=LONG_F)
    job = _sbatch(
        slurm, tmp_path, "--config", cfg, "--stage", "f", "--output-dir", out, sbatch_opts=["--cpus-per-task=1"]
    )
    log = _log(tmp_path, job)
    # a job chained on it (afterok): a requeue must keep it waiting, as F has not completed yet. A bare
    # `true` here (the chain test runs a real stage g after F): a G started and cancelled would hold a CPU
    # for a while after this test
    submitted = subprocess.run(
        [
            "sbatch",
            "--parsable",
            f"--output={tmp_path}/chained-%j.log",
            "--cpus-per-task=1",
            f"--dependency=afterok:{job}",
            "--wrap",
            "true",
        ],
        env=slurm,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    job_chained = submitted.stdout.strip().split(";")[0]
    _first_checkpoints(out / "f" / "checkpoints", slurm, job, 2, log)  # so one is left when the newest is torn
    _preempt_and_wait_for_requeue(slurm, job, log)
    chained = _job(slurm, job_chained)
    assert (chained["JobState"], chained["Reason"]) == ("PENDING", "Dependency")
    text = log.read_text()
    stopped = re.search(r"stopped for preemption \(stop file .*STOP\) after step (\d+) of 60", text)
    assert stopped, text[-3000:]
    step = int(stopped.group(1))
    newest = out / "f" / "checkpoints" / f"step-{step:08d}"
    assert newest.is_dir()
    assert f"training checkpointed after step {step} of 60; requeueing job {job}" in text
    assert not (out / "f.safetensors").exists()

    # bad input: stage g submitted while stage f is still unfinished (here: waiting in the queue)
    job_g = _sbatch(
        slurm, tmp_path, "--config", cfg, "--stage", "g", "--output-dir", out, sbatch_opts=["--cpus-per-task=1"]
    )
    info_g = _wait_state(slurm, job_g, {"COMPLETED", "FAILED", "CANCELLED"}, _log(tmp_path, job_g))
    log_g = _log(tmp_path, job_g).read_text()
    assert info_g["JobState"] == "FAILED" and info_g["ExitCode"] != "0:0", log_g[-2000:]
    assert (
        f"stage g needs a trained F, but stage f in {out} has not finished (newest checkpoint: step {step} of 60)"
        in log_g
    )
    assert "golf: error: training failed" in log_g and not (out / "g").joinpath("checkpoints").exists()

    # the checkpoint the preemption wrote is torn, as a dying node could leave it; an older one is whole
    ckpts = sorted((out / "f" / "checkpoints").glob("step-*"))
    assert ckpts[-1] == newest and len(ckpts) >= 2, ckpts
    previous = ckpts[-2]
    damaged = newest / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])

    _release(slurm, job)
    info = _wait_state(slurm, job, {"COMPLETED", "FAILED", "CANCELLED"}, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 1, text[-3000:]
    assert f"job {job} (restart 1)" in text  # one log, appended to across the requeue
    assert f"weights file {damaged} is not a readable safetensors file" in text
    assert "falling back to the previous checkpoint" in text
    assert f"resuming stage f from {previous} (step {int(previous.name[5:])} of 60)" in text, text[-3000:]
    assert not (out / "f" / "PREEMPTED").exists() and not (out / "f" / "STOP").exists()
    assert_weights_equal(long_f_reference, out / "f.safetensors")
    # F completed: the chained job is released and runs
    info = _wait_state(
        slurm, job_chained, {"COMPLETED", "FAILED", "CANCELLED"}, tmp_path / f"chained-{job_chained}.log", timeout=60
    )
    assert info["JobState"] == "COMPLETED", info


def test_scancel_checkpoints_the_job_stays_cancelled_and_a_resubmission_resumes(slurm, shards, tmp_path):
    """`scancel JOB`, no --signal: SLURM sends SIGTERM to the batch shell and to every process of the job's
    steps (the launchers would pass theirs on as well) and SIGKILL KillWait (30 s) later. The same signals
    come with preemption by a grace time and at the time limit."""
    out = tmp_path / "run"
    short = {"steps": 24, "checkpoint_every": 4, "val_every": 24, "log_every": 4, "keep_last": 3}
    cfg = write_config(tmp_path / "c.yaml", shards, out, train=short)
    args = ("--config", cfg, "--stage", "f", "--output-dir", out)
    job = _sbatch(slurm, tmp_path, *args, sbatch_opts=["--cpus-per-task=1"])
    log = _log(tmp_path, job)
    _first_checkpoints(out / "f" / "checkpoints", slurm, job, 1, log)
    cancelled_at = time.time()
    subprocess.run(["scancel", job], env=slurm, check=True, timeout=30)
    info = _wait_state(slurm, job, {"COMPLETED", "FAILED", "CANCELLED", "PENDING"}, log)
    took = time.time() - cancelled_at
    text = log.read_text()
    assert info["JobState"] == "CANCELLED" and info.get("Restarts") == "0", (info, text[-3000:])
    stopped = re.search(r"stopped for preemption \((signal|stop file .*STOP)\) after step (\d+) of 24", text)
    assert stopped, text[-3000:]
    step = int(stopped.group(2))
    # the batch script's last line: srun ended before KillWait's SIGKILL, which would have killed the script too
    assert f"training stopped after step {step} of 24 (SIGTERM, not requeued)" in text, text[-3000:]
    assert took < 30, f"the job ended {took:.1f} s after scancel, past KillWait (30 s):\n{text[-3000:]}"
    marker = json.loads((out / "f" / "PREEMPTED").read_text())
    assert marker["step"] == step and marker["slurm_job_id"] == job
    assert sorted((out / "f" / "checkpoints").glob("step-*"))[-1].name == f"step-{step:08d}"
    # the launcher outlived the trainer and ended with it, status 0: it did not die on a SIGTERM of its own
    # (srun --kill-on-bad-exit would then kill the step, whatever the trainer was writing)
    assert "SignalException" not in text and "Exited with exit code" not in text, text[-3000:]
    assert not (out / "f.safetensors").exists() and not list((out / "f").glob(".launch-*"))  # the script's stamp

    again = _sbatch(slurm, tmp_path, *args, sbatch_opts=["--cpus-per-task=1"])
    info = _wait_state(slurm, again, {"COMPLETED", "FAILED", "CANCELLED"}, _log(tmp_path, again))
    text = _log(tmp_path, again).read_text()
    assert info["JobState"] == "COMPLETED", text[-3000:]
    assert f"resuming stage f from {out / 'f' / 'checkpoints' / f'step-{step:08d}'} (step {step} of 24)" in text
    assert (out / "f.safetensors").is_file() and not (out / "f" / "PREEMPTED").exists()


def test_a_hung_training_is_requeued_where_configured_at_most_the_configured_times(slurm, shards, tmp_path):
    """A trainer its watchdog stops (exit 124, f/hang-rank0.txt): with GOLF_REQUEUE_ON_HANG=1 the job is requeued
    while SLURM_RESTART_COUNT < GOLF_REQUEUE_ON_HANG_MAX (1 here), then fails; without it the job fails at once.
    Each log says why. The hang: train.hang_timeout_s=0.001, shorter than any step, so every run hangs at step 1
    as a deterministic hang would (the watchdog itself on a frozen peer: tests/faults/test_stalled_rank.py)."""
    jobs = {}
    for name, extra in (("requeued", {"GOLF_REQUEUE_ON_HANG": "1", "GOLF_REQUEUE_ON_HANG_MAX": "1"}), ("plain", {})):
        out = tmp_path / name
        cfg = write_config(tmp_path / f"{name}.yaml", shards, out, train={"hang_timeout_s": 0.001})
        jobs[name] = (
            _sbatch(
                slurm,
                tmp_path,
                "--config",
                cfg,
                "--stage",
                "f",
                "--output-dir",
                out,
                extra_env=extra,
                sbatch_opts=["--cpus-per-task=1"],
            ),
            out,
        )
    for name, (job, out) in jobs.items():
        info = _wait_state(slurm, job, {"COMPLETED", "FAILED", "CANCELLED"}, _log(tmp_path, job))
        text = _log(tmp_path, job).read_text()
        restarts = 1 if name == "requeued" else 0
        assert info["JobState"] == "FAILED" and int(info["Restarts"]) == restarts, (info, text[-3000:])
        assert "golf watchdog: rank 0 (pid " in text and (out / "f" / "hang-rank0.txt").is_file(), text[-3000:]
        hung = (
            f"training hung: the watchdog stopped it (train.hang_timeout_s; every thread's stack in {out / 'f'}/: "
            "hang-rank0.txt)"
        )
        assert text.count(hung) == restarts + 1, text[-3000:]
        assert "golf: error: training failed" in text and not list((out / "f").glob(".launch-*"))
    requeued = _log(tmp_path, jobs["requeued"][0]).read_text()
    job = jobs["requeued"][0]
    assert f"requeueing job {job} (restart 1 of at most 1, GOLF_REQUEUE_ON_HANG=1)" in requeued
    assert f"job {job} (restart 1)" in requeued  # the requeued run, appended to the same log
    assert f"not requeued: job {job} has been restarted 1 time(s) (GOLF_REQUEUE_ON_HANG_MAX=1)" in requeued
    plain = _log(tmp_path, jobs["plain"][0]).read_text()
    assert "not requeued (GOLF_REQUEUE_ON_HANG=1 requeues a job whose training hung)" in plain
    assert "requeueing" not in plain


def test_gpu_job_with_a_missing_accelerate_config_fails_before_training(slurm, tmp_path):
    job = _sbatch(
        slurm,
        tmp_path,
        "--stage",
        "f",
        "--output-dir",
        tmp_path / "out",
        extra_env={"GOLF_GPUS_PER_NODE": "1", "ACCELERATE_CONFIG": str(tmp_path / "nowhere.yaml")},
    )
    info = _wait_state(slurm, job, {"COMPLETED", "FAILED", "CANCELLED"}, _log(tmp_path, job))
    text = _log(tmp_path, job).read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", text
    assert f"accelerate config {tmp_path / 'nowhere.yaml'} is missing or unreadable" in text
    assert not any((tmp_path / "out").rglob("step-*"))


def test_shard_job_array_and_merge_write_the_same_shards_as_one_process(slurm, shards, tmp_path):
    """Two array tasks write one part each; the merge job (afterok) checks them and writes the manifest."""
    import hashlib

    out = tmp_path / "shards"
    env = {**slurm, "GOLF_ROOT": str(ROOT), "GOLF_SBATCH_ARGS": "--cpus-per-task=1"}
    proc = subprocess.run(
        [
            "bash",
            str(ROOT / "infra/slurm/submit_shards.sh"),
            "--parts",
            "2",
            "--src",
            str(shards.parent / "GOPRO_Large"),
            "--out",
            str(out),
            "--maxcount",
            "4",
            "--format",
            "png",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    ids = dict(line.split() for line in proc.stdout.split("\n") if line.strip())
    merge_log = tmp_path / f"golf-shard-merge-{ids['merge']}.log"
    info = _wait_state(slurm, ids["merge"], {"COMPLETED", "FAILED", "CANCELLED"}, merge_log)
    logs = "".join(p.read_text() for p in sorted(tmp_path.glob("*.log")))
    assert info["JobState"] == "COMPLETED", logs[-3000:]
    assert f"golf: job {ids['array']}_0: part 0 of 2" in logs and f"golf: job {ids['array']}_1: part 1 of 2" in logs
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["part-00000-of-00002.json", "part-00001-of-00002.json"]

    def digests(root):
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*.tar")}

    assert digests(out) == digests(shards) and len(digests(out)) == 4  # byte for byte the one-process shards
    assert (out / "manifest.json").read_bytes() == (shards / "manifest.json").read_bytes()
    verify = run_cli("data_prep/shard_gopro.py", "--verify", out)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_node_launcher_ends_a_rendezvous_that_cannot_form_with_a_clear_error(shards, tmp_path):
    """One node of two starts (the other never does): a clear error after GOLF_RDZV_TIMEOUT, not a hang.

    Runs the node launcher as srun would on the head node, with SLURM's variables set by hand, so it
    needs no cluster."""
    from conftest import free_port

    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "out")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(
        GOLF_ROOT=str(ROOT),
        GOLF_HEAD="127.0.0.1",
        GOLF_PORT=str(port),
        GOLF_NNODES="2",
        GOLF_GPUS_PER_NODE="0",
        GOLF_RDZV_TIMEOUT="8",
        SLURM_NODEID="0",
        SLURM_JOB_ID="4242",
    )
    start = time.monotonic()
    proc = subprocess.run(
        ["bash", str(ROOT / "infra/slurm/node_launch.sh"), "--config", str(cfg), "--stage", "f"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: the rendezvous at 127.0.0.1:{port} did not form: --nnodes 2 launchers were expected")
    ), proc.stderr[-2000:]
    assert "join_timeout=8 s" in proc.stderr and time.monotonic() - start < 90
    assert not (tmp_path / "out" / "f").exists()


def test_shell_scripts_expand_arrays_that_can_be_empty_in_the_form_old_bash_accepts_under_set_u():
    """bash before 4.4 (RHEL/CentOS 7 login nodes) aborts on `"${a[@]}"` with `a=()` under `set -u`
    ("unbound variable"); `${a[@]+"${a[@]}"}` expands to nothing there. The bash here is newer and accepts
    both (BASH_COMPAT does not bring the old error back), so this reads the scripts instead of running them:
    every array a script starts as `name=()` must be expanded in the guarded form."""
    scripts = [
        p
        for folder in ("infra", "launch", ".ci")
        for p in (ROOT / folder).rglob("*")
        if p.is_file() and (p.suffix in (".sh", ".sbatch") or p.read_bytes().startswith(b"#!/usr/bin/env bash"))
    ]
    assert ROOT / "infra/slurm/node_launch.sh" in scripts and ROOT / "infra/slurm/shard.sbatch" in scripts
    bare = []
    for script in scripts:
        text = script.read_text()
        for name in set(re.findall(r"\b(\w+)=\(\)", text)):
            guarded = f'${{{name}[@]+"${{{name}[@]}}"}}'
            for line_no, line in enumerate(text.splitlines(), 1):
                code = line.split(" #")[0] if not line.lstrip().startswith("#") else ""
                if f'"${{{name}[@]}}"' in code.replace(guarded, ""):
                    bare.append(f"{script.relative_to(ROOT)}:{line_no}: {line.strip()}")
    assert not bare, 'use ${a[@]+"${a[@]}"} for an array that can be empty:\n' + "\n".join(bare)
