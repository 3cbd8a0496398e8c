"""F and G match paper Table 1, start as the identity, and unroll as Eq. 11; the benchmark's figures."""

import json

import pytest
import torch
import torch.nn as nn
from conftest import AffineMap, run_cli

from golf_dist.errors import GolfError
from golf_dist.models import BasicBlock, ResidualCNN, f_net, g_net, unroll
from golf_dist.perf.benchmark import checkpoint_memory_ratio, make_settings


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_every_row_of_table_1():
    g_rows = [(label, n_params(m)) for label, m in g_net().table_rows()]
    f_rows = [(label, n_params(m)) for label, m in f_net().table_rows()]
    assert g_rows == [
        ("Conv(3->16)", 2352),
        ("BB(16->16)x2", 38016),
        ("BB(16->16)x2", 38016),
        ("BB(16->16)x2", 38016),
        ("BB(16->3)x2", 3347),
        ("Conv(3->3)", 441),
    ]
    assert f_rows == [
        ("Conv(3->32)", 4704),
        ("BB(32->32)x2", 151808),
        ("BB(32->32)x2", 151808),
        ("BB(32->32)x2", 151808),
        ("BB(32->3)x2", 5779),
        ("Conv(3->3)", 441),
    ]
    # the rows cover the whole network
    assert n_params(g_net()) == 120188
    assert n_params(f_net()) == 466348


def test_basic_block_is_pre_activation_with_projection_only_when_channels_change():
    kinds = [type(m) for m in BasicBlock(16, 3).residual]
    assert kinds == [nn.InstanceNorm2d, nn.ReLU, nn.Conv2d, nn.InstanceNorm2d, nn.ReLU, nn.Conv2d]
    assert [m.kernel_size for m in BasicBlock(16, 3).residual if isinstance(m, nn.Conv2d)] == [(7, 7), (5, 5)]
    assert isinstance(BasicBlock(16, 16).shortcut, nn.Identity)
    proj = BasicBlock(16, 3).shortcut
    assert [type(m) for m in proj] == [nn.Conv2d, nn.InstanceNorm2d] and proj[0].kernel_size == (1, 1)
    for m in g_net().modules():
        if isinstance(m, nn.InstanceNorm2d):
            assert m.affine and not m.track_running_stats
        if isinstance(m, nn.Conv2d):
            assert m.bias is None


@pytest.mark.parametrize("shape", [(1, 3, 37, 53), (2, 3, 17, 8)])
def test_output_has_the_input_shape(shape):
    x = torch.rand(shape)
    for net in (g_net(zero_init_last=False), f_net(zero_init_last=False)):
        assert net(x).shape == x.shape


def test_zero_init_starts_as_identity():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 24, 20)
    assert torch.equal(f_net()(x), x)
    assert torch.equal(g_net()(x), x)
    assert not torch.allclose(ResidualCNN(8, zero_init_last=False)(x), x)


@pytest.mark.parametrize("checkpoint", [True, False])
def test_unroll_returns_the_n_iterates(checkpoint):
    its = unroll(AffineMap(), torch.zeros(1, 3, 2, 2), 3, checkpoint=checkpoint)
    assert [round(t.mean().item(), 6) for t in its] == [0.5, 0.75, 0.875]
    with pytest.raises(ValueError):
        unroll(AffineMap(), torch.zeros(1, 3, 2, 2), 0)


@pytest.mark.slow
def test_checkpointing_cuts_stage_g_peak_memory_at_16_steps():
    assert checkpoint_memory_ratio(steps=16, batch=1, crop=32) < 1 / 3


def test_benchmark_settings_take_device_defaults_then_overrides():
    s = make_settings("cpu", batch=2, steps=None)
    assert (s.batch, s.crop, s.steps, s.unroll) == (2, 64, 5, 8)
    with pytest.raises(GolfError, match="perceptual"):
        make_settings("cpu", crop=16, perceptual=True)


def _run_cli(*args):
    return run_cli("launch/benchmark.py", *args, timeout=300)


@pytest.mark.slow
def test_benchmark_cli_prints_one_json_line(tmp_path):
    # the speed layer's column with channels_last and the fused norm (its PyTorch fallback on a CPU):
    # compiling on a 2-core CPU takes minutes
    r = _run_cli(
        "--batch",
        "1",
        "--crop",
        "32",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--memory-unrolls",
        "2,4",
        "--skip-720p",
        "--compile",
        "off",
        "--channels-last",
        "on",
        "--fused-norm",
        "on",
        "--profile",
        tmp_path / "profile",
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    for key in (
        "device",
        "torch",
        "settings",
        "train_f_crops_per_s",
        "train_g_crops_per_s",
        "infer_ms_256",
        "infer_ms_720p",
        "memory",
        "memory_method",
    ):
        assert key in out
    assert out["train_f_crops_per_s"] > 0 and out["train_g_crops_per_s"] > 0 and out["infer_ms_256"] > 0
    assert out["infer_ms_720p"] is None
    assert [m["unroll"] for m in out["memory"]] == [2, 4]
    for m in out["memory"]:
        assert 0 < m["peak_bytes_checkpointed"] < m["peak_bytes_plain"]
    assert out["settings"]["batch"] == 1 and out["settings"]["crop"] == 32
    # eager and the speed layer measured in the same run, with their ratios
    assert out["speed_layer"]["options"] == "channels_last, fused_norm"
    assert out["speed_layer"]["train_f_crops_per_s"] > 0
    assert out["speedup"]["train_f_crops_per_s"] == pytest.approx(
        out["speed_layer"]["train_f_crops_per_s"] / out["train_f_crops_per_s"], rel=1e-2
    )
    # --profile: each step's top operators, per column, in files and in the JSON
    for column, result in (("eager", out), ("speed_layer", out["speed_layer"])):
        for step in ("train_f", "train_g", "infer_256"):
            rows = result["profile"][step]
            assert rows and all(r["self_ms"] > 0 and 0 < r["share"] <= 1 for r in rows)
            assert sum(r["share"] for r in rows) <= 1.0001
            assert any("conv" in r["name"] for r in rows), rows  # the convolutions are where the time goes
            text = (tmp_path / "profile" / f"profile_{step}_{column}.txt").read_text()
            assert rows[0]["name"] in text and "self ms/step" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_benchmark_cli_without_cuda_says_so():
    r = _run_cli("--device", "cuda")
    assert r.returncode == 1
    assert r.stderr.startswith("error: ") and "CUDA" in r.stderr


def test_data_benchmark_settings_and_the_profiler_on_a_tiny_network(tmp_path):
    """The fast loop's units of golf_dist.perf.benchmark_data (settings checked before any shard is read) and
    golf_dist.perf.profiling (the operators of a tiny F on a CPU, written as a profile file)."""
    from golf_dist.errors import ConfigError
    from golf_dist.perf.benchmark_data import make_data_settings
    from golf_dist.perf.profiling import top_operators, write_profile

    with pytest.raises(ConfigError, match="--loader must be one of torch, dali, got 'tf'"):
        make_data_settings(["shards"], loader="tf")
    with pytest.raises(ConfigError, match="--crops-per-frame 3 must divide --batch 8"):
        make_data_settings(["shards"], batch=8, crops_per_frame=3)
    assert make_data_settings(["a", "b"], loader="torch").loaders == ("torch",)

    net, x = f_net().eval(), torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        rows, table = top_operators(lambda: net(x), "cpu", warmup=0, repeats=1, top=5)
    assert 0 < len(rows) <= 5 and any("conv" in row["name"] for row in rows) and table
    assert sum(row["share"] for row in rows) <= 1.0 + 1e-6
    path = write_profile(tmp_path / "prof", "f", rows, table, "tiny F")
    assert path.read_text().startswith("tiny F") and rows[0]["name"] in path.read_text()
