"""What every command line shares: turning a GolfError into one message and its exit status, and the
arguments more than one command takes."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from golf_dist.errors import GolfError


def run_main(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run `main`; a GolfError becomes `error: <message>` on stderr and its exit status."""
    try:
        code = main(argv)
    except GolfError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def add_ensemble_argument(parser: argparse.ArgumentParser) -> None:
    """--ensemble of evaluate and deblur: the modes golf_dist.ensemble knows."""
    from golf_dist.ensemble import ENSEMBLES

    parser.add_argument("--ensemble", default="x1", choices=tuple(ENSEMBLES),
                        help="self-ensemble: average over x8 flips and transposes, x4 flips, x2 a horizontal flip; "
                        "costs that many passes (default: %(default)s, none)")
