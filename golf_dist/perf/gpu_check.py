"""The GPU acceptance check (`python launch/gpu_check.py`): every CUDA path run once, measured against the
README's Performance goals, as a printed table and a JSON (docs/benchmark.md).

Rows: stage f and stage g training steps eager and with each speed switch alone (outputs against eager's
before training), bf16 against fp32 outputs (PSNR of the difference), G unrolled 8 and 32 with checkpointing
(peak memory), the DALI crop path against the PyTorch loader (the same crops), evaluation and F + 3 G at
256x256 and on one 1280x720 frame through the speed layer as evaluation and deblurring run it (its start-up
check included), and ONNX Runtime. Each row ends ok, skipped (why) or failed (the error's first line); one
row failing does not stop the others. `--device cpu` runs the same rows at tiny sizes (the test).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from golf_dist.config import SpeedConfig
from golf_dist.errors import ConfigError, GolfError
from golf_dist.files import write_atomic
from golf_dist.losses import GolfLoss
from golf_dist.models import f_net, g_net
from golf_dist.perf.benchmark import (
    _autocast,
    _batch,
    _median_ms,
    device_name,
    f_train_step,
    g_train_step,
    stage_g_peak_bytes,
)
from golf_dist.perf.fused_norm import kernel_available
from golf_dist.perf.speed import (
    EAGER,
    NUMERICS_RTOL,
    Speed,
    adam_options,
    apply_backend_flags,
    fallbacks_of,
    first_line,
    for_inference,
    prepare_input,
    prepare_module,
    tf32_off,
)

GIB = 1 << 30


@dataclass(frozen=True)
class Sizes:
    batch: int
    crop: int
    unroll: int
    steps: int
    warmup: int
    memory_batch: int
    memory_crop: int
    frame: tuple[int, int]  # (height, width) of the deblurred frame
    infer: int  # side of the inference image
    precision: str
    compile_backend: str


# cuda: the README goals' settings (one H100, bf16, batch 16 of 256x256); cpu: tiny, for the test
SIZES = {
    "cuda": Sizes(16, 256, 8, 10, 3, 16, 256, (720, 1280), 256, "bf16", "inductor"),
    "cpu": Sizes(2, 32, 2, 1, 0, 1, 32, (40, 72), 32, "fp32", "eager"),
}
# the README's Performance goals (one H100, bf16): (figure, <= or >=, value)
GOALS = {
    "train_f eager": ("crops_per_s", ">=", 1000.0),
    "train_g eager": ("crops_per_s", ">=", 110.0),
    "memory g unroll 8": ("peak_gib", "<=", 1.2),
    "infer 256": ("ms", "<=", 1.0),
    "deblur 1280x720": ("ms", "<=", 15.0),
}
SWITCHES = ("compile", "channels_last", "fused_norm", "fused_adam", "tf32", "cuda_graphs")


def _needs_cuda(speed_switch: str, device: str) -> str | None:
    """Why a switch cannot run on `device`, or None."""
    if device != "cuda" and speed_switch in ("fused_adam", "tf32", "cuda_graphs"):
        return f"{speed_switch} needs CUDA"
    if speed_switch == "fused_norm" and not kernel_available(torch.zeros(1, device=device)):
        return "the Triton kernel cannot run here (Triton missing, or a CPU without TRITON_INTERPRET=1)"
    return None


def _alone(switch: str, backend: str) -> Speed:
    """The speed layer with one switch on (CUDA graphs ride on compile)."""
    on = {"compile": True, "cuda_graphs": True} if switch == "cuda_graphs" else {switch: True}
    return replace(EAGER, compile_backend=backend, **on)


def _relative_difference(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.float() - want.float()).abs().max().item() / max(want.float().abs().max().item(), 1e-6)


def _train_row(stage: str, speed: Speed, dev: str, z: Sizes) -> dict:
    """Steps of stage f or g with `speed`: crops/s and the outputs' relative difference from eager's."""
    apply_backend_flags(speed)
    blur, sharp = _batch(z.batch, z.crop, dev)
    torch.manual_seed(0)
    f = f_net(zero_init_last=False).to(dev)
    g = g_net(zero_init_last=False).to(dev) if stage == "g" else None
    with torch.no_grad(), tf32_off():
        eager_out = (g or f)(f(blur) if g is not None else blur)
    f = prepare_module(f, speed)
    x, y = prepare_input(blur, speed), prepare_input(sharp, speed)
    loss_fn = GolfLoss(0.0, None)
    if g is None:
        trained = f
        step = lambda: f_train_step(f, opt, loss_fn, x, y, z.precision)  # noqa: E731
    else:
        f.requires_grad_(False)
        trained = g = prepare_module(g, speed)
        step = lambda: g_train_step(f, g, opt, loss_fn, x, y, z.unroll, True, z.precision)  # noqa: E731
    with torch.no_grad():
        out = trained(f(x) if g is not None else x)
    opt = torch.optim.Adam(trained.parameters(), lr=1e-4, **adam_options(speed, torch.device(dev)))
    difference = _relative_difference(out, eager_out)
    if not difference <= NUMERICS_RTOL:
        raise GolfError(f"outputs differ from eager's by {difference:.3g} of their scale (> {NUMERICS_RTOL:g})")
    ms = _median_ms(step, dev, z.warmup, z.steps)
    return {
        "crops_per_s": round(z.batch / (ms / 1e3), 2),
        "step_ms": round(ms, 2),
        "relative_difference_vs_eager": float(f"{difference:.3g}"),
    }


def _networks(dev: str, speed_cfg: SpeedConfig):
    torch.manual_seed(0)
    f, g = f_net(zero_init_last=False).to(dev).eval(), g_net(zero_init_last=False).to(dev).eval()
    return for_inference(f, g, speed_cfg, torch.device(dev))


def _restore_ms(dev: str, z: Sizes, size: tuple[int, int], speed_cfg: SpeedConfig) -> dict:
    """F + 3 G on one image through the speed layer as deblurring runs it (its first-call check included)."""
    from golf_dist.inference.engine import restore_iterates

    f, g = _networks(dev, speed_cfg)
    image = torch.rand(1, 3, *size, device=dev, generator=None)

    def run() -> None:
        with torch.no_grad(), _autocast(dev, z.precision):
            restore_iterates(f, g, image, 3)

    ms = _median_ms(run, dev, 1, 3 if dev == "cuda" else 1)
    return {"size": f"{size[1]}x{size[0]}", "ms": round(ms, 3), "speed_fallback": fallbacks_of(f, g)}


def _bf16_row(dev: str, z: Sizes) -> dict:
    """F + 3 G in bf16 autocast against fp32 on one image: the PSNR of the difference (pixels in [0, 1])."""
    torch.manual_seed(0)
    f, g = f_net(zero_init_last=False).to(dev).eval(), g_net(zero_init_last=False).to(dev).eval()
    image = torch.rand(1, 3, z.infer, z.infer, device=dev)

    def restore(precision: str) -> torch.Tensor:
        with torch.no_grad(), _autocast(dev, precision):
            y = f(image)
            for _ in range(3):
                y = g(y)
        return y.float().clamp(0, 1)

    mse = (restore("bf16") - restore("fp32")).pow(2).mean().item()
    return {"psnr_bf16_vs_fp32_db": round(10 * math.log10(1 / mse), 2) if mse > 0 else math.inf}


def _memory_row(unroll: int, dev: str, z: Sizes) -> dict:
    if dev != "cuda":  # torch.profiler's allocation events take minutes on a 2-core CPU
        raise _Skip("peak memory is measured on CUDA here (on a CPU: launch/benchmark.py's memory rows)")
    peak = stage_g_peak_bytes(unroll, True, z.memory_batch, z.memory_crop, dev, z.precision)
    return {"peak_bytes": peak, "peak_gib": round(peak / GIB, 4), "batch": z.memory_batch, "crop": z.memory_crop}


def _dali_row(shards: str | None, dev: str, z: Sizes) -> dict:
    """The DALI crop path against the PyTorch loader: the same first batch, and batches per second of each."""
    from golf_dist.config import load_config
    from golf_dist.configs import PAPER_CONFIG
    from golf_dist.data.dali import dali_import_error
    from golf_dist.data.loaders import make_train_loader
    from golf_dist.data.torch_loader import ShardPairs

    if shards is None:
        raise _Skip("needs --shards DIR (a shard folder: data_prep/shard_gopro.py)")
    if dali_import_error():
        raise _Skip(f"DALI is not installed: {dali_import_error()}")
    cfg = load_config(
        PAPER_CONFIG, "f", [f"data.shards={shards}", f"data.crop={z.crop}", "data.num_workers=0", "seed=1"]
    )
    pairs, found = ShardPairs(shards, "train"), {}
    for kind in ("torch", "dali"):
        loader = make_train_loader(
            cfg,
            pairs,
            global_batch=z.batch,
            accum=1,
            world=1,
            rank=0,
            start_step=0,
            device=torch.device(dev),
            loader=kind,
        )
        batches = iter(loader)
        t0 = time.perf_counter()
        first = next(batches)[0].to(dev)
        for _ in range(z.steps):
            next(batches)
        found[kind] = (first, z.steps / max(time.perf_counter() - t0, 1e-9))
        loader.close()
    if not torch.equal(found["torch"][0], found["dali"][0]):
        raise GolfError("DALI's first batch differs from the PyTorch loader's (the same crops expected)")
    return {
        "same_crops": True,
        "torch_batches_per_s": round(found["torch"][1], 2),
        "dali_batches_per_s": round(found["dali"][1], 2),
    }


def _evaluation_row(shards: str | None, dev: str, z: Sizes, speed_cfg: SpeedConfig) -> dict:
    """evaluate_pairs (PSNR and SSIM, F + 3 G) over two test pairs through the speed layer."""
    from golf_dist.data.torch_loader import ShardPairs
    from golf_dist.evaluation.validation import evaluate_pairs

    if shards is None:
        raise _Skip("needs --shards DIR (a shard folder with a test split)")
    f, g = _networks(dev, speed_cfg)
    t0 = time.perf_counter()
    result = evaluate_pairs(f, g, ShardPairs(shards, "test"), 3, torch.device(dev), limit=2, samples=0)
    return {
        "pairs": result["pairs"],
        "psnr": round(result["psnr"], 3),
        "seconds": round(time.perf_counter() - t0, 2),
        "speed_fallback": fallbacks_of(f, g),
    }


def _onnx_row(dev: str, z: Sizes, work: Path) -> dict:
    """F exported to ONNX (golf_dist.inference.export's parity check) and run by ONNX Runtime on one image."""
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None:
        raise _Skip("onnxruntime is not installed")
    from golf_dist.inference.engine import OnnxNetwork
    from golf_dist.inference.export import _export_one

    torch.manual_seed(0)
    difference = _export_one(f_net(zero_init_last=False).eval(), "F", work / "f.onnx")
    net, image = OnnxNetwork(work / "f.onnx", "F"), torch.rand(1, 3, z.infer, z.infer)
    ms = _median_ms(lambda: net(image), "cpu", 1, 3)
    return {
        "parity_max_abs_difference": float(f"{difference:.3g}"),
        "f_ms": round(ms, 3),
        "providers": net.session.get_providers(),
    }


class _Skip(Exception):
    """A row that cannot run here, and why."""


def rows_to_run(dev: str, z: Sizes, shards: str | None, work: Path) -> list[tuple[str, Callable[[], dict]]]:
    # inference through the speed layer as evaluation and deblurring run it: its defaults on CUDA; on a CPU
    # channels_last at try, so the first-call check runs (compile is covered by the training rows)
    speed_cfg = SpeedConfig(compile_backend=z.compile_backend) if dev == "cuda" else SpeedConfig(channels_last="try")
    rows: list[tuple[str, Callable[[], dict]]] = []
    for stage in ("f", "g"):
        rows.append((f"train_{stage} eager", lambda stage=stage: _train_row(stage, EAGER, dev, z)))
        for switch in SWITCHES:
            rows.append(
                (
                    f"train_{stage} {switch}",
                    lambda stage=stage, switch=switch: (
                        _skip_if(_needs_cuda(switch, dev))
                        or _train_row(stage, _alone(switch, z.compile_backend), dev, z)
                    ),
                )
            )
    rows += [
        ("bf16 vs fp32", lambda: _bf16_row(dev, z)),
        ("memory g unroll 8", lambda: _memory_row(8, dev, z)),
        ("memory g unroll 32", lambda: _memory_row(32, dev, z)),
        ("dali vs torch loader", lambda: _dali_row(shards, dev, z)),
        ("evaluation", lambda: _evaluation_row(shards, dev, z, speed_cfg)),
        ("infer 256", lambda: _restore_ms(dev, z, (z.infer, z.infer), speed_cfg)),
        ("deblur 1280x720", lambda: _restore_ms(dev, z, z.frame, speed_cfg)),
        ("onnxruntime", lambda: _onnx_row(dev, z, work)),
    ]
    return rows


def _skip_if(why: str | None) -> None:
    if why:
        raise _Skip(why)


def _judge(name: str, figures: dict, dev: str) -> str | None:
    """Against the README's goal, where the row has one: "met", "missed", or why it is not judged."""
    if name not in GOALS:
        return None
    key, op, value = GOALS[name]
    if dev != "cuda":
        return f"goal {key} {op} {value:g} (H100, bf16): not judged on a CPU"
    got = figures[key]
    met = got >= value if op == ">=" else got <= value
    return f"{'met' if met else 'missed'}: {key} {got:g} {op} {value:g}"


def run_check(device: str, shards: str | None = None, budget_s: float = 480.0, work: Path | None = None) -> dict:
    """Every row, in order, each ok / skipped / failed, until `budget_s` seconds are spent (the rest skipped)."""
    if device not in SIZES:
        raise ConfigError(f"--device must be cuda or cpu, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise GolfError("--device cuda: no CUDA device is visible to torch (use --device cpu for the tiny table)")
    z, start, results = SIZES[device], time.monotonic(), []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        rows = rows_to_run(device, z, shards, Path(work or tmp))
        for name, run in tqdm(rows, desc="gpu check", unit="row", dynamic_ncols=True):
            row = {"row": name}
            t0 = time.monotonic()
            if t0 - start > budget_s:
                row.update(status="skipped", why=f"the time budget of {budget_s:g} s was spent")
            else:
                try:
                    row.update(status="ok", **run())
                except _Skip as why:
                    row.update(status="skipped", why=str(why))
                except Exception as err:  # noqa: BLE001 - a row's failure is its result; the others still run
                    row.update(status="failed", why=first_line(err))
                finally:
                    apply_backend_flags(EAGER)
            row["seconds"] = round(time.monotonic() - t0, 2)
            if row["status"] == "ok" and (verdict := _judge(name, row, device)):
                row["goal"] = verdict
            results.append(row)
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "sizes": z.__dict__,
        "rows": results,
        "seconds": round(time.monotonic() - start, 1),
    }


def table(report: dict) -> str:
    """The rows as a Markdown table: row, status, figures, goal."""
    lines = [
        f"GPU check on {report['device']}, torch {report['torch']} ({report['seconds']} s)",
        "",
        "| row | status | figures | goal |",
        "| --- | --- | --- | --- |",
    ]
    for row in report["rows"]:
        figures = ", ".join(
            f"{k} {v}"
            for k, v in row.items()
            if k not in ("row", "status", "why", "goal", "seconds") and v not in ([], None)
        )
        status = row["status"] + (f": {row['why']}" if "why" in row else "")
        lines.append(f"| {row['row']} | {status} | {figures} | {row.get('goal', '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--device",
        default="cuda",
        choices=sorted(SIZES),
        help="cuda: the goals' sizes (one GPU, bf16); cpu: the same rows at tiny sizes",
    )
    parser.add_argument("--out", help="folder for gpu_check.json (default: print only)")
    parser.add_argument("--shards", help="a shard folder for the DALI and evaluation rows (skipped without)")
    parser.add_argument(
        "--budget",
        type=float,
        default=480.0,
        help="seconds after which the remaining rows are skipped (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    report = run_check(args.device, args.shards, args.budget)
    print(table(report))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "gpu_check.json", json.dumps(report, indent=2).encode())
        print(f"wrote {out / 'gpu_check.json'}")
    return 1 if any(row["status"] == "failed" for row in report["rows"]) else 0
