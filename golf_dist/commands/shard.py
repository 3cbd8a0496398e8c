"""Pack GOPRO_Large (or the synthetic set) into WebDataset tar shards plus a manifest: see --help."""

from __future__ import annotations

import argparse

from golf_dist.commands.common import run_main
from golf_dist.data.formats import DEFAULT_TEST_FORMAT, DEFAULT_TRAIN_FORMAT, FORMATS
from golf_dist.data.prep.shard_verify import format_verify, verify_shards
from golf_dist.data.prep.sharding import format_summary, merge_parts, shard_gopro
from golf_dist.data.shard_reader import SPLITS


def _splits(text: str) -> tuple[str, ...]:
    splits = tuple(s.strip() for s in text.split(",") if s.strip())
    if not splits or any(s not in SPLITS for s in splits) or len(set(splits)) != len(splits):
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(SPLITS)}, got {text!r}")
    return splits


DESCRIPTION = """\
Pack GOPRO_Large into WebDataset tar shards plus a manifest.

Reads SRC as shipped: SRC/{train,test}/<scene>/{blur,blur_gamma,sharp}/<frame>.png.
Checks every pair first (decodable PNGs, each blur frame with a sharp twin of the same
size) and writes nothing if any is bad. Then writes OUT/{split}/{split}-NNNNNN.tar and,
last, OUT/manifest.json. Beside each shard it writes
its DALI index (OUT/{split}/{split}-NNNNNN.idx, for fn.readers.webdataset index_paths).
A sample is <scene>-<frame>.blur.EXT and .sharp.EXT and .json (source paths and frame
size); EXT is the split's format: png (the original PNG bytes), jp2 (lossless JPEG 2000,
GPU-decodable through DALI/nvJPEG2000) or npy (raw uint8 HxWx3, no decode at all). All
three decode to exactly the source pixels. By default the training split is npy (the
fastest to train from, about 11.7 GB for GoPro's 2,103 pairs against 6.4 GB as PNG) and the
test split PNG (--format, --test-format). Train samples are shuffled across scenes
with --seed; test samples keep their sorted order.

With no arguments it reads ./GOPRO_Large and writes ./GOPRO_shards. The output is
byte-for-byte reproducible; an interrupted (even SIGKILLed) run is finished by running
the same command again (complete shards are kept, partial ones never carry their final
name).

OUT may be s3://bucket/prefix: shards are staged in a temporary folder ($TMPDIR), each
uploaded with its SHA-256 in the object metadata, the manifest last; a rerun skips objects
already uploaded. Credentials come from boto3's standard chain (AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws, instance roles); AWS_ENDPOINT_URL names an
S3-compatible store.

Integrity: --verify OUT re-hashes every shard and index against the manifest and names
each one missing, truncated or changed (exit 1).

In parallel (a SLURM job array): --num-parts N --part I writes the shards whose global
index (train first, then test) is I modulo N plus OUT/parts/part-IIIII-of-NNNNN.json;
then the same command with --merge (and no --part) checks every part and writes the
manifest, the same bytes as a single run."""

EPILOG = """\
No GoPro? Download GOPRO_Large from the GoPro deblurring dataset page (Nah et al.,
CC BY 4.0) and unpack it so that GOPRO_Large/train/<scene>/blur/*.png exists,
or make a synthetic set in the same layout:
  python data_prep/synth_gopro.py --out GOPRO_Large
Then point training at the shards: `data.shards: GOPRO_shards` (the --out folder)."""


def build_parser() -> argparse.ArgumentParser:
    """The command line of golf-shard / data_prep/shard_gopro.py."""
    parser = argparse.ArgumentParser(
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
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
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default=DEFAULT_TRAIN_FORMAT,
        help="image format of the training split's members: png (source bytes), jp2 (lossless JPEG 2000), "
        "npy (raw uint8, the fastest to train from, about twice PNG's disk); default: %(default)s",
    )
    parser.add_argument(
        "--test-format",
        choices=FORMATS,
        default=DEFAULT_TEST_FORMAT,
        help="image format of the test split (read once per frame: compact is best); default: %(default)s",
    )
    parser.add_argument(
        "--verify",
        metavar="SHARD_DIR_OR_URL",
        default=None,
        help="check every shard and index of a finished set against its manifest (size and SHA-256) "
        "and exit 1 naming each missing, truncated or changed one; nothing is written",
    )
    parser.add_argument("--num-parts", type=int, default=1, help="split the work into N parts (default: 1)")
    parser.add_argument(
        "--part", type=int, default=None, help="write only part I (0-based) of --num-parts: a SLURM array task"
    )
    parser.add_argument(
        "--merge", action="store_true", help="after all --num-parts parts ran: check them and write the manifest"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verify is not None:
        result = verify_shards(args.verify, progress=not args.no_progress)
        print(format_verify(result))
        return 1 if result.problems else 0
    if args.merge and args.part is not None:
        parser.error("--merge and --part exclude each other: --merge runs once, after every part")
    if args.part is not None and args.num_parts < 2:
        parser.error("--part needs --num-parts N with N >= 2")
    if args.merge:
        result = merge_parts(
            args.src,
            args.out,
            num_parts=args.num_parts,
            splits=args.splits,
            blur_dir=args.blur_dir,
            maxcount=args.maxcount,
            seed=args.seed,
            image_format=args.format,
            test_format=args.test_format,
        )
        print(f"merged {args.num_parts} parts ({result.reused} shards) into {result.manifest_path}")
        print(format_summary(args.out, result).split("\n", 1)[1])
        return 0
    result = shard_gopro(
        args.src,
        args.out,
        splits=args.splits,
        blur_dir=args.blur_dir,
        maxcount=args.maxcount,
        workers=args.workers,
        seed=args.seed,
        image_format=args.format,
        test_format=args.test_format,
        num_parts=args.num_parts,
        part=args.part,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(format_summary(args.out, result))
    return 0


def cli() -> None:
    """The `golf-shard` command (pyproject.toml [project.scripts]); data_prep/shard_gopro.py runs the same."""
    run_main(main)
