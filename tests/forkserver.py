"""The fork server of the test suite: one Python process that has imported torch, DALI, Accelerate,
DeepSpeed and MLflow once, and forks a child for each command line it is asked to run.

Why: a `python launch/train.py` spends several seconds of a 2-core machine importing those before its
first step (torch, torch._dynamo on the first optimizer, MLflow and its SQLAlchemy store, DALI): a test's
tiny run (`python -X importtime` shows it) spends more time importing than training. A forked child
runs the very same script (`runpy.run_path(SCRIPT, run_name="__main__")`, with `sys.path[0]` the
script's folder as `python SCRIPT` sets it, its own argv, environment, working directory, stdout and
stderr files, default signal dispositions) in a process of its own, so a SIGKILL sent to it is a real
SIGKILL of a real process; only the interpreter start-up and the imports are shared. Nothing has run
a torch operation in this process before the fork (no OpenMP pool to inherit). The variables read at
start-up (OMP_NUM_THREADS, PYTHONPATH, ...) are the server's: tests/fork_runs.py keeps one server per set
of them, and `run_cli` runs a command line whose set differs from the suite's as a plain subprocess.

Protocol (one JSON object per line on stdin, one answer per line on stdout):
    {"argv": ["launch/train.py", "--config", ...], "env": {...the whole environment...}, "cwd": ".", "out": PATH}
    -> {"pid": N}
The child writes its stdout to OUT.stdout, its stderr to OUT.stderr and, when it ends by itself, its
exit status to OUT.rc (written whole: a temporary name, then a rename); a child killed by a signal, or
one that ends through os._exit, leaves no OUT.rc. The server reaps each child and writes its wait status
to OUT.status (an exit code, -N for signal N): the client polls that.
"""

from __future__ import annotations

import json
import os
import select
import sys
import traceback

PRELOAD = (
    "torch",
    "torch._dynamo",
    "numpy",
    "PIL.Image",
    "yaml",
    "tqdm",
    "safetensors.torch",
    "accelerate",
    "deepspeed",
    "mlflow",
    "mlflow.tracking",
    "mlflow.store.tracking.sqlalchemy_store",
    "nvidia.dali",
    "nvidia.dali.fn",
    "nvidia.dali.plugin.pytorch",
    "golf_dist.training.trainer",
    "golf_dist.data.dali",
    "golf_dist.tracking",
    "golf_dist.evaluation.workflow",
)


def _preload() -> None:
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # an optional package missing: the child imports (and fails on) it itself
            pass


def _child(request: dict) -> None:
    """In the forked child: become the command line, run it, exit with its status."""
    code = 1
    out = request["out"]
    try:
        os.setpgid(0, 0)  # its own process group: a kill of the group reaches the run and nothing else
        os.chdir(request.get("cwd") or ".")
        os.environ.clear()  # the environment the command line would have had as a subprocess, whole
        os.environ.update(request["env"])
        import tempfile

        tempfile.tempdir = None  # cached by the imports; the run's TMPDIR decides, as in a fresh process
        for fd, suffix in ((1, ".stdout"), (2, ".stderr")):
            target = os.open(out + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        devnull = os.open(os.devnull, os.O_RDONLY)  # fd 0 is the server's request pipe: not for the run
        os.dup2(devnull, 0)
        os.close(devnull)
        sys.stdin = open(os.devnull)
        sys.argv = list(request["argv"])
        sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))  # as `python SCRIPT` sets it
        import runpy

        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            if not isinstance(exit_.code, int) and exit_.code is not None:
                print(exit_.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            _write_whole(out + ".rc", str(code))
        finally:
            os._exit(code)


def _write_whole(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as fh:
        fh.write(text)
    os.replace(path + ".tmp", path)


def _reap(children: dict[int, str]) -> None:
    """Collect the children that ended; each gets OUT.status, its wait status as an exit code (-N: signal N)."""
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        out = children.pop(pid, None)
        if out is not None:
            _write_whole(out + ".status", str(os.waitstatus_to_exitcode(status)))


def main() -> None:
    # the answers go to the original stdout; whatever the imports print goes to stderr
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    _preload()
    print(json.dumps({"ready": os.getpid()}), file=answers, flush=True)
    children: dict[int, str] = {}  # pid -> OUT of the children not yet reaped
    pending = b""
    while True:  # one thread: requests on fd 0, and the children reaped every 50 ms in between
        readable, _, _ = select.select([0], [], [], 0.05)
        _reap(children)
        if not readable:
            continue
        chunk = os.read(0, 1 << 16)
        if not chunk:
            return
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            if not line.strip():
                continue
            request = json.loads(line)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                answers.close()
                _child(request)
            children[pid] = request["out"]
            print(json.dumps({"pid": pid}), file=answers, flush=True)


if __name__ == "__main__":
    main()
