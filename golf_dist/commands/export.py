"""Export a trained F + G for use outside golf-dist: ONNX graphs with dynamic batch, height and width.

    python launch/export.py --output-dir runs/demo --onnx runs/demo/onnx
    python launch/deblur.py --output-dir runs/demo/onnx photo.jpg --out deblurred/ --engine onnxruntime

Each graph is checked against PyTorch (max absolute difference at most 1e-4, fp32) before it is kept.
The last line printed is one JSON object: per network its path and the difference measured.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from golf_dist.commands.common import run_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, help="training output folder (f.safetensors, g.safetensors)")
    parser.add_argument("--onnx", required=True, metavar="OUT", help="folder for f.onnx and g.onnx")
    args = parser.parse_args(argv)
    from golf_dist.inference.export import export_onnx

    print(json.dumps(export_onnx(Path(args.output_dir), Path(args.onnx)), sort_keys=True), flush=True)
    return 0


def cli() -> None:
    """The `golf-export` command (pyproject.toml [project.scripts]); launch/export.py runs the same."""
    run_main(main)
