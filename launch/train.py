#!/usr/bin/env python
"""Train stage f (F alone) or stage g (G unrolled on top of the frozen F) of the Golf Optimizer.

A thin wrapper over golf_dist/commands/train.py, installed as the command `golf-train` as well; --help says more.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from golf_dist.commands.train import cli  # noqa: E402

if __name__ == "__main__":
    cli()
