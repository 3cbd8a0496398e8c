"""The paper's experiments, one subcommand each; results to MLflow (experiment golf-paper), figures as PNG.

    python launch/experiment.py two-pixel --out runs/paper/two_pixel        # appendix, Tables 6-7, Figs. 10-14
    python launch/experiment.py forgetting --out runs/paper/forgetting      # Figure 5, on the demo's shards
    python launch/experiment.py g-convergence --output-dir runs/demo --out runs/paper/g_convergence
    python launch/experiment.py lambda-sweep --out runs/paper/lambda_sweep    # needs vgg11_bn-6002323d.pth

Each writes a JSON of its results beside its figure; the last line printed is a one-line JSON summary.
README.md, "Reproducing the paper", has each command's measured results against the paper's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from golf_dist.commands.common import run_main


def _tracking(args) -> str | None:
    if args.no_tracking:
        return None
    return args.tracking_uri or f"sqlite:///{Path(args.out).resolve() / 'mlflow.db'}"


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="experiment", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="folder for the results JSON and the figure")
    common.add_argument("--tracking-uri", help="MLflow store (default: sqlite:///OUT/mlflow.db)")
    common.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")

    toy = sub.add_parser(
        "two-pixel",
        parents=[common],
        help="the two-pixel prior: a discriminative prior against a learned gradient (appendix)",
    )
    toy.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="(default: %(default)s)")
    toy.add_argument("--train-pairs", type=_positive, default=16_000, help="(default: %(default)s, the paper's)")
    toy.add_argument("--test-points", type=_positive, default=1_000, help="(default: %(default)s, the paper's)")
    toy.add_argument("--steps", type=_positive, default=4_000, help="Adam steps (default: %(default)s, the paper's)")
    toy.add_argument(
        "--step-size",
        type=float,
        default=1.0,
        help="the discriminative prior's gradient step, u' = u - s grad p (default: %(default)s)",
    )
    forget = sub.add_parser(
        "forgetting", parents=[common], help="catastrophic forgetting: one F, two tasks, four schedules (Figure 5)"
    )
    forget.add_argument("--shards", default="runs/demo/shards", help="shard folder (default: %(default)s, the demo's)")
    forget.add_argument("--steps-per-phase", type=_positive, default=150, help="(default: %(default)s)")
    forget.add_argument("--val-every", type=_positive, default=30, help="(default: %(default)s)")
    forget.add_argument("--crop", type=_positive, default=64, help="(default: %(default)s)")
    forget.add_argument("--batch", type=_positive, default=8, help="(default: %(default)s)")
    forget.add_argument(
        "--train-pairs", type=_positive, default=128, help="training pairs decoded (default: %(default)s)"
    )
    forget.add_argument("--val-crops", type=_positive, default=32, help="fixed test crops (default: %(default)s)")
    conv = sub.add_parser("g-convergence", parents=[common], help="PSNR against G iteration 0..N of a trained run")
    conv.add_argument("--output-dir", required=True, help="training output folder (f.safetensors, g.safetensors)")
    conv.add_argument("--shards", default="runs/demo/shards", help="shard folder (default: %(default)s)")
    conv.add_argument("--iterations", type=_positive, default=10, help="G iterations (default: %(default)s)")
    conv.add_argument("--limit", type=_positive, help="only the first N test pairs")
    sweep = sub.add_parser(
        "lambda-sweep", parents=[common], help="F trained per perceptual weight (Figure 8); needs the VGG-11-BN weights"
    )
    sweep.add_argument("--config", default="configs/demo.yaml", help="training config (default: %(default)s)")
    sweep.add_argument(
        "--lambdas",
        type=float,
        nargs="+",
        default=[0.0, 5e-7, 5e-6, 5e-5],
        help="perceptual weights (default: %(default)s; the paper's is 5e-6)",
    )
    sweep.add_argument("--limit", type=_positive, help="score on the first N test pairs only")
    sweep.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    if args.experiment == "two-pixel":
        from golf_dist.experiments.two_pixel import ToyConfig, run_experiment

        cfg = ToyConfig(
            train_pairs=args.train_pairs, test_points=args.test_points, steps=args.steps, step_size=args.step_size
        )
        result = run_experiment(Path(args.out), args.seeds, cfg, _tracking(args))
        print(json.dumps({"median": result["median"], "figure": result["figure"]}, sort_keys=True), flush=True)
    elif args.experiment == "forgetting":
        from golf_dist.experiments.forgetting import ForgettingConfig
        from golf_dist.experiments.forgetting import run_experiment as run_forgetting

        cfg = ForgettingConfig(
            steps_per_phase=args.steps_per_phase,
            val_every=args.val_every,
            crop=args.crop,
            batch=args.batch,
            train_pairs=args.train_pairs,
            val_crops=args.val_crops,
        )
        result = run_forgetting(args.shards, Path(args.out), cfg, _tracking(args))
        print(json.dumps({"final": result["final"], "figure": result["figure"]}, sort_keys=True), flush=True)
    elif args.experiment == "g-convergence":
        from golf_dist.experiments.convergence import run_experiment as run_convergence

        result = run_convergence(
            Path(args.output_dir), args.shards, args.iterations, Path(args.out), args.limit, _tracking(args)
        )
        print(
            json.dumps(
                {k: result[k] for k in ("psnr_per_iteration", "best_iteration", "settled_after", "figure")},
                sort_keys=True,
            ),
            flush=True,
        )
    elif args.experiment == "lambda-sweep":
        from golf_dist.experiments.lambda_sweep import run_experiment as run_sweep

        result = run_sweep(args.config, args.overrides, args.lambdas, Path(args.out), args.limit, _tracking(args))
        print(json.dumps({"rows": result["rows"], "figure": result["figure"]}, sort_keys=True), flush=True)
    return 0


def cli() -> None:
    """The `golf-experiment` command (pyproject.toml [project.scripts]); launch/experiment.py runs the same."""
    run_main(main)
