#!/usr/bin/env python
"""Evaluate a trained F + G on full frames of the test shards: PSNR and SSIM of the output and of the

A thin wrapper over golf_dist/commands/evaluate.py, installed as the command `golf-evaluate` as well; --help says more.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from golf_dist.commands.evaluate import cli  # noqa: E402

if __name__ == "__main__":
    cli()
