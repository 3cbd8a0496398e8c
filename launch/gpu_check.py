#!/usr/bin/env python
"""The GPU acceptance check: every CUDA path once, a table against the README's Performance goals, --out DIR for
its JSON; `--device cpu` runs the same rows at tiny sizes. A thin wrapper over golf_dist/perf/gpu_check.py;
--help says more.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from golf_dist.commands.common import run_main  # noqa: E402
from golf_dist.perf.gpu_check import main  # noqa: E402

if __name__ == "__main__":
    run_main(main)
