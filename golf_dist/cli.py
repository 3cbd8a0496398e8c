"""What every command line shares: turning a GolfError into one message and its exit status."""

from __future__ import annotations

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
