#!/usr/bin/env python
"""Pack GOPRO_Large (or the synthetic set) into WebDataset tar shards plus a manifest: see --help.

A thin wrapper over golf_dist/commands/shard.py, installed as the command `golf-shard` as well; --help says more.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from golf_dist.commands.shard import cli  # noqa: E402

if __name__ == "__main__":
    cli()
