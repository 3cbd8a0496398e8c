#!/usr/bin/env python
"""Export a trained F + G as ONNX graphs (dynamic batch, height and width) for other runtimes.

A thin wrapper over golf_dist/commands/export.py, installed as the command `golf-export` as well; --help says more.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from golf_dist.commands.export import cli  # noqa: E402

if __name__ == "__main__":
    cli()
