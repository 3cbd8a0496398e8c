"""Benchmark the Golf networks, or the data loaders, on one machine; prints one JSON line.

    python launch/benchmark.py [--what model] [--device cpu|cuda] [--batch 16] [--crop 256] [--unroll 8]
        [--precision fp32|bf16] [--steps K] [--warmup W] [--memory-unrolls 4,8,16,32]
        [--skip-memory] [--skip-720p] [--perceptual] [--vgg-weights PATH]
        [--compile on|off|auto] [--compile-backend inductor|aot_eager] [--channels-last auto|on|off] [--skip-speed]
    python launch/benchmark.py --what data --shards DIR [DIR ...] [--loader dali|torch] [--device cpu|gpu]
        [--batch 16] [--crop 256] [--crops-per-frame K] [--steps N] [--warmup W] [--workers W] [--repeats R]

--what model (the default): the networks' training and inference cost on random tensors. Settings left
out take the device's defaults (golf_dist.perf.benchmark.DEFAULTS): small on CPU. Eager PyTorch and the speed
layer (golf_dist/perf/speed.py: torch.compile, channels_last, TF32, cudnn.benchmark, fused Adam) are measured in
the same run: eager at the top level, the speed layer under "speed_layer", their ratios under "speedup".
--what data: (blur, sharp) crop pairs per second each loader delivers onto the device from each shard
folder (one folder per format), `pairs_per_s` keyed "format/loader"; both loaders unless --loader.
"""

from __future__ import annotations

import argparse
import json

from golf_dist.commands.common import run_main
from golf_dist.perf.benchmark import make_settings, run_benchmark
from golf_dist.perf.benchmark_data import make_data_settings, run_data_benchmark


def _unroll_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 4,8,16, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--what", choices=["model", "data"], default="model", help="the networks (default) or the loaders")
    p.add_argument("--device", choices=["cpu", "cuda", "gpu"], default="cpu", help="gpu is cuda")
    p.add_argument("--batch", type=int, help="crops per training step (model: cpu 4, cuda 16; data: 16)")
    p.add_argument("--crop", type=int, help="crop side in pixels (model: cpu 64, cuda 256; data: 256)")
    p.add_argument("--shards", nargs="+", help="data: shard folders (made by shard_gopro.py), e.g. one per format")
    p.add_argument("--loader", choices=["dali", "torch"], help="data: only this loader (default: both)")
    p.add_argument("--crops-per-frame", type=int, help="data: windows cut from each decoded pair (1)")
    p.add_argument("--workers", type=int, help="data: torch loader processes = DALI threads (default: all CPUs)")
    p.add_argument("--split", default="train", help="data: the split to read (train)")
    p.add_argument("--repeats", type=int, help="data: interleaved rounds, the median is reported (3)")
    p.add_argument("--unroll", type=int, help="applications of G per stage-g training step (8)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument(
        "--steps",
        type=int,
        help="model: timed steps, the median is reported (cpu 5, cuda 10); data: timed batches (20)",
    )
    p.add_argument("--warmup", type=int, help="untimed steps (batches) first (model: cpu 1, cuda 3; data: 3)")
    p.add_argument("--memory-unrolls", type=_unroll_list, help="unroll depths of the memory table (4,8,16,32)")
    p.add_argument("--skip-memory", action="store_true", help="leave out the memory table")
    p.add_argument("--skip-720p", action="store_true", help="leave out the 1280x720 inference time (null)")
    p.add_argument("--perceptual", action="store_true", help="add the VGG perceptual term (lambda 5e-6)")
    p.add_argument("--vgg-weights", help="vgg11_bn-6002323d.pth; without it torch hub's cache, else random VGG weights")
    p.add_argument("--skip-speed", action="store_true", help="model: leave out the speed layer's column")
    p.add_argument(
        "--compile",
        choices=["auto", "on", "off"],
        default="on",
        help="model, speed layer: torch.compile F and G (default: %(default)s)",
    )
    p.add_argument(
        "--compile-backend",
        choices=["inductor", "aot_eager", "eager", "cudagraphs"],
        default="inductor",
        help="model, speed layer: torch.compile's backend (default: %(default)s)",
    )
    p.add_argument(
        "--channels-last",
        choices=["auto", "on", "off"],
        default="auto",
        help="model, speed layer: NHWC weights and inputs (default: %(default)s, on for cuda)",
    )
    p.add_argument(
        "--fused-norm",
        choices=["auto", "on", "off"],
        default="auto",
        help="model, speed layer: InstanceNorm + ReLU as one Triton kernel (default: %(default)s: "
        "on for cuda when --compile is off)",
    )
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="model: also write each step's top operators (kernels on cuda) to DIR/profile_*.txt, "
        'eager and speed layer, and put them in the JSON under "profile"',
    )
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    a = p.parse_args(argv)
    if a.what == "data" and a.profile:
        p.error("--profile belongs to --what model")
    if a.what == "data":
        data = make_data_settings(
            a.shards or [],
            a.loader,
            a.device,
            split=a.split,
            crop=a.crop,
            batch=a.batch,
            crops_per_frame=a.crops_per_frame,
            batches=a.steps,
            warmup=a.warmup,
            workers=a.workers,
            repeats=a.repeats,
        )
        print(json.dumps(run_data_benchmark(data)), flush=True)
        return 0
    if a.shards or a.loader or a.crops_per_frame or a.workers or a.repeats:
        p.error("--shards, --loader, --crops-per-frame, --workers and --repeats belong to --what data")
    settings = make_settings(
        "cuda" if a.device == "gpu" else a.device,
        batch=a.batch,
        crop=a.crop,
        unroll=a.unroll,
        precision=a.precision,
        steps=a.steps,
        warmup=a.warmup,
        memory_unrolls=a.memory_unrolls,
        skip_memory=a.skip_memory,
        skip_720p=a.skip_720p,
        perceptual=a.perceptual,
        vgg_weights=a.vgg_weights,
        skip_speed=a.skip_speed,
        compile=a.compile,
        compile_backend=a.compile_backend,
        channels_last=a.channels_last,
        fused_norm=a.fused_norm,
        profile=a.profile,
    )
    print(json.dumps(run_benchmark(settings)), flush=True)
    return 0


def cli() -> None:
    """The `golf-benchmark` command (pyproject.toml [project.scripts]); launch/benchmark.py runs the same."""
    run_main(main)
