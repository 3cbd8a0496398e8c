"""The fork server's switch: GOLF_TESTS_FORKSERVER=0 runs every command line of the suite as a plain subprocess
(a fresh `python SCRIPT`), so the suite can be timed with and without the fork server (docs/development.md).

`PlainServer` offers what tests/fork_runs.py's ForkServer offers (`ready()`, `run()` returning the same `Run`):
each run in its own process group, its stdout and stderr in OUT.stdout and OUT.stderr, its exit status in
OUT.status once it ended (an exit code, -N: killed by signal N) and in OUT.rc when it ended by itself. A plain
process cannot tell an exit through os._exit from any other, so OUT.rc is there whenever no signal ended it.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from fork_runs import ROOT, Run

FORK_SERVER_ENV = "GOLF_TESTS_FORKSERVER"
# on unless the variable is 0 (or off/no/false)
FORK_SERVER = os.environ.get(FORK_SERVER_ENV, "1").strip().lower() not in ("0", "off", "no", "false")


def _write_whole(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as fh:
        fh.write(text)
    os.replace(path + ".tmp", path)


class PlainServer:
    """ForkServer's interface over plain subprocesses."""

    def __init__(self, env: dict[str, str]):
        self.env = env

    def ready(self, timeout: float = 180) -> None:
        """Nothing to wait for: each run starts its own interpreter."""

    def run(
        self, argv: list, out: Path, env: dict | None = None, cwd: Path = ROOT, whole_env: dict | None = None
    ) -> Run:
        out = Path(out)
        for suffix in (".rc", ".status", ".stdout", ".stderr"):
            Path(f"{out}{suffix}").unlink(missing_ok=True)
        argv = [str(a) for a in argv]
        with open(f"{out}.stdout", "wb") as stdout, open(f"{out}.stderr", "wb") as stderr:
            proc = subprocess.Popen(
                [sys.executable, *argv],
                cwd=cwd,
                env=whole_env or {**self.env, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                process_group=0,
            )  # its own group, as the fork server's children

        def reap() -> None:
            code = proc.wait()
            if code >= 0:
                _write_whole(f"{out}.rc", str(code))
            _write_whole(f"{out}.status", str(code))  # last: Run.running() polls it

        threading.Thread(target=reap, daemon=True, name=f"reap-{proc.pid}").start()
        return Run(proc.pid, out, argv)


@functools.cache
def _outputs() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="golf-plain-runs-"))
    atexit.register(shutil.rmtree, folder, True)
    return folder


_count = itertools.count()


def start_plain(script: str, args: list, env: dict[str, str]) -> Run:
    """`python ROOT/script ARGS` with environment `env` (whole) as a plain subprocess; returns at once."""
    out = _outputs() / f"run-{os.getpid()}-{next(_count)}"
    return PlainServer(env).run([str(ROOT / script), *map(str, args)], out, whole_env=env)
