"""Pack GOPRO_Large (or the synthetic set) into WebDataset tar shards plus a manifest: see --help."""

from __future__ import annotations

import argparse

from golf_dist.cli import run_main
from golf_dist.data.shards import SPLITS, format_summary, shard_gopro


def _splits(text: str) -> tuple[str, ...]:
    splits = tuple(s.strip() for s in text.split(",") if s.strip())
    if not splits or any(s not in SPLITS for s in splits) or len(set(splits)) != len(splits):
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(SPLITS)}, got {text!r}")
    return splits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python data_prep/shard_gopro.py",
        description="""\
Pack GOPRO_Large into WebDataset tar shards plus a manifest.

Reads SRC as shipped: SRC/{train,test}/<scene>/{blur,blur_gamma,sharp}/<frame>.png.
Checks every pair first (decodable PNGs, each blur frame with a sharp twin of the same
size) and writes nothing if any is bad. Then writes OUT/{split}/{split}-NNNNNN.tar and,
last, OUT/manifest.json. A sample is <scene>-<frame>.blur.png and .sharp.png (the original
PNG bytes) and .json (source paths and frame size). Train samples are shuffled across
scenes with --seed; test samples keep their sorted order.

With no arguments it reads ./GOPRO_Large and writes ./GOPRO_shards. The output is
byte-for-byte reproducible; an interrupted run is finished by running the same command
again (complete shards are kept).""",
        epilog="""\
No GoPro? Download GOPRO_Large from the GoPro deblurring dataset page (Nah et al.,
CC BY 4.0) and unpack it so that GOPRO_Large/train/<scene>/blur/*.png exists,
or make a synthetic set in the same layout:
  python data_prep/synth_gopro.py --out GOPRO_Large
Then point training at the shards: `data.shards: GOPRO_shards` (the --out folder).""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--src", default="GOPRO_Large", help="the GOPRO_Large folder (default: ./GOPRO_Large)")
    parser.add_argument(
        "--out", default="GOPRO_shards", help="folder for shards and manifest (default: ./GOPRO_shards)"
    )
    parser.add_argument(
        "--blur-dir",
        choices=("blur", "blur_gamma"),
        default="blur",
        help="which blurred frames to pack: blur (most results since 2019) or blur_gamma (the original paper); "
        "default: blur",
    )
    parser.add_argument("--maxcount", type=int, default=64, help="samples per shard (default: 64)")
    parser.add_argument(
        "--workers", type=int, default=None, help="processes checking pairs and writing shards (default: min(4, CPUs))"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the train shuffle (default: 0)")
    parser.add_argument(
        "--splits", type=_splits, default=SPLITS, help="comma-separated splits to pack (default: train,test)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace shards and manifest in OUT written with other arguments or another source (refused otherwise)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    result = shard_gopro(
        args.src,
        args.out,
        splits=args.splits,
        blur_dir=args.blur_dir,
        maxcount=args.maxcount,
        workers=args.workers,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(format_summary(args.out, result))
    return 0


if __name__ == "__main__":
    run_main(main)
