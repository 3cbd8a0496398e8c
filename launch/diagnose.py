#!/usr/bin/env python
"""Instruments for a run that does not learn (see docs/training-recipe.md).

    python launch/diagnose.py overfit --config configs/demo.yaml --stage f      # can F fit one batch?
    python launch/diagnose.py overfit --config configs/demo.yaml --stage g      # G on a fixed F
    python launch/diagnose.py loaders --config configs/demo.yaml --crops 64     # DALI's first crops vs torch's
    python launch/diagnose.py curves runs/demo --out runs/demo/curves.png       # validation / loss / grad norm
    python launch/diagnose.py crops --output-dir runs/demo                       # G's gain on crops vs frames
    python launch/diagnose.py headroom --output-dir runs/demo                    # what a linear fix of F gains
    python launch/diagnose.py headroom --output-dir runs/demo --on-input --kernel 15   # the linear baseline
    python launch/diagnose.py held-out-scale --output-dir runs/demo --held-out-kernels double_exposure

overfit: Adam on one fixed batch of training crops; passes (exit 0) when the loss falls by --factor within
--steps. loaders: the same statistics for the first crops of each loader, and every crop checked against
its source pair decoded by the shard reader; exit 1 when a crop does not match its source. curves: the
metrics.jsonl of each stage of each output folder, as one PNG. crops: a trained G's gain over F after each
iteration on random crops (F run on the crop, as stage g trains) and on the same whole frames (as
evaluation measures). headroom: the best linear correction of F's output (a k x k filter fitted by least
squares on training frames) scored on test frames, beside G's gain on the same frames: how much a simple
corrector finds left to correct; with --instance-norm also that correction as an InstanceNorm on G's
paths leaves it; with --on-input the filter works on the blurred input instead, the linear baseline F
should beat. held-out-scale: on the held-out photographs (golf-evaluate --held-out's cases), the gain of
the blurred input plus a fraction s of the restoration's correction, for each --scales s: a correction that
points the wrong way loses more as s grows; with --linear-baseline the restoration is the linear baseline
(headroom --on-input's filter) instead of F + G. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from golf_dist.commands.common import run_main  # noqa: E402
from golf_dist.config import load_config, parse_overrides  # noqa: E402
from golf_dist.errors import ConfigError  # noqa: E402


def _overfit(args) -> int:
    import torch

    from golf_dist.data.crop_plan import CropPlan
    from golf_dist.data.split_check import open_pairs
    from golf_dist.data.torch_loader import TrainCrops
    from golf_dist.evaluation.diagnostics import overfit_one_batch

    cfg = load_config(args.config, args.stage, parse_overrides(args.overrides))
    pairs = open_pairs(
        cfg.data.shards, cfg.data.train_split, cfg.data.on_bad_sample, cfg.data.cache_dir, min_side=cfg.data.crop
    )
    crops = TrainCrops(pairs, CropPlan(len(pairs), args.crop or cfg.data.crop, cfg.data.flips, cfg.seed))
    items = [crops[i] for i in range(args.batch)]
    blur, sharp = torch.stack([b for b, _, _ in items]), torch.stack([s for _, s, _ in items])
    f_model = None
    if args.stage == "g" and args.f_weights:
        from golf_dist.checkpoints import load_into
        from golf_dist.models import f_net

        f_model = load_into(f_net(), Path(args.f_weights), "F")
    history = overfit_one_batch(
        args.stage,
        blur,
        sharp,
        steps=args.steps,
        lr=args.lr,
        f_model=f_model,
        unroll_steps=cfg.train.unroll if args.unroll is None else args.unroll,
        seed=cfg.seed,
    )
    reached = next((i for i, v in enumerate(history) if v <= history[0] / args.factor), None)
    for i in range(0, len(history), max(1, len(history) // 10)):
        print(f"step {i:5d}: loss {history[i]:.3e} ({history[i] / history[0]:.3f} of the first)")
    verdict = (
        f"loss fell {args.factor:g}x by step {reached}"
        if reached is not None
        else f"loss did NOT fall {args.factor:g}x in {args.steps} steps "
        f"(lowest {min(history) / history[0]:.3f} of the first)"
    )
    print(f"overfit one batch, stage {args.stage}: {verdict}")
    print(
        json.dumps(
            {
                "stage": args.stage,
                "first": history[0],
                "last": history[-1],
                "reached_at": reached,
                "factor": args.factor,
                "steps": args.steps,
            }
        )
    )
    return 0 if reached is not None else 1


def _loaders(args) -> int:
    from golf_dist.evaluation.diagnostics import loader_stream

    cfg = load_config(args.config, "f", parse_overrides(args.overrides))
    rows = [loader_stream(cfg, kind, args.crops) for kind in args.loader]
    keys = [k for k in rows[0] if k != "loader"]
    print(f"{'':34s}" + "".join(f"{r['loader']:>24s}" for r in rows))
    for key in keys:  # the digest cut to 16 hex digits in the table (whole in the JSON line)
        print(
            f"{key:34s}"
            + "".join(f"{json.dumps(r[key][:16] if key == 'stream_sha256' else r[key]):>24s}" for r in rows)
        )
    print(json.dumps(rows))
    return 1 if any(r["crops_not_matching_their_source"] for r in rows) else 0


def _curves(args) -> int:
    from golf_dist.evaluation.plots import training_curves

    runs = {}
    for folder in args.output_dirs:
        for stage in ("f", "g"):
            if (Path(folder) / stage / "metrics.jsonl").is_file():
                runs[f"{Path(folder).name}/{stage}"] = Path(folder) / stage
    if not runs:
        print(f"no metrics.jsonl under {', '.join(args.output_dirs)} (expected DIR/f/metrics.jsonl)", file=sys.stderr)
        return 2
    path = training_curves(runs, Path(args.out))
    print(json.dumps({"figure": str(path), "runs": {k: str(v) for k, v in runs.items()}}))
    return 0


def _shards_of(out: Path, given: str | None) -> str:
    """The shard folder: --shards, else data.shards of the run's resolved config (stage g's, else stage f's)."""
    if given is not None:
        return given
    resolved = next((p for p in (out / "g" / "config.yaml", out / "f" / "config.yaml") if p.is_file()), None)
    if resolved is None:
        raise ConfigError(f"no config.yaml in {out / 'g'} or {out / 'f'}: pass --shards")
    return load_config(resolved).data.shards


def _crops(args) -> int:
    import torch

    from golf_dist.data.torch_loader import ShardPairs
    from golf_dist.evaluation.diagnostics import gain_on_crops_and_frames
    from golf_dist.inference.engine import load_trained

    out = Path(args.output_dir)
    shards = _shards_of(out, args.shards)
    f, g = load_trained(out, torch.device("cpu"), args.iterations)
    pairs = ShardPairs(shards, args.split)
    frames = [pairs.load(i)[:2] for i in range(min(args.pairs, len(pairs)))]
    result = gain_on_crops_and_frames(
        f, g, frames, crop=args.crop, iterations=args.iterations, crops_per_frame=args.crops_per_frame, seed=args.seed
    )
    for where in ("crops", "frames"):
        print(
            f"G's gain over F on {args.split} {where}, iterations 1..{args.iterations}: "
            + ", ".join(f"{v:+.4f}" for v in result[where])
            + " dB"
        )
    print(json.dumps({"split": args.split, "pairs": len(frames), "crop": args.crop, **result}))
    return 0


def _headroom(args) -> int:
    import torch

    from golf_dist.data.torch_loader import ShardPairs
    from golf_dist.evaluation.diagnostics import linear_headroom
    from golf_dist.inference.engine import load_trained

    out = Path(args.output_dir)
    shards = _shards_of(out, args.shards)
    if args.on_input:  # the filter from the blurred input itself: the linear baseline a trained F should beat
        f, g = torch.nn.Identity(), None
    else:
        with_g = (out / "g.safetensors").is_file()
        f, g = load_trained(out, torch.device("cpu"), args.iterations if with_g else 0)
    train, test = ShardPairs(shards, "train"), ShardPairs(shards, "test")
    result = linear_headroom(
        f,
        g,
        [train.load(i)[:2] for i in range(min(args.train_pairs, len(train)))],
        [test.load(i)[:2] for i in range(min(args.test_pairs, len(test)))],
        kernel=args.kernel,
        samples_per_frame=args.samples,
        iterations=args.iterations,
        seed=args.seed,
        instance_norm=args.instance_norm,
    )
    of, over = ("the blurred input", "the input") if args.on_input else ("F's output", "F")
    print(
        f"best linear {args.kernel}x{args.kernel} correction of {of}, fitted on {result['train_frames']} "
        f"training frames: {result['linear_gain']:+.4f} dB over {over} on {result['test_frames']} test frames"
    )
    if "normalised_gain" in result:
        print(
            f"the same correction through an InstanceNorm (its amplitude no longer following each frame's contrast): "
            f"{result['normalised_gain']:+.4f} dB"
        )
    if "g_gains" in result:
        print(
            "G's gain over F on the same frames, iterations 1..{}: {} dB".format(
                args.iterations, ", ".join(f"{v:+.4f}" for v in result["g_gains"])
            )
        )
    print(json.dumps(result))
    return 0


def _held_out_scale(args) -> int:
    import torch

    from golf_dist.data.torch_loader import ShardPairs, to_tensor
    from golf_dist.evaluation.diagnostics import fit_linear_correction
    from golf_dist.evaluation.held_out import (
        kernels_of,
        load_photographs,
        parse_options,
        scaled_correction_gains,
        summarise_scales,
    )
    from golf_dist.inference.engine import load_trained, restore_iterates

    if not args.scales or any(not s > 0 for s in args.scales):
        raise ConfigError(f"--scales takes fractions of the correction above 0, e.g. 0.5 1; got {args.scales}")
    if args.kernel < 1 or args.kernel % 2 == 0:
        raise ConfigError(f"--kernel must be an odd number >= 1, got {args.kernel}")
    options = parse_options(args.held_out_crop, args.held_out_kernels, args.held_out_noise, args.held_out_seed, None)
    photographs = load_photographs(options)
    out = Path(args.output_dir)
    if args.linear_baseline:  # headroom --on-input's filter: blurred training frames to their sharp frames
        train = ShardPairs(_shards_of(out, args.shards), "train")
        frames = [train.load(i)[:2] for i in range(min(args.train_pairs, len(train)))]
        blurs = [to_tensor(blur) for blur, _ in frames]
        residuals = [to_tensor(sharp) - b for b, (_, sharp) in zip(blurs, frames)]
        linear = fit_linear_correction(blurs, residuals, args.kernel, args.samples, args.seed)
        name = f"the linear {args.kernel}x{args.kernel} baseline fitted on {len(frames)} training frames"

        def restore(blur):
            return blur + linear(blur[0])[None].float()
    else:
        f, g = load_trained(out, torch.device("cpu"), args.iterations)
        name = f"F + {args.iterations} G" if args.iterations else "F"

        def restore(blur):
            return restore_iterates(f, g, blur, args.iterations)[-1]

    cases = scaled_correction_gains(
        restore, photographs, kernels_of(options), options, args.scales, torch.device("cpu")
    )
    print(f"held-out gain (dB) of the blurred input plus s times the correction of {name}:")
    print(f"{'photograph':<18} {'kernel':<21} {'noise':>5} " + "".join(f"{f's={s:g}':>9}" for s in args.scales))
    for c in cases:
        print(f"{c['photograph']:<18} {c['kernel']:<21} {c['noise']:>5g} " + "".join(f"{v:>+9.2f}" for v in c["gains"]))
    rows = summarise_scales(cases, args.scales)
    for row in rows:
        worst, clean = row["worst"], row["clean_mean_gain"]
        print(
            f"s={row['scale']:g}: mean {row['mean_gain']:+.2f} dB, noise-free "
            + ("-" if clean is None else f"{clean:+.2f} dB")
            + f", {row['improved']} of {len(cases)} improved, worst {worst['gain']:+.2f} dB "
            f"({worst['photograph']}, {worst['kernel']}, noise {worst['noise']:g})"
        )
    print(json.dumps({"restoration": name, "scales": args.scales, "summary": rows, "cases": cases}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "overfit", help="train F (or G on a fixed F) on one fixed batch; pass = the loss falls --factor x"
    )
    p.add_argument("--config", required=True, help="config whose data.shards and data.crop are used")
    p.add_argument("--stage", choices=("f", "g"), default="f")
    p.add_argument("--batch", type=int, default=4, help="crops in the batch (default: %(default)s)")
    p.add_argument("--crop", type=int, help="crop side (default: data.crop)")
    p.add_argument("--steps", type=int, default=300, help="Adam steps (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default: %(default)s)")
    p.add_argument("--factor", type=float, default=10.0, help="required loss reduction (default: %(default)s)")
    p.add_argument("--unroll", type=int, help="G iterates in the loss (default: train.unroll)")
    p.add_argument("--f-weights", help="stage g: a trained F (default: a fresh F, a fixed map all the same)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_overfit)
    p = sub.add_parser("loaders", help="the first training crops of the DALI and torch loaders, side by side")
    p.add_argument("--config", required=True)
    p.add_argument("--crops", type=int, default=64, help="crops per loader (default: %(default)s)")
    p.add_argument("--loader", nargs="+", choices=("dali", "torch"), default=["dali", "torch"])
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_loaders)
    p = sub.add_parser("curves", help="validation PSNR, loss and gradient norm of output folders as one PNG")
    p.add_argument("output_dirs", nargs="+", help="training output folders (holding f/ and g/)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.set_defaults(func=_curves)
    p = sub.add_parser(
        "crops", help="a trained G's gain per iteration on crops (F run on the crop) and on whole frames"
    )
    p.add_argument("--output-dir", required=True, help="training output folder holding f.safetensors and g.safetensors")
    p.add_argument("--shards", help="shard folder (default: data.shards of OUTPUT_DIR/g/config.yaml)")
    p.add_argument("--split", default="test", choices=("train", "test"), help="default: %(default)s")
    p.add_argument("--pairs", type=int, default=16, help="first pairs of the split (default: %(default)s)")
    p.add_argument("--crop", type=int, default=64, help="crop side (default: %(default)s)")
    p.add_argument("--crops-per-frame", type=int, default=3, help="random crops per frame (default: %(default)s)")
    p.add_argument("--iterations", type=int, default=3, help="G iterations (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the crop windows (default: %(default)s)")
    p.set_defaults(func=_crops)
    p = sub.add_parser("headroom", help="the best linear correction of F's output (least squares) beside G's gain")
    p.add_argument(
        "--output-dir", required=True, help="training output folder holding f.safetensors (and g.safetensors)"
    )
    p.add_argument("--shards", help="shard folder (default: data.shards of OUTPUT_DIR/g/config.yaml)")
    p.add_argument("--train-pairs", type=int, default=48, help="training frames to fit on (default: %(default)s)")
    p.add_argument("--test-pairs", type=int, default=16, help="test frames to score on (default: %(default)s)")
    p.add_argument("--kernel", type=int, default=7, help="filter side, odd (default: %(default)s)")
    p.add_argument("--samples", type=int, default=6000, help="pixels sampled per training frame (default: %(default)s)")
    p.add_argument("--iterations", type=int, default=3, help="G iterations (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled pixels (default: %(default)s)")
    p.add_argument(
        "--instance-norm",
        action="store_true",
        help="also score the filter's correction through an InstanceNorm (per frame and channel: zero mean, "
        "unit deviation, one fitted factor per channel), as every path through G passes one",
    )
    p.add_argument(
        "--on-input",
        action="store_true",
        help="fit the filter on the blurred input instead of F's output (no F, no G): the linear baseline, one "
        "fixed deblurring filter for all frames, that a trained F should beat",
    )
    p.set_defaults(func=_headroom)
    p = sub.add_parser(
        "held-out-scale",
        help="held-out gain of the input plus a fraction of the restoration's correction: does it point the right way?",
    )
    p.add_argument("--output-dir", required=True, help="training output folder holding f.safetensors (g.safetensors)")
    p.add_argument("--iterations", type=int, default=3, help="G iterations after F; 0: F alone (default: %(default)s)")
    p.add_argument(
        "--scales",
        type=float,
        nargs="+",
        default=[0.25, 0.5, 0.75, 1.0],
        help="fractions of the correction, each above 0 (default: %(default)s)",
    )
    p.add_argument("--held-out-kernels", help="held-out kernel shapes, comma-separated (default: all)")
    p.add_argument("--held-out-noise", help="noise sigmas of 255, comma-separated (default: 0,5)")
    p.add_argument("--held-out-crop", type=int, help="side of the photographs' central crop (default: 384)")
    p.add_argument("--held-out-seed", type=int, help="seed of the kernels and noise (default: 0)")
    p.add_argument(
        "--linear-baseline",
        action="store_true",
        help="scale the linear baseline's correction instead of F + G's: headroom --on-input's least-squares "
        "filter, fitted on the run's training frames (--kernel, --train-pairs, --samples, --seed, --shards)",
    )
    p.add_argument("--shards", help="with --linear-baseline: shard folder (default: data.shards of the run's config)")
    p.add_argument("--kernel", type=int, default=15, help="with --linear-baseline: filter side (default: %(default)s)")
    p.add_argument("--train-pairs", type=int, default=200, help="with --linear-baseline (default: %(default)s)")
    p.add_argument("--samples", type=int, default=6000, help="with --linear-baseline: pixels per training frame")
    p.add_argument("--seed", type=int, default=0, help="with --linear-baseline: seed of the sampled pixels")
    p.set_defaults(func=_held_out_scale)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    run_main(main)
