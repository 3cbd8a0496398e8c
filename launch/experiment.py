#!/usr/bin/env python
"""The paper's experiments as commands: results to MLflow, figures as PNG.

A thin wrapper over golf_dist/commands/experiment.py, installed as the command `golf-experiment` as well;
--help says more.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from golf_dist.commands.experiment import cli  # noqa: E402

if __name__ == "__main__":
    cli()
