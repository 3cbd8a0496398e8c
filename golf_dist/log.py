"""The log lines of a run: each one dated, from the main process only (unless a message says it is for
every rank), and written so that a tqdm progress bar on the same terminal stays whole. Information goes
to stdout and warnings to stderr, as the prints they replace did, so SLURM's job logs (and a reader
grepping them) get one dated line per event and one copy per job, not one per rank.

    from golf_dist.log import get_logger
    log = get_logger(__name__)
    log.info("resuming stage f from ...")                  # the main process only
    log.warning("rank %d: ...", rank, extra=EVERY_RANK)     # every process
"""

from __future__ import annotations

import logging
import os
import sys

from tqdm import tqdm

ROOT = "golf_dist"
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
EVERY_RANK = {"every_rank": True}


def is_main_rank() -> bool:
    """Rank 0 of a torchrun/accelerate launch, or a process that was not launched as one of several."""
    return os.environ.get("RANK", "0") == "0"


class MainRankOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "every_rank", False) or is_main_rank()


class TqdmStreamHandler(logging.Handler):
    """INFO and below to stdout, WARNING and above to stderr, each through tqdm.write (a bar stays intact);
    the streams are looked up at each line, so a redirected sys.stdout or sys.stderr gets them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            tqdm.write(self.format(record), file=stream)
            stream.flush()
        except Exception:  # noqa: BLE001 (logging's own contract: a failing handler reports, never raises)
            self.handleError(record)


def _configure(root: logging.Logger) -> None:
    handler = TqdmStreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt=TIME_FORMAT))
    handler.addFilter(MainRankOnly())
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False  # one copy of each line, whatever the application does with the root logger


def get_logger(name: str) -> logging.Logger:
    """The logger of module `name` (golf_dist.x.y), set up on first use."""
    root = logging.getLogger(ROOT)
    if not root.handlers:
        _configure(root)
    return logging.getLogger(name if name.startswith(ROOT) else f"{ROOT}.{name}")
