#!/usr/bin/env python
"""Deblur your own images (PNG/JPEG files or folders, any size) with a trained F + G; writes PNGs.

A thin wrapper over golf_dist/commands/deblur.py, installed as the command `golf-deblur` as well; --help says more.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from golf_dist.commands.deblur import cli  # noqa: E402

if __name__ == "__main__":
    cli()
