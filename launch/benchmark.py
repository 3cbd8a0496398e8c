#!/usr/bin/env python
"""Benchmark the Golf networks, or the data loaders, on one machine; prints one JSON line.

A thin wrapper over golf_dist/commands/benchmark.py, installed as the command `golf-benchmark` as well;
--help says more.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from golf_dist.commands.benchmark import cli  # noqa: E402

if __name__ == "__main__":
    cli()
