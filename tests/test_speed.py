"""The speed layer (golf_dist/perf/speed.py): what each switch resolves to, and that each option computes what
eager PyTorch computes (outputs and gradients within float tolerance) on the CPU. torch.compile is checked
with the aot_eager backend: Dynamo's capture and AOTAutograd's backward, as inductor uses them, without
inductor's C++ code generation, which takes minutes on a 2-core CPU per network."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run_cli, write_config

from golf_dist.config import SpeedConfig, load_config
from golf_dist.errors import ConfigError
from golf_dist.models import f_net, g_net, unroll
from golf_dist.perf.fused_norm import fuse_norm_relu, kernel_available
from golf_dist.perf.speed import EAGER, Speed, adam_options, prepare_input, prepare_module, resolve

# fp32 summed in another order (NHWC kernels, fused graphs): within 1e-4 of the largest value, plus 1e-6
RELATIVE, ABSOLUTE = 1e-4, 1e-6


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() <= ABSOLUTE + RELATIVE * b.abs().max().item()


def test_auto_is_off_on_a_cpu_and_on_on_a_gpu_with_cudnn_benchmark_off_in_training():
    assert resolve(SpeedConfig(), torch.device("cpu"), training=True) == EAGER
    assert resolve(SpeedConfig(), torch.device("cpu"), training=False) == EAGER
    gpu_training = resolve(SpeedConfig(), torch.device("cuda"), training=True)
    assert gpu_training.compile and gpu_training.channels_last and gpu_training.tf32 and gpu_training.fused_adam
    assert not gpu_training.cudnn_benchmark  # resume is promised bitwise exact
    assert resolve(SpeedConfig(), torch.device("cuda"), training=False).cudnn_benchmark
    forced = resolve(SpeedConfig(compile="on", channels_last="on", tf32=True), torch.device("cpu"), training=True)
    assert forced.compile and forced.channels_last and not forced.tf32  # TF32 exists on GPUs only
    # fused Adam: off on a CPU unless asked for (torch has a fused CPU kernel), never where torch has none
    assert adam_options(resolve(SpeedConfig(), torch.device("cpu"), training=True), torch.device("cpu")) == {}
    assert adam_options(Speed(fused_adam=True), torch.device("cpu")) == {"fused": True}
    assert adam_options(Speed(fused_adam=True), torch.device("meta")) == {}


def test_bad_speed_values_name_the_key():
    with pytest.raises(ConfigError, match="speed.compile"):
        load_config(None, overrides=["speed.compile=maybe"])
    with pytest.raises(ConfigError, match="speed.compile_backend"):
        load_config(None, overrides=["speed.compile_backend=tvm"])
    # YAML 1.1 reads on/off as booleans; they mean on and off here
    assert load_config(None, overrides=["speed.channels_last=on"]).speed.channels_last == "on"


def _outputs_and_grads(net, x):
    out = net(x)
    (grad,) = torch.autograd.grad((out * torch.linspace(0, 1, out.numel()).view_as(out)).sum(), x)
    return out.detach(), grad


@pytest.mark.parametrize("make", [f_net, g_net], ids=["F", "G"])
def test_channels_last_computes_what_eager_computes(make):
    torch.manual_seed(0)
    eager = make(zero_init_last=False)
    fast = make(zero_init_last=False)
    fast.load_state_dict(eager.state_dict())
    speed = Speed(channels_last=True)
    fast = prepare_module(fast, speed)
    x = torch.rand(2, 3, 24, 40, requires_grad=True)
    a, grad_a = _outputs_and_grads(eager, x)
    b, grad_b = _outputs_and_grads(fast, prepare_input(x, speed))
    assert close(b, a) and close(grad_b, grad_a)
    weights = {k: (v - fast.state_dict()[k]).abs().max().item() for k, v in eager.state_dict().items()}
    assert max(weights.values()) == 0


@pytest.mark.slow
def test_compiled_unrolled_checkpointed_g_gives_the_eager_gradients():
    """G compiled once and called by every unrolled, checkpointed step: the weights' gradients of Eq. 4's
    mean loss equal eager's."""
    torch.manual_seed(0)
    eager = g_net(zero_init_last=False)
    compiled_g = g_net(zero_init_last=False)
    compiled_g.load_state_dict(eager.state_dict())
    compiled = prepare_module(compiled_g, Speed(compile=True, compile_backend="aot_eager"))
    x0, sharp = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    grads = []
    for net, params in ((eager, eager), (compiled, compiled_g)):
        iterates = unroll(net, x0, 3, checkpoint=True)
        loss = torch.stack([((it - sharp) ** 2).mean() for it in iterates]).mean()
        grads.append(torch.autograd.grad(loss, list(params.parameters())))
    assert all(close(b, a) for a, b in zip(*grads))


@pytest.mark.slow
def test_stage_g_trains_with_compile_and_channels_last(small_run, shards, tmp_path):
    """The trainer with the speed layer forced on a CPU: compiled G (aot_eager), channels_last weights and
    inputs. It trains, checkpoints (contiguous safetensors), validates and exports; the log names the
    switches. (That each switch computes what eager does is checked above, network by network.)"""
    from safetensors.torch import load_file

    from golf_dist.evaluation.plots import read_metrics

    out = tmp_path / "fast"
    out.mkdir()
    shutil.copy(small_run["out"] / "f.safetensors", out / "f.safetensors")
    cfg = write_config(
        tmp_path / "fast.yaml",
        shards,
        out,
        data={"loader": "torch"},
        train={"steps": 2, "val_every": 2, "checkpoint_every": 2, "log_every": 1},
    )
    proc = run_cli(
        "launch/train.py",
        "--config",
        cfg,
        "--stage",
        "g",
        "--unroll",
        "2",
        "speed.compile=on",
        "speed.compile_backend=aot_eager",
        "speed.channels_last=on",
        check=True,
    )
    assert "(compile (aot_eager), channels_last)" in proc.stdout
    exported = load_file(str(out / "g.safetensors"))
    assert set(exported) == set(g_net().state_dict()) and all(torch.isfinite(v).all() for v in exported.values())
    assert (out / "g" / "checkpoints" / "step-00000002" / "model.safetensors").is_file()
    psnr = read_metrics(out / "g" / "metrics.jsonl")["val_psnr"]
    assert [step for step, _ in psnr] == [2] and 10 < psnr[0][1] < 60
    assert json.loads((out / "g_run.json").read_text())["weights_sha256"]


def test_fused_norm_and_cuda_graphs_switches():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    # auto: off on a CPU; on CUDA only where compile (which fuses by itself) is off
    assert not resolve(SpeedConfig(fused_norm="auto"), cpu, training=True).fused_norm
    assert not resolve(SpeedConfig(), gpu, training=True).fused_norm  # compile is on there
    assert resolve(SpeedConfig(compile="off"), gpu, training=True).fused_norm == kernel_available()
    assert resolve(SpeedConfig(fused_norm="on"), cpu, training=True).fused_norm  # runs the fallback
    # CUDA graphs: off until measured on a GPU; on needs CUDA and compile
    assert not resolve(SpeedConfig(), gpu, training=False).cuda_graphs
    assert resolve(SpeedConfig(cuda_graphs="on"), gpu, training=False).cuda_graphs
    assert not resolve(SpeedConfig(cuda_graphs="on", compile="on"), cpu, training=False).cuda_graphs
    with pytest.raises(ConfigError, match="speed.cuda_graphs"):
        load_config(None, overrides=["speed.cuda_graphs=on", "speed.compile=off"])
    with pytest.raises(ConfigError, match="speed.fused_norm"):
        load_config(None, overrides=["speed.fused_norm=yes"])


@pytest.mark.parametrize("make,pairs", [(f_net, 16), (g_net, 16)], ids=["F", "G"])
def test_fused_norm_fallback_keeps_names_and_computes_what_eager_computes(make, pairs):
    torch.manual_seed(0)
    eager = make(zero_init_last=False)
    fast = make(zero_init_last=False)
    fast.load_state_dict(eager.state_dict())
    assert fuse_norm_relu(fast) == pairs  # two IN -> ReLU pairs in each of the 8 basic blocks
    assert list(fast.state_dict()) == list(eager.state_dict())  # checkpoints load either way
    x = torch.rand(2, 3, 24, 40, requires_grad=True)
    a, grad_a = _outputs_and_grads(eager, x)
    b, grad_b = _outputs_and_grads(fast, x)
    if not kernel_available(x):  # the PyTorch fallback: eager's own ops, bit for bit
        assert torch.equal(a, b) and torch.equal(grad_a, grad_b)
    assert close(b, a) and close(grad_b, grad_a)


KERNEL_CHECK = r"""
import torch, torch.nn.functional as F
from golf_dist.models import g_net
from golf_dist.perf.fused_norm import fuse_norm_relu, instance_norm_relu, kernel_available
assert kernel_available(torch.zeros(1)), "the interpreter should run the kernel on a CPU tensor"
torch.manual_seed(0)
worst = 0.0
def err(a, b):
    return ((a - b).abs().max() / (b.abs().max() + 1e-6)).item()
# 5 channels over blocks of 16 and 7x9 = 63 pixels over tiles of 64: the masks; 70 channels, 130 pixels: the loops
for n, c, h, w in ((2, 5, 7, 9), (1, 70, 10, 13)):
    for layout in (torch.contiguous_format, torch.channels_last):
        x = (torch.randn(n, c, h, w) * 3 + 1).contiguous(memory_format=layout).requires_grad_(True)
        wt = torch.randn(c, requires_grad=True)
        b = torch.randn(c, requires_grad=True)
        y = instance_norm_relu(x, wt, b)
        assert y.is_contiguous(memory_format=layout)
        g = torch.randn_like(y)
        got = torch.autograd.grad((y * g).sum(), (x, wt, b))
        ref_y = F.relu(F.instance_norm(x, weight=wt, bias=b))
        want = torch.autograd.grad((ref_y * g).sum(), (x, wt, b))
        worst = max(worst, err(y, ref_y), *(err(p, q) for p, q in zip(got, want)))
# a whole G with the kernel against eager G: outputs and input gradients
eager = g_net(zero_init_last=False)
fast = g_net(zero_init_last=False)
fast.load_state_dict(eager.state_dict())
fuse_norm_relu(fast)
x = torch.rand(1, 3, 20, 24, requires_grad=True)
ya, yb = eager(x), fast(x)
ga, = torch.autograd.grad(ya.sum(), x)
gb, = torch.autograd.grad(yb.sum(), x)
worst = max(worst, err(yb, ya), err(gb, ga))
print("worst relative error", worst)
assert worst < 1e-4, worst
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_fused_norm_kernel_under_the_triton_interpreter_matches_eager(tmp_path):
    """The Triton kernel itself (forward and backward, NCHW and NHWC, masked tails, several tiles) run by
    Triton's interpreter on the CPU, against eager InstanceNorm + ReLU and against an eager G."""
    script = tmp_path / "kernel_check.py"
    script.write_text(KERNEL_CHECK)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "worst relative error" in proc.stdout
