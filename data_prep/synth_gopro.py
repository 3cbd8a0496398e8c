"""Make a synthetic GoPro-shaped deblurring set (no download needed): see --help."""

from __future__ import annotations

import argparse

from golf_dist.commands.common import run_main
from golf_dist.data.prep.synthetic import (
    CONTENTS,
    DEFAULT_NOISE,
    KERNEL_FAMILIES,
    Variety,
    format_summary,
    make_synthetic_gopro,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python data_prep/synth_gopro.py",
        description="""\
Write a synthetic deblurring set in the exact GOPRO_Large layout,
OUT/{train,test}/<scene>/{blur,sharp}/<frame>.png, from the natural photographs shipped
inside scikit-image (nothing is downloaded). A scene is one photograph seen along a slow
camera path; a blurred frame is its sharp frame convolved with a random camera-shake
kernel, plus Gaussian noise (--noise). Train and test scenes come from different photographs.
The same arguments always give the same bytes. An interrupted run leaves OUT untouched.""",
        epilog="""\
example: python data_prep/synth_gopro.py --out data/synth --train-pairs 48 --test-pairs 8 \\
             --height 256 --width 448
then:    python data_prep/shard_gopro.py --src data/synth --out data/synth_shards""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="folder to write train/ and test/ into (created if missing)")
    parser.add_argument("--train-pairs", type=int, default=64, help="blur/sharp pairs in train/ (default: 64)")
    parser.add_argument("--test-pairs", type=int, default=16, help="blur/sharp pairs in test/ (default: 16)")
    parser.add_argument("--height", type=int, default=720, help="frame height in pixels (default: 720, as GoPro)")
    parser.add_argument("--width", type=int, default=1280, help="frame width in pixels (default: 1280, as GoPro)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default: 0)")
    parser.add_argument(
        "--kernel-size",
        type=int,
        default=None,
        help="blur kernel size in pixels, odd (default: about min(height, width)/24, within 7..31)",
    )
    parser.add_argument(
        "--noise",
        type=float,
        nargs=2,
        default=list(DEFAULT_NOISE),
        metavar=("LOW", "HIGH"),
        help="sigma of the blurred frames' Gaussian noise, of 255, drawn per pair from LOW..HIGH "
        f"(default: {DEFAULT_NOISE[0]:g} {DEFAULT_NOISE[1]:g})",
    )
    parser.add_argument(
        "--content",
        default="photos",
        choices=CONTENTS,
        help="the training split's scene content: the photographs (default), every other scene procedural "
        "(mixed: dead leaves with textures, gradients, edges), or only procedural scenes; the test split "
        "is always photographs",
    )
    parser.add_argument(
        "--kernels",
        default="demo",
        choices=KERNEL_FAMILIES,
        help="blur kernels: the demo's camera shake (default), or the wide family (camera shake "
        "of three lengths, straight and curved motion, small defocus; canvas about "
        "min(height, width)/16, at least 15; a test pair's blurred frame is at most 30 dB)",
    )
    parser.add_argument(
        "--clean-share",
        type=float,
        default=0.0,
        metavar="P",
        help="share of pairs left without noise, the others drawn from --noise (default: 0)",
    )
    parser.add_argument("--frames-per-scene", type=int, default=4, help="consecutive frames per scene (default: 4)")
    parser.add_argument("--workers", type=int, default=None, help="processes rendering scenes (default: min(4, CPUs))")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace train/ and test/ if OUT already has them (refused otherwise)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    counts = make_synthetic_gopro(
        args.out,
        train_pairs=args.train_pairs,
        test_pairs=args.test_pairs,
        height=args.height,
        width=args.width,
        seed=args.seed,
        frames_per_scene=args.frames_per_scene,
        workers=args.workers,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        kernel=args.kernel_size,
        noise=tuple(args.noise),
        variety=Variety(args.content, args.kernels, args.clean_share),
    )
    print(format_summary(args.out, counts))
    return 0


if __name__ == "__main__":
    run_main(main)
