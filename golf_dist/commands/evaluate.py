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
from golf_dist.data.prep.kernels import HELD_OUT_SHAPES
from golf_dist.errors import ConfigError
from golf_dist.evaluation.held_out import (
    BORDER,
    DEFAULT_CROP,
    DEFAULT_NOISE,
    parse_options,
    print_held_out,
    run_held_out,
)
from golf_dist.inference.engine import check_iterations, parse_iterations
from golf_dist.inference.tiling import MAX_TILES, MIN_TILE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, help="training output folder (f.safetensors, g.safetensors)")
    add_iterations_arguments(parser, "eval.iterations of the run's config, paper: 3")
    parser.add_argument("--shards", help="shard folder (default: data.shards of the run's config)")
    parser.add_argument("--split", help="split to evaluate (default: test)")
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
    add_held_out_arguments(parser)
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
    if args.held_out or any(getattr(args, flag) is not None for flag in HELD_OUT_OPTIONS):
        return held_out(args, out, iterations, cfg)
    result = run_evaluation(
        out,
        args.shards or cfg.data.shards,
        args.split or "test",
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


HELD_OUT_OPTIONS = ("held_out_crop", "held_out_kernels", "held_out_noise", "held_out_seed", "held_out_photographs")


def add_held_out_arguments(parser: argparse.ArgumentParser) -> None:
    held = parser.add_argument_group("held-out photographs (golf_dist/evaluation/held_out.py; docs/training.md)")
    held.add_argument(
        "--held-out",
        action="store_true",
        help="instead of the shards: photographs and kernel shapes training never sees, each kernel at each noise "
        f"level; PSNR in, out and gain per case away from a {BORDER}-pixel border, a summary, held_out.json, "
        "figures (also clock_motion.png, real camera blur, before and after) and an MLflow run",
    )
    held.add_argument(
        "--held-out-crop",
        type=int,
        metavar="N",
        help=f"central N x N crop of each photograph, a shorter side kept whole (default: {DEFAULT_CROP})",
    )
    held.add_argument(
        "--held-out-kernels",
        metavar="SHAPE,...",
        help=f"held-out kernel shapes, comma-separated (default: all of {','.join(HELD_OUT_SHAPES)})",
    )
    held.add_argument(
        "--held-out-noise",
        metavar="SIGMA,...",
        help=f"noise sigmas of 255, comma-separated (default: {','.join(f'{n:g}' for n in DEFAULT_NOISE)})",
    )
    held.add_argument("--held-out-seed", type=int, metavar="N", help="seed of the kernels and noise (default: 0)")
    held.add_argument(
        "--held-out-photographs",
        nargs="+",
        metavar="FILE",
        help="sharp PNG or JPEG photographs to use instead of the seven shipped with scikit-image and matplotlib",
    )


def held_out(args: argparse.Namespace, out: Path, iterations, cfg) -> int:
    """--held-out (its options without it, and flags that only the shards' evaluation takes, are refused), then
    golf_dist.evaluation.held_out."""
    if not args.held_out:
        option = next(flag for flag in HELD_OUT_OPTIONS if getattr(args, flag) is not None)
        raise ConfigError(f"--{option.replace('_', '-')} applies to --held-out: give --held-out too")
    given = [flag for flag in ("shards", "split", "limit", "register", "path_root") if getattr(args, flag) is not None]
    if given:
        raise ConfigError(f"--{given[0].replace('_', '-')} applies to the shards' evaluation, not to --held-out")
    if not isinstance(iterations, int):  # the held-out table compares cases at one count of G iterations
        raise ConfigError("--iterations auto applies to the shards' evaluation, not to --held-out: give a count")
    options = parse_options(
        args.held_out_crop, args.held_out_kernels, args.held_out_noise, args.held_out_seed, args.held_out_photographs
    )
    result = run_held_out(
        out, iterations, cfg.tracking, options, cfg.speed, tile=args.tile, overlap=args.overlap, ensemble=args.ensemble
    )
    if result is not None:
        print_held_out(result)
    return 0


def cli() -> None:
    """The `golf-evaluate` command (pyproject.toml [project.scripts]); launch/evaluate.py runs the same."""
    run_main(main)
