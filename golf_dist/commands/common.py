"""What every command line shares: turning a GolfError into one message and its exit status, and the
arguments more than one command takes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

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
    release_process_group()
    sys.exit(code or 0)


def release_process_group() -> None:
    """Leave the torch.distributed process group this process joined (Accelerate under torchrun) once its work
    is done, as PyTorch asks. Left to interpreter shutdown, the group's communication threads can be torn down
    while still joinable: a rank that had finished its work then aborts ("terminate called without an active
    exception") and the launcher reports a failure. Only on success: after an error, ranks may still be waiting
    in a collective, and the exit status already says what happened."""
    dist = sys.modules.get("torch.distributed")  # imported by the work if it ran distributed; never here
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def add_ensemble_argument(parser: argparse.ArgumentParser) -> None:
    """--ensemble of evaluate and deblur: the modes golf_dist.inference.ensemble knows."""
    from golf_dist.inference.ensemble import ENSEMBLES

    parser.add_argument(
        "--ensemble",
        default="x1",
        choices=tuple(ENSEMBLES),
        help="self-ensemble: average over x8 flips and transposes, x4 flips, x2 a horizontal flip; "
        "costs that many passes (default: %(default)s, none)",
    )


def add_iterations_arguments(parser: argparse.ArgumentParser, default: str) -> None:
    """--iterations (a count or auto), --tolerance and --max-iterations of evaluate and deblur, as text:
    golf_dist.inference.engine.parse_iterations checks them, naming the flag (exit 2)."""
    from golf_dist.inference.engine import DEFAULT_MAX_ITERATIONS, DEFAULT_TOLERANCE, MAX_ITERATIONS

    parser.add_argument(
        "--iterations",
        metavar="N|auto",
        help=f"G iterations after F, 0 to {MAX_ITERATIONS}, or auto: G runs on each image until its update's mean "
        f"absolute change is below --tolerance, at most --max-iterations times (default: {default})",
    )
    parser.add_argument(
        "--tolerance",
        metavar="T",
        help="with --iterations auto: stop once an iteration changes the image by less than T on average "
        f"(pixels in [0, 1]; default: {DEFAULT_TOLERANCE:g})",
    )
    parser.add_argument(
        "--max-iterations",
        metavar="M",
        help=f"with --iterations auto: at most M G iterations, 1 to {MAX_ITERATIONS} "
        f"(default: {DEFAULT_MAX_ITERATIONS})",
    )
