"""Command lines run as children of the fork server (tests/forkserver.py): real processes that skip the
interpreter start-up and the imports. `run_cli` (tests/conftest.py) runs its command lines through here
wherever the variables read at start-up are the suite's own; the fault suite starts its runs here directly.

One server per set of start-up variables (START_UP_PREFIXES), made on first use and killed when the pytest
process ends: under pytest-xdist each worker has its own, OMP_NUM_THREADS=1 in both the fault suite's runs
and the workers' environment (tests/conftest.py), so one server a worker serves both.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# variables read when the interpreter or a native library starts, not when the code asks for them: a run
# that sets one of these differently from its server's needs a fresh process
START_UP_PREFIXES = (
    "PYTHON",
    "OMP_",
    "MKL_",
    "KMP_",
    "GOMP_",
    "LD_",
    "MALLOC_",
    "CUDA",
    "NVIDIA",
    "TORCH",
    "PYTORCH",
    "DALI",
    "TRITON",
)


def start_up_part(env: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """The variables of `env` that a fork server fixes when it starts, sorted."""
    return tuple(sorted((k, v) for k, v in env.items() if k.startswith(START_UP_PREFIXES)))


class Run:
    """One command line running in a child of the fork server."""

    def __init__(self, pid: int, out: Path, argv: list[str]):
        self.pid, self.out, self.argv = pid, out, argv

    @property
    def rc(self) -> int | None:
        """The status the run reported itself on ending (None: it was killed, or ended through os._exit)."""
        path = Path(f"{self.out}.rc")
        return int(path.read_text()) if path.is_file() else None

    @property
    def status(self) -> int | None:
        """Its exit status as `subprocess` gives it (-N: killed by signal N) once it ended; None while it runs."""
        path = Path(f"{self.out}.status")
        return int(path.read_text()) if path.is_file() else None

    @property
    def stdout(self) -> str:
        return Path(f"{self.out}.stdout").read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return Path(f"{self.out}.stderr").read_text(errors="replace")

    def running(self) -> bool:
        return self.status is None  # the server writes it when it reaps the child

    def kill(self) -> None:
        """SIGKILL to the run's process group (the run and anything it started)."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            try:  # not yet its own group leader (killed in its first microseconds)
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 30
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.01)

    def wait(self, timeout: float = 300) -> int:
        """The exit status (-9 when it was killed); a run past `timeout` is killed and fails the test."""
        deadline = time.monotonic() + timeout
        while self.running():
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(
                    f"{' '.join(self.argv[:4])} ...: still running after {timeout} s (killed); "
                    f"stderr:\n{self.stderr[-3000:]}"
                )
            time.sleep(0.02)
        return self.status

    def check(self, timeout: float = 300) -> Run:
        rc = self.wait(timeout)
        assert rc == 0, f"{self.out.name} exited {rc}:\n{self.stdout[-2000:]}\n{self.stderr[-3000:]}"
        return self

    def completed(self, timeout: float) -> subprocess.CompletedProcess:
        """What `subprocess.run(..., capture_output=True, text=True)` would have returned."""
        rc = self.wait(timeout)
        return subprocess.CompletedProcess([sys.executable, *self.argv], rc, self.stdout, self.stderr)


class ForkServer:
    def __init__(self, env: dict[str, str]):
        self.env = env
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "forkserver.py")],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._lock = threading.Lock()
        self._ready = False

    def _answer(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"the fork server did not answer (exit status {self.proc.poll()})")
        return json.loads(line)

    def ready(self, timeout: float = 180) -> None:
        with self._lock:
            if not self._ready:
                self._answer(timeout)
                self._ready = True

    def run(
        self, argv: list, out: Path, env: dict | None = None, cwd: Path = ROOT, whole_env: dict | None = None
    ) -> Run:
        """Start `python ARGV...` in a child, with the server's environment and `env` added, or with `whole_env`
        (whose start-up variables must be the server's: `server_for` picks the server by them)."""
        self.ready()
        out = Path(out)
        for suffix in (".rc", ".status", ".stdout", ".stderr"):
            Path(f"{out}{suffix}").unlink(missing_ok=True)
        argv = [str(a) for a in argv]
        request = {"argv": argv, "out": str(out), "cwd": str(cwd), "env": whole_env or {**self.env, **(env or {})}}
        with self._lock:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            pid = self._answer(60)["pid"]
        return Run(pid, out, argv)

    def close(self) -> None:
        """Kill it: it holds nothing but imported modules (its children have ended or were killed by their tests)."""
        self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


_servers: dict[tuple, ForkServer] = {}
_servers_lock = threading.Lock()


def server_for(env: dict[str, str]) -> ForkServer:
    """The fork server whose start-up variables are those of `env` (started on first use), whose children
    get `env` less the MLflow and golf variables (each run sets its own)."""
    key = start_up_part(env)
    with _servers_lock:
        if key not in _servers:
            base = {k: v for k, v in env.items() if not k.startswith(("MLFLOW_", "GOLF_"))}
            _servers[key] = ForkServer({**base, "PYTHONUNBUFFERED": "1"})
        return _servers[key]


@atexit.register
def _close_servers() -> None:
    for server in _servers.values():
        server.close()


@functools.cache
def _outputs() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="golf-fork-runs-"))
    atexit.register(shutil.rmtree, folder, True)
    return folder


_count = itertools.count()


def start_forked(script: str, args: list, env: dict[str, str]) -> Run:
    """`python ROOT/script ARGS` with environment `env` (whole), started in a child of the fork server for `env`
    (one is started for its start-up variables if none has them yet); returns at once."""
    out = _outputs() / f"run-{os.getpid()}-{next(_count)}"
    return server_for(env).run([str(ROOT / script), *map(str, args)], out, whole_env=env)


def forked_run(script: str, args: list, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """`start_forked`, waited for: what `subprocess.run(..., capture_output=True, text=True)` returns."""
    return start_forked(script, args, env).completed(timeout)
