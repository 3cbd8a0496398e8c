"""Watchdog: a rank that makes no progress for train.hang_timeout_s (stuck in a collective because a peer froze,
or in a data read that never returns) dumps every thread's stack, names itself and exits with HANG_EXIT_CODE,
so torchrun, the job script and SLURM see a failure instead of an allocation burning while nothing happens.

The training loop calls `beat(what)` before each step, validation, checkpoint and the export; a thread of
the rank checks the deadline. The main thread may be blocked inside a C++ collective (which releases the
GIL), so the thread can still act; it writes the stacks (faulthandler) to stderr and to
STAGE_DIR/hang-rank<R>.txt, then ends the process with os._exit: a clean exit would wait for the stuck
thread. Before that it calls `on_hang` (the trainer: end the MLflow run as FAILED, not left RUNNING) in a thread of
its own, waited for at most ON_HANG_TIMEOUT_S: a store that does not answer, or a lock the stuck thread holds,
cannot keep the process alive. The process group timeout (GOLF_DIST_TIMEOUT_S, golf_dist/commands/launch.py) fails a
collective on its own clock; the watchdog also covers data reads and says where every thread was.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from golf_dist.files import write_atomic

HANG_EXIT_CODE = 124  # timeout(1)'s status for "timed out"
# the first step (torch.compile, loader start-up), validation, checkpoints and the export may take this many
# times train.hang_timeout_s
LONG_ALLOWANCE = 3.0
ON_HANG_TIMEOUT_S = 10.0  # what on_hang may take before the process exits anyway


class Watchdog:
    def __init__(self, timeout_s: float, rank: int, dump_dir: Path, on_hang: Callable[[], None] | None = None):
        self.timeout_s, self.rank, self.dump_file = timeout_s, rank, Path(dump_dir) / f"hang-rank{rank}.txt"
        self.on_hang = on_hang
        self._what, self._since, self._deadline = "start-up", time.monotonic(), None
        self._closed = threading.Event()
        self._thread = None
        if timeout_s > 0:  # 0: off
            self._thread = threading.Thread(target=self._watch, name="golf-watchdog", daemon=True)
            self._thread.start()

    def beat(self, what: str, allowance: float = 1.0) -> None:
        """Progress: `what` starts now and may take `allowance` x the timeout."""
        self._what, self._since = what, time.monotonic()
        self._deadline = self._since + self.timeout_s * allowance

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> Watchdog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _watch(self) -> None:
        while not self._closed.wait(min(1.0, self.timeout_s / 10)):
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                self._dump_and_exit()

    def _dump_and_exit(self) -> None:
        waited = time.monotonic() - self._since
        header = (
            f"golf watchdog: rank {self.rank} (pid {os.getpid()}) made no progress for {waited:.0f} s in "
            f"{self._what} (train.hang_timeout_s={self.timeout_s:g}): a peer or a data read is stuck. The stack "
            f"of every thread follows (also in {self.dump_file}); exiting with status {HANG_EXIT_CODE}\n"
        )
        with tempfile.TemporaryFile() as fh:  # faulthandler writes to a file descriptor only
            faulthandler.dump_traceback(file=fh, all_threads=True)
            fh.seek(0)
            report = header.encode() + fh.read()
        try:
            sys.stderr.flush()
            os.write(2, b"\n" + report)  # a new line: a progress bar may hold the current one
        finally:
            try:
                self.dump_file.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(self.dump_file, report)
            finally:
                self._call_on_hang()
                os._exit(HANG_EXIT_CODE)

    def _call_on_hang(self) -> None:
        if self.on_hang is None:
            return
        thread = threading.Thread(target=self._on_hang_quietly, name="golf-watchdog-on-hang", daemon=True)
        thread.start()
        thread.join(ON_HANG_TIMEOUT_S)

    def _on_hang_quietly(self) -> None:
        try:
            self.on_hang()
        except BaseException:  # noqa: BLE001 - best effort: the exit that follows is what matters
            pass
