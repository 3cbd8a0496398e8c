"""Launch configs and training across processes, for real on CPU with gloo: accelerate's own config
loader, torchrun with two processes and with two c10d agents, a rendezvous that cannot form, the
DeepSpeed ZeRO-2 engine (its CPU accelerator) against DDP, and the trainer's Accelerate+DeepSpeed path.

Weights are compared with a float tolerance, not bit for bit: with two ranks the gradient is summed
in another order, and Adam divides each gradient element by its own running RMS, so elements whose
gradient is at rounding level can move by up to +-lr differently. The bound is relative to how far
training moved the weights (||w_a - w_b|| / ||w_a - w_0|| < 2e-2), as in tests/test_train.py.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_DATA, free_port, run_cli, write_config
from safetensors.torch import load_file

from golf_dist.training.distributed import resolve_mixed_precision

CONFIGS = ROOT / "configs" / "accelerate"
SHORT = {"steps": 3, "checkpoint_every": 3, "val_every": 3}
# the PyTorch loader: its sample order is a function of the global position only, so it does not depend
# on the world size or the accumulation (DALI hands out the same crops: docs/data.md)
TORCH_LOADER = {"loader": "torch"}
# bf16 runs train on tiny_shards' small frames (tests/conftest.py) and validate on one frame: on a CPU without
# oneDNN bf16 kernels (AVX2 only) a bf16 convolution takes a slow path (golf_dist.perf.speed.bf16_is_slow_here)
BF16_VAL = {"max_pairs": 1}
# the DeepSpeed runs: 4 optimizer steps of 2 micro-batches each, a checkpoint every 2
DEEPSPEED_TRAIN = {"steps": 4, "checkpoint_every": 2, "val_every": 4, "grad_accum": 2, "keep_last": 3}


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _run(cmd, env, timeout=600):
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", *map(str, args)]


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _relative_gap(a: Path, b: Path, init: dict, drop: float = 0.0) -> float:
    """|a - b| / |a - init| over all weights, leaving out the `drop` share of the weights that differ most."""
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    diff = torch.cat([(wa[k] - wb[k]).flatten() for k in wa]).abs().sort().values
    gap = diff[: diff.numel() - int(diff.numel() * drop)].norm()
    moved = sum(((wa[k] - init[k]) ** 2).sum() for k in wa) ** 0.5
    assert moved > 1e-3, "training did not move the weights"
    return float(gap / moved)


def _init(net):
    from golf_dist.models import f_net, g_net

    torch.manual_seed(1)  # write_config's seed: the trainer's initial weights
    return (f_net if net == "f" else g_net)().state_dict()


def _params(db: Path) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("golf-test").experiment_id])
    return runs[0].data.params


@pytest.fixture(scope="module")
def trained_f(shards, tmp_path_factory):
    """A 3-step F that the stage g runs below start from."""
    base = tmp_path_factory.mktemp("f")
    cfg = write_config(base / "c.yaml", shards, base / "out", train=SHORT)
    run_cli("launch/train.py", "--config", cfg, "--stage", "f", check=True)
    return base / "out" / "f.safetensors"


# ---- launch configs --------------------------------------------------------------------------------


def test_launch_configs_load_with_accelerates_own_loader(monkeypatch):
    from golf_dist.commands.launch import check_accelerate_config

    monkeypatch.chdir(ROOT)  # the DeepSpeed JSON's path in the YAML is relative to the launch directory
    got = {p.stem: check_accelerate_config(p) for p in sorted(CONFIGS.glob("*.yaml"))}
    assert set(got) == {"single_gpu", "one_node", "multi_node", "deepspeed_zero2"}
    assert got["single_gpu"]["distributed_type"] == "NO" and got["single_gpu"]["num_processes"] == 1
    assert got["one_node"]["distributed_type"] == "MULTI_GPU" and got["one_node"]["mixed_precision"] == "bf16"
    assert got["multi_node"]["rdzv_backend"] == "c10d" and got["multi_node"]["num_machines"] == 2
    assert got["deepspeed_zero2"]["distributed_type"] == "DEEPSPEED"
    ds = json.loads((ROOT / got["deepspeed_zero2"]["deepspeed_config_file"]).read_text())
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] is True
    assert ds["train_micro_batch_size_per_gpu"] == "auto"  # filled from data.batch_size by the trainer


@pytest.mark.slow
def test_missing_or_invalid_accelerate_config_is_named(tmp_path, monkeypatch):
    from golf_dist.commands.launch import check_accelerate_config
    from golf_dist.errors import ConfigError

    missing = tmp_path / "nowhere.yaml"
    # accelerate launch itself: non-zero, and its last line names the file
    proc = _run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(missing),
            "launch/train.py",
            "--stage",
            "f",
        ],
        _env(),
        timeout=120,
    )
    assert proc.returncode != 0 and str(missing) in proc.stderr.strip().splitlines()[-1]
    # the project's check (the SLURM script runs it before queueing): one line, exit 2, no traceback
    proc = run_cli("golf_dist/commands/launch.py", "check-config", missing)
    assert proc.returncode == 2 and f"accelerate config {missing} does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr

    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("distributed_type: [MULTI_GPU\n")
    unknown_key = tmp_path / "unknown.yaml"
    unknown_key.write_text("distributed_type: MULTI_GPU\nnum_proceses: 8\n")
    wrong_value = tmp_path / "wrong.yaml"
    wrong_value.write_text("distributed_type: MULTI_GPUS\n")
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    for path, words in (
        (bad_yaml, "not a valid"),
        (unknown_key, "num_proceses"),
        (wrong_value, "MULTI_GPUS"),
        (folder, "is not a file"),
        (binary, "unreadable"),
    ):
        with pytest.raises(ConfigError) as err:
            check_accelerate_config(path)
        assert str(path) in str(err.value) and words in str(err.value)

    ds_yaml = tmp_path / "ds.yaml"
    ds_yaml.write_text(
        (CONFIGS / "deepspeed_zero2.yaml")
        .read_text()
        .replace("configs/accelerate/deepspeed_zero2.json", str(tmp_path / "gone.json"))
    )
    with pytest.raises(
        ConfigError, match=f"DeepSpeed config {tmp_path / 'gone.json'} does not exist .named in {ds_yaml}"
    ):
        check_accelerate_config(ds_yaml)


@pytest.mark.slow
def test_one_node_config_asks_the_trainer_for_bf16(tiny_shards, tmp_path):
    """`accelerate launch --config_file one_node.yaml`: its bf16 reaches the trainer, although the
    golf config says train.mixed_precision=no (an explicit Accelerator(mixed_precision=...) would
    otherwise override it). On a CPU-only machine `--cpu` makes it one process (Accelerate's rule)."""
    cfg = write_config(
        tmp_path / "c.yaml",
        tiny_shards,
        tmp_path / "out",
        val=BF16_VAL,
        data=TINY_DATA,
        train={"steps": 2, "val_every": 2, "checkpoint_every": 2},
    )
    _ok(
        _run(
            [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--config_file",
                str(CONFIGS / "one_node.yaml"),
                "--cpu",
                "--num_processes",
                "1",
                "launch/train.py",
                "--config",
                str(cfg),
                "--stage",
                "f",
            ],
            _env(),
        )
    )
    params = _params(tmp_path / "mlflow.db")
    assert params["train.mixed_precision"] == "bf16" and params["world_size"] == "1"
    weights = load_file(str(tmp_path / "out" / "f.safetensors"))
    assert all(v.dtype == torch.float32 for v in weights.values())


# Sets up a Trainer for stage f of the config in argv[1] and prints its config's and its own mixed precision.
_PRECISION_SCRIPT = (
    "import json, sys\n"
    "from golf_dist.config import load_config\n"
    "from golf_dist.training.trainer import Trainer\n"
    "cfg = load_config(sys.argv[1], 'f')\n"
    "trainer = Trainer(cfg, 'f')\n"
    "trainer.setup()\n"
    "trainer.close()\n"
    "print(json.dumps({'config': cfg.train.mixed_precision, 'trainer': trainer.mixed_precision}))\n"
)


def _trainer_precision(tiny_shards, tmp_path, configured: str, env) -> tuple[dict, subprocess.CompletedProcess]:
    """({"config": ..., "trainer": ...}, the process) of a Trainer set up on a tiny config of
    train.mixed_precision=`configured`, under `env`."""
    cfg = write_config(
        tmp_path / "c.yaml",
        tiny_shards,
        tmp_path / "out",
        data={**TINY_DATA, **TORCH_LOADER},
        val=BF16_VAL,
        train={"steps": 1, "mixed_precision": configured},
    )
    proc = _ok(_run([sys.executable, "-c", _PRECISION_SCRIPT, str(cfg)], env, timeout=300))
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc


@pytest.mark.slow
def test_the_launchers_precision_is_kept_on_the_trainer_and_the_config_is_left_as_written(tiny_shards, tmp_path):
    """ACCELERATE_MIXED_PRECISION=bf16 (what `accelerate launch --mixed_precision bf16` sets) and a config saying
    train.mixed_precision=no: the trainer runs bf16 and records it (the run's config.yaml, the MLflow params),
    while the validated config object still says no."""
    import yaml

    got, _ = _trainer_precision(tiny_shards, tmp_path, "no", _env(ACCELERATE_MIXED_PRECISION="bf16"))
    assert got == {"config": "no", "trainer": "bf16"}
    record = yaml.safe_load((tmp_path / "out" / "f" / "config.yaml").read_text())
    assert record["train"]["mixed_precision"] == "bf16"
    assert _params(tmp_path / "mlflow.db")["train.mixed_precision"] == "bf16"


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["native", "AVX2"])
def test_auto_precision_is_bf16_where_onednn_has_bf16_kernels_and_fp32_elsewhere(tiny_shards, tmp_path, isa):
    """train.mixed_precision=auto on a CPU: bf16 where oneDNN has bf16 kernels (this AVX-512 CPU as it is), fp32
    where it has not (the same CPU with oneDNN held to AVX2, as an AVX2-only CPU is); the log says which and why,
    and the run records what it ran with. A launcher's precision still wins over auto."""
    env = _env() if isa == "native" else _env(ONEDNN_MAX_CPU_ISA=isa)
    got, proc = _trainer_precision(tiny_shards, tmp_path, "auto", env)
    native_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    expected = "bf16" if isa == "native" and native_bf16 else "no"
    assert got == {"config": "auto", "trainer": expected}
    assert f"train.mixed_precision=auto: {expected} (this CPU's oneDNN has" in proc.stdout + proc.stderr
    assert _params(tmp_path / "mlflow.db")["train.mixed_precision"] == expected
    assert resolve_mixed_precision("auto", "bf16") == "bf16" and resolve_mixed_precision("auto", "no") == "auto"


def test_mixed_precision_of_config_and_launcher_that_disagree(shards, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "out")
    proc = run_cli(
        "launch/train.py",
        "--config",
        cfg,
        "--stage",
        "f",
        "train.mixed_precision=fp16",
        env={"ACCELERATE_MIXED_PRECISION": "bf16"},
    )
    assert proc.returncode == 2 and "train.mixed_precision" in proc.stderr and "bf16" in proc.stderr
    assert not (tmp_path / "out" / "f").exists()


@pytest.mark.slow
def test_global_batch_that_does_not_divide_across_ranks(shards, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "out")
    proc = _run(
        _torchrun(
            "--standalone",
            "--nproc_per_node",
            2,
            "launch/train.py",
            "--config",
            cfg,
            "--stage",
            "f",
            "data.batch_size=6",
            "train.grad_accum=2",
        ),
        _env(ACCELERATE_USE_CPU="1"),
    )
    assert proc.returncode != 0
    assert "'data.batch_size'=6 (the global batch) must divide evenly across 2 process(es)" in proc.stderr
    assert not any((tmp_path / "out").rglob("step-*"))


# ---- distributed correctness -----------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_with_accumulation_match_one_process_on_stage_g(shards, trained_f, tmp_path):
    """Stage g, checkpointed unrolling: 2 ranks x 2 micro-batches of 1 == 1 process with the batch of 4."""
    outs = {}
    for world, accum in ((1, 1), (2, 2)):
        out = tmp_path / f"w{world}"
        cfg = write_config(
            tmp_path / f"w{world}.yaml",
            shards,
            out,
            train={**SHORT, "grad_accum": accum, "f_weights": str(trained_f)},
            data=TORCH_LOADER,
        )
        if world == 1:  # one process on its own, as a user starts it
            proc = run_cli(
                "launch/train.py",
                "--config",
                cfg,
                "--stage",
                "g",
                "--unroll",
                2,
                env={"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"},
                check=True,
            )
        else:
            proc = _ok(
                _run(
                    _torchrun(
                        "--standalone",
                        "--nproc_per_node",
                        world,
                        "launch/train.py",
                        "--config",
                        cfg,
                        "--stage",
                        "g",
                        "--unroll",
                        2,
                    ),
                    _env(ACCELERATE_USE_CPU="1"),
                )
            )
        assert f"{world} process(es) x {4 // (world * accum)} per device x {accum} accumulation" in proc.stdout
        assert "checkpointing on" in proc.stdout
        outs[world] = out / "g.safetensors"
        params = _params(tmp_path / "mlflow.db") if world == 1 else None
        if params:
            assert params["global_batch"] == "4" and params["per_device_batch"] == "4"
    # G starts as the identity and takes 3 Adam steps: a weight whose gradient is float noise in size moves by
    # the full step, lr, one way in one run and the other way in the other (Adam divides by the gradient's
    # size). Such weights are a fraction of a percent of G's but can make most of the plain gap; a defect (a
    # rank's wrong data or gradient) moves the bulk, which the gap without the 1% that differ most measures
    assert _relative_gap(outs[1], outs[2], _init("g"), drop=0.01) < 2e-2


@pytest.mark.slow
def test_two_node_rendezvous_trains_and_checkpoints(shards, tmp_path):
    """Two torchrun agents on 127.0.0.1 meet at a c10d rendezvous (--nnodes 2), one process each."""
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "out", train=SHORT, data=TORCH_LOADER)
    port = free_port()
    agents = [
        subprocess.Popen(
            _torchrun(
                "--nnodes",
                2,
                "--node_rank",
                rank,
                "--nproc_per_node",
                1,
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "--rdzv-id",
                "golf-test",
                "--rdzv-conf",
                "join_timeout=120",
                "launch/train.py",
                "--config",
                cfg,
                "--stage",
                "f",
            ),
            cwd=ROOT,
            env=_env(ACCELERATE_USE_CPU="1"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [a.communicate(timeout=600) for a in agents]
    for agent, (out, err) in zip(agents, outputs):
        assert agent.returncode == 0, out[-2000:] + err[-3000:]
    assert any("2 process(es) x 2 per device" in out for out, _ in outputs)
    ckpt = tmp_path / "out" / "f" / "checkpoints" / "step-00000003"
    assert json.loads((ckpt / "state.json").read_text())["world_size"] == 2
    assert (tmp_path / "out" / "f.safetensors").is_file()
    assert _params(tmp_path / "mlflow.db")["world_size"] == "2"


@pytest.mark.slow
def test_a_rendezvous_that_cannot_form_fails_in_bounded_time(shards, tmp_path):
    """Only one of two agents starts: it gives up after join_timeout and says what happened."""
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "out", train=SHORT)
    port = free_port()
    args = [
        "--nnodes",
        "2",
        "--node_rank",
        "0",
        "--nproc_per_node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-conf",
        "join_timeout=10",
        "launch/train.py",
        "--config",
        str(cfg),
        "--stage",
        "f",
    ]
    start = time.monotonic()
    # torchrun under the project's wrapper: torchrun's own output passes through, then one clear line
    wrapped = run_cli(
        "golf_dist/commands/launch.py", "torchrun", "--", *args, env={"ACCELERATE_USE_CPU": "1"}, timeout=180
    )
    took = time.monotonic() - start
    assert wrapped.returncode == 1 and took < 90, f"{took:.0f} s"
    assert "RendezvousTimeoutError" in wrapped.stderr  # torchrun's own words: a bare exception name
    last = wrapped.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: the rendezvous at 127.0.0.1:{port} did not form") and "join_timeout=10 s" in last
    assert not any((tmp_path / "out").rglob("step-*"))


@pytest.mark.slow
def test_deepspeed_engine_matches_ddp_on_stage_g(shards, trained_f):
    """DeepSpeed ZeRO-2 (its CPU accelerator, gloo, the project's JSON with bf16 off) against DDP,
    2 ranks x 2 micro-batches, frozen F outside the engine, checkpointed unroll; and ZeRO's
    partitioned state gathered into Adam's layout and loaded into a fresh engine resumes exactly."""
    proc = _ok(
        _run(
            _torchrun(
                "--standalone",
                "--nproc_per_node",
                2,
                "tests/deepspeed_vs_ddp.py",
                "--shards",
                shards,
                "--f-weights",
                trained_f,
                "--steps",
                3,
                "--grad-accum",
                2,
                "--unroll",
                2,
            ),
            _env(),
        )
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["world_size"] == 2 and result["zero_stage"] == 2
    assert result["optimizer"] == "DeepSpeedZeroOptimizer"
    assert result["weights_moved"] > 1e-3 and result["weight_gap"] < 2e-2
    assert result["exp_avg_gap"] < 2e-2 and result["exp_avg_sq_gap"] < 2e-2
    assert result["adam_steps"] == [3.0]  # one optimizer step per 2 micro-batches, in both
    assert result["resume_gap"] < 1e-6 and result["ok"] is True


@pytest.mark.slow
def test_trainer_under_accelerate_deepspeed_checkpoints_and_resumes(shards, tmp_path):
    """The trainer's Accelerate+DeepSpeed path (engine backward/step, ZeRO state gathered into the
    checkpoint, scattered back on resume), as far as a CPU machine can run it: Accelerate runs
    DeepSpeed only on an accelerator, so with DeepSpeed's CPU accelerator it sees one process."""
    pytest.importorskip(
        "transformers", reason="Accelerate's DeepSpeed integration imports transformers: pip install transformers"
    )
    ds_json = json.loads((CONFIGS / "deepspeed_zero2.json").read_text())
    ds_json["bf16"] = {"enabled": False}  # no bf16 on this CPU path; the rest is the project's file
    ds_json["zero_optimization"]["overlap_comm"] = False
    (tmp_path / "ds_cpu.json").write_text(json.dumps(ds_json))
    ds_env = _env(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_CONFIG_FILE=str(tmp_path / "ds_cpu.json"))
    outs = {kind: tmp_path / kind for kind in ("plain", "ds")}
    cfgs = {
        kind: write_config(tmp_path / f"{kind}.yaml", shards, outs[kind], train=DEEPSPEED_TRAIN, data=TORCH_LOADER)
        for kind in outs
    }
    run_cli("launch/train.py", "--config", cfgs["plain"], "--stage", "f", env={"OMP_NUM_THREADS": "1"}, check=True)
    cmd = _torchrun("--standalone", "--nproc_per_node", 1, "launch/train.py", "--config", cfgs["ds"], "--stage", "f")
    proc = _ok(_run(cmd, ds_env))
    assert "DeepSpeed ZeRO stage 2 (DeepSpeedZeroOptimizer)" in proc.stdout
    init = _init("f")
    assert _relative_gap(outs["plain"] / "f.safetensors", outs["ds"] / "f.safetensors", init) < 2e-2
    # the checkpoint holds Adam's plain layout, whole: the same keys and shapes DDP writes
    ds_opt = torch.load(outs["ds"] / "f/checkpoints/step-00000004/optimizer.pt", weights_only=True)["optimizer"]
    plain_opt = torch.load(outs["plain"] / "f/checkpoints/step-00000004/optimizer.pt", weights_only=True)["optimizer"]
    assert (
        ds_opt["state"].keys() == plain_opt["state"].keys() and float(ds_opt["state"][0]["step"]) == 4.0
    )  # optimizer steps
    for i in plain_opt["state"]:
        assert ds_opt["state"][i]["exp_avg"].shape == plain_opt["state"][i]["exp_avg"].shape

    # resume from step 2 under DeepSpeed: the same final weights as the uninterrupted DeepSpeed run
    final = load_file(str(outs["ds"] / "f.safetensors"))
    import shutil

    shutil.rmtree(outs["ds"] / "f/checkpoints/step-00000004")
    (outs["ds"] / "f.safetensors").unlink()
    proc = _ok(
        _run(
            _torchrun(
                "--standalone",
                "--nproc_per_node",
                1,
                "launch/train.py",
                "--config",
                tmp_path / "ds.yaml",
                "--stage",
                "f",
            ),
            ds_env,
        )
    )
    assert "resuming stage f from" in proc.stdout and "step-00000002" in proc.stdout
    resumed = load_file(str(outs["ds"] / "f.safetensors"))
    for key in final:
        torch.testing.assert_close(resumed[key], final[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_accelerate_launch_with_the_deepspeed_config_exports_fp32_masters(tiny_shards, tmp_path):
    """`accelerate launch` with the project's DeepSpeed YAML and JSON as they are (bf16): bf16 working
    weights, but the exported ones are the fp32 masters."""
    pytest.importorskip(
        "transformers", reason="Accelerate's DeepSpeed integration imports transformers: pip install transformers"
    )
    bf16_out = tmp_path / "bf16"
    cfg = write_config(
        tmp_path / "bf16.yaml",
        tiny_shards,
        bf16_out,
        data={**TORCH_LOADER, **TINY_DATA},
        val=BF16_VAL,
        train={**DEEPSPEED_TRAIN, "steps": 2, "val_every": 2},
    )  # 2 optimizer steps of 2 micro-batches
    proc = _ok(
        _run(
            [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--config_file",
                str(CONFIGS / "deepspeed_zero2.yaml"),
                "--num_processes",
                "1",
                "launch/train.py",
                "--config",
                str(cfg),
                "--stage",
                "f",
            ],
            _env(),
        )
    )
    assert "DeepSpeed ZeRO stage 2 (DeepSpeedZeroOptimizer), mixed precision bf16" in proc.stdout
    weights = load_file(str(bf16_out / "f.safetensors"))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())
    assert any((v != v.bfloat16().float()).any() for v in weights.values()), "bf16 copies were saved, not fp32 masters"
    assert weights["tail.weight"].abs().sum() > 0  # the zero-initialised last conv was trained


def test_a_bad_collective_timeout_is_named(shards, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "out")
    proc = run_cli("launch/train.py", "--config", cfg, "--stage", "f", env={"GOLF_DIST_TIMEOUT_S": "ten"})
    assert proc.returncode == 2 and "GOLF_DIST_TIMEOUT_S='ten'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "f").exists()
