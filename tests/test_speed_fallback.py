"""The speed layer's start-up check (golf_dist.perf.speed.settle): a switch that auto or try turned on and that fails
(compilation raises) or disagrees with eager PyTorch is turned off with one warning, and recorded as the MLflow tag
speed_fallback and a speed_fallback.json; one set to `on` fails the run with its error. On a CPU the failure is
injected by custom compile backends (tests/speed_backends.py, named as speed.compile_backend=module:function), by
fused Adam classes that fail (GOLF_FUSED_ADAM_CLASS=module:Class) and by a Triton kernel that fails to build
(GOLF_FUSED_NORM_FAULT=build, golf_dist/perf/fused_norm_kernels.py, under Triton's CPU interpreter)."""

from __future__ import annotations

import json
import shutil

import mlflow
import pytest
import torch
from conftest import assert_weights_equal, run_cli, write_config

from golf_dist.config import SpeedConfig
from golf_dist.inference.deblur import deblur_files
from golf_dist.models import f_net, g_net
from golf_dist.perf.speed import FALLBACK_ORDER, Speed, for_inference, prepare_module, unprepare

RAISING, WRONG = "speed.compile_backend=tests.speed_backends:raising", "tests.speed_backends:off_by_ten_percent"


def _tags(db, run_id: str) -> dict[str, str]:
    return mlflow.MlflowClient(f"sqlite:///{db}").get_run(run_id).data.tags


def _warnings(text: str) -> list[str]:
    return [line for line in text.splitlines() if "turned off for" in line]


def _f_config(tmp_path, shards):
    return write_config(
        tmp_path / "c.yaml",
        shards,
        tmp_path / "out",
        data={"loader": "torch"},
        train={"steps": 2, "val_every": 2, "checkpoint_every": 2, "log_every": 1},
    )


@pytest.mark.slow
def test_training_goes_on_eager_when_compile_fails_and_records_why(shards, tmp_path):
    """speed.compile=try with a backend that raises: stage f trains eagerly, one warning names the switch and the
    error's first line, speed_fallback.json and the MLflow tag say which switch and why."""
    proc = run_cli(
        "launch/train.py",
        "--config",
        _f_config(tmp_path, shards),
        "--stage",
        "f",
        "speed.compile=try",
        RAISING,
        check=True,
    )
    (warning,) = _warnings(proc.stdout + proc.stderr)
    assert "speed.compile turned off for training stage f: RuntimeError: injected compile failure" in warning
    assert "second line" not in proc.stdout + proc.stderr
    stage_dir = tmp_path / "out" / "f"
    (fallback,) = json.loads((stage_dir / "speed_fallback.json").read_text())
    assert fallback == {
        "switch": "compile",
        "reason": "RuntimeError: injected compile failure",
        "work": "training stage f",
    }
    run_id = json.loads((tmp_path / "out" / "f_run.json").read_text())["mlflow_run_id"]
    assert _tags(tmp_path / "mlflow.db", run_id)["speed_fallback"] == "compile: RuntimeError: injected compile failure"
    assert "(eager, no speed options)" in proc.stdout + proc.stderr  # what the steps then ran


@pytest.mark.slow
def test_compile_set_on_fails_the_run_with_its_error(shards, tmp_path):
    proc = run_cli(
        "launch/train.py", "--config", _f_config(tmp_path, shards), "--stage", "f", "speed.compile=on", RAISING
    )
    assert proc.returncode != 0
    assert "injected compile failure" in proc.stderr and not _warnings(proc.stdout + proc.stderr)
    assert not (tmp_path / "out" / "f" / "speed_fallback.json").exists()
    assert not (tmp_path / "out" / "f.safetensors").exists()


@pytest.mark.slow
def test_stage_g_falls_back_when_compiled_outputs_disagree_with_eager(small_run, shards, tmp_path):
    """A backend that compiles but computes 10% too much: the numerics check on the first batch catches it in
    stage g (F and G both prepared), turns compile off and keeps channels_last, which agrees."""
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(small_run["out"] / "f.safetensors", out / "f.safetensors")
    cfg = write_config(
        tmp_path / "c.yaml",
        shards,
        out,
        data={"loader": "torch"},
        train={"steps": 1, "val_every": 1, "checkpoint_every": 1, "log_every": 1},
    )
    proc = run_cli(
        "launch/train.py",
        "--config",
        cfg,
        "--stage",
        "g",
        "--unroll",
        "2",
        "speed.compile=try",
        f"speed.compile_backend={WRONG}",
        "speed.channels_last=try",
        check=True,
    )
    (fallback,) = json.loads((out / "g" / "speed_fallback.json").read_text())
    assert fallback["switch"] == "compile" and fallback["reason"].startswith(
        "NumericsMismatch: outputs differ from eager PyTorch's by"
    )
    assert "(channels_last)" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_evaluation_falls_back_and_records_it(small_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(small_run["out"], out, ignore=shutil.ignore_patterns("checkpoints"))
    proc = run_cli(
        "launch/evaluate.py",
        "--output-dir",
        out,
        "--iterations",
        "1",
        "--limit",
        "1",
        "speed.compile=try",
        RAISING,
        check=True,
    )
    assert [w.split(" turned off for ")[1] for w in _warnings(proc.stdout + proc.stderr)] == [
        "F: RuntimeError: injected compile failure",
        "G: RuntimeError: injected compile failure",
    ]
    recorded = json.loads((out / "evaluation_speed_fallback.json").read_text())
    assert [(f["switch"], f["work"]) for f in recorded] == [("compile", "F"), ("compile", "G")]
    result = json.loads((out / "evaluation.json").read_text())
    assert result["speed_fallback"] == recorded
    assert _tags(small_run["db"], result["mlflow_run_id"])["speed_fallback"].startswith("compile: RuntimeError")


@pytest.mark.slow
def test_deblurring_falls_back_to_eager_outputs(small_run, shards, tmp_path):
    from PIL import Image

    image = tmp_path / "in.png"
    Image.new("RGB", (48, 40), (90, 120, 30)).save(image)
    eager = deblur_files(small_run["out"], [str(image)], tmp_path / "eager", iterations=1, device="cpu")
    fast = deblur_files(
        small_run["out"],
        [str(image)],
        tmp_path / "fast",
        iterations=1,
        device="cpu",
        speed_cfg=SpeedConfig(compile="try", compile_backend="tests.speed_backends:raising"),
    )
    assert Image.open(fast[0]).tobytes() == Image.open(eager[0]).tobytes()
    recorded = json.loads((tmp_path / "fast" / "speed_fallback.json").read_text())
    assert [(f["switch"], f["work"]) for f in recorded] == [("compile", "F"), ("compile", "G")]
    assert not (tmp_path / "eager" / "speed_fallback.json").exists()


def test_unprepare_gives_back_the_eager_network_with_the_same_parameters():
    net = g_net(zero_init_last=False)
    params = list(net.parameters())
    names = list(net.state_dict())
    x = torch.rand(1, 3, 24, 24)
    want = net(x)
    prepared = prepare_module(net, Speed(fused_norm=True, channels_last=True, compile=True, compile_backend="eager"))
    back = unprepare(prepared)
    assert back is net and list(back.parameters()) == params and list(back.state_dict()) == names
    assert not any(type(m).__name__ == "InstanceNormReLU" for m in back.modules())
    assert all(p.is_contiguous() for p in back.parameters())
    assert torch.equal(back(x), want)


def test_switches_set_to_on_are_never_turned_off():
    from golf_dist.perf.speed import explicit_switches

    assert explicit_switches(SpeedConfig()) == frozenset()
    assert explicit_switches(SpeedConfig(compile="try", fused_norm="on")) == {"fused_norm"}
    assert explicit_switches(SpeedConfig(cuda_graphs="on")) == {"cuda_graphs", "compile"}
    assert set(FALLBACK_ORDER) >= {"compile", "fused_norm", "channels_last", "cuda_graphs", "tf32"}
    # try on a CPU turns a switch on (auto leaves it off there)
    f, g = for_inference(f_net(), None, SpeedConfig(channels_last="try"), torch.device("cpu"))
    assert g is None and type(f).__name__ == "CheckedNetwork"


def test_a_custom_backend_that_cannot_be_imported_is_a_config_error_not_a_fallback():
    from golf_dist.config import load_config
    from golf_dist.errors import ConfigError

    with pytest.raises(ConfigError, match="speed.compile_backend"):
        load_config(None, overrides=["speed.compile_backend=not a module"])
    cfg = load_config(None, overrides=["speed.compile=try", "speed.compile_backend=tests.no_such_module:backend"])
    with pytest.raises(ConfigError, match="'speed.compile_backend'='tests.no_such_module:backend': cannot import"):
        for_inference(f_net(), None, cfg.speed, torch.device("cpu"))


def test_bf16_training_check_compares_with_eager_bf16_and_keeps_its_switches():
    """Under bf16 autocast the check compares with eager at the same precision (tolerance 4e-2): bf16's own
    rounding (an untrained F with its last layer on differs from fp32 by ~1.5e-2 of its scale) and channels_last's
    rounding order in bf16 are no reason to fall back."""
    from golf_dist.losses import GolfLoss
    from golf_dist.perf.speed import settle_training

    torch.manual_seed(0)
    f = f_net(zero_init_last=False)
    blur, sharp = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    loss_fn = GolfLoss(0.0, None)
    speed, fallbacks, (prepared,) = settle_training(
        Speed(channels_last=True),
        SpeedConfig(channels_last="try"),
        [f],
        (blur, sharp),
        lambda nets, x, y: loss_fn(nets[0](x), y)["total"],
        lambda: torch.autocast("cpu", dtype=torch.bfloat16),
        "training stage f",
    )
    assert fallbacks == [] and speed.channels_last and prepared is f
    assert all(p.grad is None for p in f.parameters())  # the check's backward leaves no gradient behind


RAISING_ADAM = {"GOLF_FUSED_ADAM_CLASS": "tests.speed_backends:RaisingFusedAdam"}


def test_training_falls_back_to_unfused_adam_when_the_fused_step_fails_and_matches_an_unfused_run(shards, tmp_path):
    """speed.fused_adam=try with a fused step that raises: the start-up check (one fused step on a copy of the
    weights, before the optimizer is taken) turns it off with one warning and records why; training then runs the
    unfused Adam, step for step what speed.fused_adam=off computes. Without the check the first real step raises."""
    cfg = _f_config(tmp_path, shards)
    proc = run_cli(
        "launch/train.py", "--config", cfg, "--stage", "f", "speed.fused_adam=try", env=RAISING_ADAM, check=True
    )
    (warning,) = _warnings(proc.stdout + proc.stderr)
    assert "speed.fused_adam turned off for training stage f: RuntimeError: injected fused Adam failure" in warning
    assert "second line" not in proc.stdout + proc.stderr
    (fallback,) = json.loads((tmp_path / "out" / "f" / "speed_fallback.json").read_text())
    assert fallback == {
        "switch": "fused_adam",
        "reason": "RuntimeError: injected fused Adam failure",
        "work": "training stage f",
    }
    run_id = json.loads((tmp_path / "out" / "f_run.json").read_text())["mlflow_run_id"]
    assert _tags(tmp_path / "mlflow.db", run_id)["speed_fallback"] == (
        "fused_adam: RuntimeError: injected fused Adam failure"
    )
    assert "(eager, no speed options)" in proc.stdout + proc.stderr
    plain = write_config(
        tmp_path / "plain.yaml",
        shards,
        tmp_path / "plain",
        data={"loader": "torch"},
        train={"steps": 2, "val_every": 2, "checkpoint_every": 2, "log_every": 1},
    )
    run_cli("launch/train.py", "--config", plain, "--stage", "f", "speed.fused_adam=off", check=True)
    assert_weights_equal(tmp_path / "plain" / "f.safetensors", tmp_path / "out" / "f.safetensors")


def test_fused_adam_set_on_fails_the_run_with_its_error(shards, tmp_path):
    proc = run_cli(
        "launch/train.py",
        "--config",
        _f_config(tmp_path, shards),
        "--stage",
        "f",
        "speed.fused_adam=on",
        env=RAISING_ADAM,
    )
    assert proc.returncode != 0
    assert "RuntimeError: injected fused Adam failure" in proc.stderr and not _warnings(proc.stdout + proc.stderr)
    assert not (tmp_path / "out" / "f" / "speed_fallback.json").exists()
    assert not (tmp_path / "out" / "f" / "checkpoints").exists()  # stopped before its first step


def test_fused_adam_check_passes_torchs_fused_step_and_catches_one_that_disagrees(monkeypatch):
    """torch's own fused CPU step agrees with the for-loop step (no fallback, the weights and the global RNG
    untouched); one that steps 10% too far is a NumericsMismatch: a fallback with try, the run's error with on."""
    from golf_dist.perf.speed import NumericsMismatch
    from golf_dist.training.speed_check import settle_fused_adam

    net = f_net(zero_init_last=False)
    params = list(net.parameters())
    weights, rng = [p.detach().clone() for p in params], torch.get_rng_state()
    cpu, speed = torch.device("cpu"), Speed(fused_adam=True)
    assert settle_fused_adam(speed, SpeedConfig(fused_adam="on"), params, cpu, "x", lr=1e-3) == (speed, [])
    assert all(torch.equal(w, p) and p.grad is None for w, p in zip(weights, params))
    assert torch.equal(rng, torch.get_rng_state())
    monkeypatch.setenv("GOLF_FUSED_ADAM_CLASS", "tests.speed_backends:TenPercentFusedAdam")
    kept, (fallback,) = settle_fused_adam(speed, SpeedConfig(fused_adam="try"), params, cpu, "x", lr=1e-3)
    assert not kept.fused_adam and fallback["switch"] == "fused_adam"
    assert fallback["reason"].startswith("NumericsMismatch: fused Adam's updates differ from the unfused step's by")
    with pytest.raises(NumericsMismatch, match="x with speed.fused_adam=on: fused Adam's updates differ"):
        settle_fused_adam(speed, SpeedConfig(fused_adam="on"), params, cpu, "x", lr=1e-3)
    # an auto that stayed off (a CPU) or a device without a fused kernel: nothing to check, nothing turned off
    assert settle_fused_adam(Speed(), SpeedConfig(), params, cpu, "x", lr=1e-3) == (Speed(), [])


BUILD_FAILS = {"TRITON_INTERPRET": "1", "GOLF_FUSED_NORM_FAULT": "build"}  # the kernel runs on a CPU, and fails


def test_training_falls_back_when_the_fused_norm_kernel_fails_to_build_and_fails_with_it_set_on(shards, tmp_path):
    """speed.fused_norm=try with the Triton kernel failing at its first launch (a failed build): stage f trains
    with eager's InstanceNorm and ReLU, one warning, speed_fallback.json and the MLflow tag name fused_norm;
    speed.fused_norm=on fails the run with the build's error before any step."""
    proc = run_cli(
        "launch/train.py",
        "--config",
        _f_config(tmp_path, shards),
        "--stage",
        "f",
        "speed.fused_norm=try",
        env=BUILD_FAILS,
        check=True,
    )
    reason = "RuntimeError: injected Triton build failure of fwd_kernel (GOLF_FUSED_NORM_FAULT=build)"
    (warning,) = _warnings(proc.stdout + proc.stderr)
    assert f"speed.fused_norm turned off for training stage f: {reason}" in warning
    (fallback,) = json.loads((tmp_path / "out" / "f" / "speed_fallback.json").read_text())
    assert fallback == {"switch": "fused_norm", "reason": reason, "work": "training stage f"}
    run_id = json.loads((tmp_path / "out" / "f_run.json").read_text())["mlflow_run_id"]
    assert _tags(tmp_path / "mlflow.db", run_id)["speed_fallback"] == f"fused_norm: {reason}"
    assert "(eager, no speed options)" in proc.stdout + proc.stderr
    plain = write_config(
        tmp_path / "plain.yaml",
        shards,
        tmp_path / "plain",
        data={"loader": "torch"},
        train={"steps": 2, "val_every": 2, "checkpoint_every": 2, "log_every": 1},
    )
    run_cli("launch/train.py", "--config", plain, "--stage", "f", "speed.fused_norm=off", check=True)
    assert_weights_equal(tmp_path / "plain" / "f.safetensors", tmp_path / "out" / "f.safetensors")

    on = write_config(
        tmp_path / "on.yaml",
        shards,
        tmp_path / "on",
        data={"loader": "torch"},
        train={"steps": 2, "val_every": 2, "checkpoint_every": 2, "log_every": 1},
    )
    proc = run_cli("launch/train.py", "--config", on, "--stage", "f", "speed.fused_norm=on", env=BUILD_FAILS)
    assert proc.returncode != 0
    assert reason in proc.stderr and not _warnings(proc.stdout + proc.stderr), proc.stderr[-3000:]
    assert not (tmp_path / "on" / "f" / "speed_fallback.json").exists()
    assert not (tmp_path / "on" / "f" / "checkpoints").exists()
