"""Benchmark the Golf networks on one device; prints one JSON line.

    python launch/benchmark.py [--device cpu|cuda] [--batch 16] [--crop 256] [--unroll 8]
        [--precision fp32|bf16] [--steps K] [--warmup W] [--memory-unrolls 4,8,16,32]
        [--skip-memory] [--skip-720p] [--perceptual] [--vgg-weights PATH]

Settings left out take the device's defaults (golf_dist.benchmark.DEFAULTS): small on CPU.
"""

from __future__ import annotations

import argparse
import json

from golf_dist.benchmark import make_settings, run_benchmark
from golf_dist.cli import run_main


def _unroll_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 4,8,16, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batch", type=int, help="crops per training step (cpu 4, cuda 16)")
    p.add_argument("--crop", type=int, help="crop side in pixels (cpu 64, cuda 256)")
    p.add_argument("--unroll", type=int, help="applications of G per stage-g training step (8)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--steps", type=int, help="timed steps, the median is reported (cpu 5, cuda 10)")
    p.add_argument("--warmup", type=int, help="untimed steps first (cpu 1, cuda 3)")
    p.add_argument("--memory-unrolls", type=_unroll_list, help="unroll depths of the memory table (4,8,16,32)")
    p.add_argument("--skip-memory", action="store_true", help="leave out the memory table")
    p.add_argument("--skip-720p", action="store_true", help="leave out the 1280x720 inference time (null)")
    p.add_argument("--perceptual", action="store_true", help="add the VGG perceptual term (lambda 5e-6)")
    p.add_argument("--vgg-weights", help="vgg11_bn-6002323d.pth; without it torch hub's cache, else random VGG weights")
    a = p.parse_args(argv)
    settings = make_settings(
        a.device, batch=a.batch, crop=a.crop, unroll=a.unroll, precision=a.precision, steps=a.steps,
        warmup=a.warmup, memory_unrolls=a.memory_unrolls, skip_memory=a.skip_memory, skip_720p=a.skip_720p,
        perceptual=a.perceptual, vgg_weights=a.vgg_weights,
    )
    print(json.dumps(run_benchmark(settings)), flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
