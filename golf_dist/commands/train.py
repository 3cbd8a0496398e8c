"""Train stage f (F alone) or stage g (G unrolled on top of the frozen F) of the Golf Optimizer.

    accelerate launch launch/train.py --config gopro --stage f  # the paper recipe, configs/gopro.yaml
    accelerate launch launch/train.py --config gopro --stage g --unroll 8
    golf-train --config demo --stage f                          # the embedded default (demo) on synthetic data
    python launch/train.py --config configs/demo.yaml --stage f train.steps=100 data.batch_size=8
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 launch/train.py ...   # two CPU processes (gloo)

A rerun with the same --output-dir resumes from the newest checkpoint of the stage.

Preemption: SIGUSR2 or SIGTERM to the training processes, or a file OUTPUT_DIR/<stage>/STOP (or
$GOLF_STOP_FILE), makes every rank stop after the current step, write a checkpoint and the marker
OUTPUT_DIR/<stage>/PREEMPTED, and exit with status 0 (infra/slurm/train.sbatch requeues on the marker).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from golf_dist.commands.common import run_main
from golf_dist.config import load_config, parse_overrides
from golf_dist.configs import bundled_names
from golf_dist.training import preemption


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Overrides: any config key as key=value, e.g. train.lr=5e-4 data.batch_size=8 "
        "(see configs/gopro.yaml for the keys). Unknown keys and wrong types are errors (exit 2).",
    )
    parser.add_argument(
        "--config",
        default="demo",
        help="a YAML file, or the name of a config bundled with the "
        f"package ({', '.join(bundled_names())}; default: %(default)s)",
    )
    parser.add_argument("--stage", required=True, choices=["f", "g"], help="f: train F; g: train G on the frozen F")
    parser.add_argument("--unroll", type=int, help="N unrolled G steps (same as train.unroll=N)")
    parser.add_argument("--output-dir", help="where checkpoints and weights go (same as output_dir=DIR)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)
    preemption.install()  # from the start: a SIGUSR2 during start-up must not kill the process
    overrides = parse_overrides(args.overrides)
    if args.unroll is not None:
        overrides.append(f"train.unroll={args.unroll}")
    if args.output_dir is not None:
        overrides.append(f"output_dir={args.output_dir}")
    cfg = load_config(args.config, stage=args.stage, overrides=overrides)

    from golf_dist.training.trainer import train_stage  # heavy imports after the config is known to be good

    result = train_stage(cfg, args.stage)
    if result.get("preempted"):
        # The checkpoint, the PREEMPTED marker and the MLflow run are written: exit now, without the interpreter's
        # teardown (unloading DALI and torch takes seconds, more on a loaded node). SLURM
        # SIGKILLs what still runs KillWait (30 s) after its SIGTERM, the batch script's requeue included.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def cli() -> None:
    """The `golf-train` command (pyproject.toml [project.scripts]); launch/train.py runs the same."""
    run_main(main)
