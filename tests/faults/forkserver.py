"""A fork server for the fault suite: one Python process that has imported torch, DALI, Accelerate,
DeepSpeed and MLflow once, and forks a child for each command line it is asked to run.

Why: a `python launch/train.py` spends 5-7 s of a 2-core machine importing those before its first
step; the fault suite starts ~30 training runs. A forked child runs the very same script
(`runpy.run_path(launch/train.py, run_name="__main__")`, its own argv, environment, stdout and stderr
files, default signal dispositions) in a process of its own, so a SIGKILL sent to it is a real
SIGKILL of a real training process; only the interpreter start-up and the imports are shared.
Nothing has run a torch operation in this process before the fork (no OpenMP pool to inherit), and
OMP_NUM_THREADS=1 is set before torch is imported: every run is single-threaded, hence bitwise
reproducible.

Protocol (one JSON object per line on stdin, one answer per line on stdout):
    {"argv": ["launch/train.py", "--config", ...], "env": {...}, "cwd": ".", "out": PATH}
    -> {"pid": N}
The child writes its stdout to OUT.stdout, its stderr to OUT.stderr and, when it ends by itself, its
exit status to OUT.rc (written whole: a temporary name, then a rename). A child killed by a signal
leaves no OUT.rc. Children are reaped by this server (SIGCHLD ignored), so the test polls OUT.rc.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback

PRELOAD = (
    "torch", "torch._dynamo", "numpy", "PIL.Image", "yaml", "tqdm", "safetensors.torch", "accelerate",
    "deepspeed", "mlflow", "mlflow.tracking", "mlflow.store.tracking.sqlalchemy_store", "nvidia.dali",
    "nvidia.dali.fn", "nvidia.dali.plugin.pytorch", "golf_dist.training.trainer", "golf_dist.data.dali",
    "golf_dist.tracking", "golf_dist.evaluate",
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
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # subprocesses of the run (git, ...) are its own to reap
    code = 1
    out = request["out"]
    try:
        os.setpgid(0, 0)  # its own process group: a kill of the group reaches the run and nothing else
        os.chdir(request.get("cwd") or ".")
        for key in [k for k in os.environ if k.startswith("MLFLOW_") or k.startswith("GOLF_")]:
            del os.environ[key]
        os.environ.update(request.get("env") or {})
        for fd, suffix in ((1, ".stdout"), (2, ".stderr")):
            target = os.open(out + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        sys.stdin = open(os.devnull)
        sys.argv = list(request["argv"])
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
            with open(out + ".rc.tmp", "w") as fh:
                fh.write(str(code))
            os.replace(out + ".rc.tmp", out + ".rc")
        finally:
            os._exit(code)


def main() -> None:
    # the answers go to the original stdout; whatever the imports print goes to stderr
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    _preload()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel; OUT.rc tells the status
    print(json.dumps({"ready": os.getpid()}), file=answers, flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            answers.close()
            _child(request)
        print(json.dumps({"pid": pid}), file=answers, flush=True)


if __name__ == "__main__":
    main()
