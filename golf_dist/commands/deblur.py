"""Deblur your own images (PNG/JPEG files or folders, any size) with a trained F + G; writes PNGs.

python launch/deblur.py --output-dir runs/demo photo.jpg more_photos/ --out deblurred/
python launch/deblur.py --output-dir runs/demo photo.jpg --out deblurred/ --ensemble x8   # 8 passes, averaged
python launch/deblur.py --output-dir runs/demo photo.jpg --out deblurred/ --iterations auto  # G until converged
python launch/deblur.py --output-dir onnx/ photo.jpg --out deblurred/ --engine onnxruntime  # launch/export.py's
"""

from __future__ import annotations

import argparse
from pathlib import Path

from golf_dist.commands.common import add_ensemble_argument, add_iterations_arguments, run_main
from golf_dist.inference.engine import AutoIterations, parse_iterations
from golf_dist.inference.tiling import MAX_TILES, MIN_TILE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--output-dir", required=True, help="training output folder holding f.safetensors and g.safetensors"
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders (searched recursively)")
    parser.add_argument(
        "--out",
        required=True,
        help="folder for the deblurred PNGs: a file's output is OUT/NAME.png, "
        "a folder's OUT/FOLDER/PATH.png; never an input (refused, nothing written)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace outputs that exist already (default: refuse them, nothing written); an input is never replaced",
    )
    add_iterations_arguments(parser, "3, the paper's")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument(
        "--tile",
        type=int,
        help=f"run on overlapping tiles of this side (at least {MIN_TILE}), for "
        f"images too large to run whole; at most {MAX_TILES} tiles an image (default: whole images)",
    )
    parser.add_argument("--overlap", type=int, default=32, help="pixels tiles overlap by (default: %(default)s)")
    add_ensemble_argument(parser)
    parser.add_argument(
        "--engine",
        default="torch",
        choices=("torch", "onnxruntime"),
        help="torch: OUTPUT_DIR's f/g.safetensors; onnxruntime: its f.onnx and g.onnx, written by "
        "launch/export.py --onnx (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    iterations = parse_iterations(
        "3" if args.iterations is None else args.iterations, args.tolerance, args.max_iterations
    )
    from golf_dist.inference.deblur import deblur_files

    def report(path: Path, used: int) -> None:  # auto: how many G iterations each image took
        print(f"{path}: {used} G iteration{'s' if used != 1 else ''}", flush=True)

    written = deblur_files(
        Path(args.output_dir),
        args.inputs,
        Path(args.out),
        iterations,
        args.device,
        tile=args.tile,
        overlap=args.overlap,
        ensemble=args.ensemble,
        engine=args.engine,
        overwrite=args.overwrite,
        on_image=report if isinstance(iterations, AutoIterations) else None,
    )
    print(f"wrote {len(written)} image(s) to {args.out}")
    return 0


def cli() -> None:
    """The `golf-deblur` command (pyproject.toml [project.scripts]); launch/deblur.py runs the same."""
    run_main(main)
