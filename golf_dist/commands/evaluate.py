"""Evaluate a trained F + G on full frames of the test shards: PSNR and SSIM of the output and of the
blurred input, and the mean PSNR after each G iteration 0..N (the 'golf' convergence).

    python launch/evaluate.py --output-dir runs/demo --iterations 3
    python launch/evaluate.py --output-dir runs/demo --ensemble x8 --register golf-demo   # + an MLflow model
    python launch/evaluate.py --output-dir runs/demo --iterations auto     # G until each frame has converged
    accelerate launch launch/evaluate.py --output-dir runs/gopro     # pairs spread over ranks, exact mean

The last line printed is one JSON object (psnr, ssim, input_psnr, input_ssim, psnr_per_iteration, ...).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from golf_dist.commands.common import add_ensemble_argument, add_iterations_arguments, run_main
from golf_dist.config import load_config, parse_overrides
from golf_dist.configs import PAPER_CONFIG
from golf_dist.errors import ConfigError
from golf_dist.inference.engine import check_iterations, parse_iterations
from golf_dist.inference.tiling import MAX_TILES, MIN_TILE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, help="training output folder (f.safetensors, g.safetensors)")
    add_iterations_arguments(parser, "eval.iterations of the run's config, paper: 3")
    parser.add_argument("--shards", help="shard folder (default: data.shards of the run's config)")
    parser.add_argument("--split", default="test", help="split to evaluate (default: %(default)s)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N pairs")
    parser.add_argument(
        "--tile",
        type=int,
        help=f"run on overlapping tiles of this side (at least {MIN_TILE}, at "
        f"most {MAX_TILES} tiles a frame; default: whole frames)",
    )
    parser.add_argument("--overlap", type=int, default=32, help="pixels tiles overlap by (default: %(default)s)")
    add_ensemble_argument(parser)
    parser.add_argument(
        "--register",
        metavar="NAME",
        help="log F + G as an MLflow pyfunc model into the evaluation's "
        "run and register it as NAME, with its test PSNR as a tag",
    )
    parser.add_argument(
        "--path-root",
        metavar="DIR",
        help="with --register: the folder whose PNG/JPEG files the "
        "served model may read through its 'path' column (default: none; callers send pixels)",
    )
    parser.add_argument("--config", help="config for tracking.* and eval.* (default: the run's resolved config)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. tracking.uri=...")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    config = args.config
    if config is None:
        resolved = [out / s / "config.yaml" for s in ("g", "f") if (out / s / "config.yaml").is_file()]
        config = resolved[0] if resolved else PAPER_CONFIG  # its tracking.* and eval.* are the schema's defaults
    cfg = load_config(config, overrides=parse_overrides(args.overrides))
    if args.iterations is None:
        check_iterations(cfg.eval.iterations, "eval.iterations")
    iterations = parse_iterations(
        cfg.eval.iterations if args.iterations is None else args.iterations, args.tolerance, args.max_iterations
    )

    from golf_dist.evaluation.workflow import print_result, run_evaluation
    from golf_dist.inference.tiling import check_tiling

    if args.path_root is not None and not args.register:
        raise ConfigError("--path-root applies to the model --register NAME logs: give --register too")
    if args.path_root is not None and not Path(args.path_root).is_dir():
        raise ConfigError(f"--path-root {args.path_root} is not a folder")

    check_tiling(args.tile, args.overlap)
    result = run_evaluation(
        out,
        args.shards or cfg.data.shards,
        args.split,
        iterations,
        args.limit,
        cfg.tracking,
        tile=args.tile,
        overlap=args.overlap,
        ensemble=args.ensemble,
        register=args.register,
        speed_cfg=cfg.speed,
        path_root=args.path_root,
        on_bad_sample=cfg.data.on_bad_sample,
        cache_dir=cfg.data.cache_dir,
    )
    if result is not None:
        print_result(result)
    return 0


def cli() -> None:
    """The `golf-evaluate` command (pyproject.toml [project.scripts]); launch/evaluate.py runs the same."""
    run_main(main)
