"""The launcher command: launch-config checks, torchrun with clear rendezvous errors, and accelerate launch
without a launcher process for a single process (what training needs across processes once launched:
golf_dist/training/distributed.py).

    python -m golf_dist.commands.launch check-config configs/accelerate/one_node.yaml   # or a bundled name: one_node
    python -m golf_dist.commands.launch torchrun -- --nnodes 2 ... launch/train.py ...   # clear rendezvous errors
    python -m golf_dist.commands.launch accelerate-launch -- --config_file CFG launch/train.py ...  # see below
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch

from golf_dist.configs import ACCELERATE_CONFIGS, accelerate_config_path, bundled_deepspeed_json, bundled_launch_args
from golf_dist.errors import ConfigError

DEEPSPEED_ZERO2_JSON = ACCELERATE_CONFIGS / "deepspeed_zero2.json"


# ---- launch configs ------------------------------------------------------------------------------


def check_accelerate_config(path: str | os.PathLike) -> dict[str, Any]:
    """Load an `accelerate launch --config_file` file (or a bundled one by name: one_node) with Accelerate's own
    loader; a missing, unreadable or invalid file (or a DeepSpeed JSON it names) is a ConfigError naming the file.

    Returns a short summary (distributed type, processes, machines, mixed precision, rendezvous).
    `accelerate launch` itself stops on a missing file with a clear last line; this check gives the
    same verdict before a job is queued (the SLURM script runs it) and covers the DeepSpeed JSON,
    which Accelerate only opens inside every worker.
    """
    from accelerate.commands.config.config_args import load_config_from_file

    path = accelerate_config_path(path)
    if not path.exists():
        raise ConfigError(f"accelerate config {path} does not exist (configs/accelerate/ has the project's)")
    if not path.is_file():
        raise ConfigError(f"accelerate config {path} is not a file")
    try:
        config = load_config_from_file(str(path))
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"accelerate config {path} is unreadable: {err}") from None
    except Exception as err:  # yaml errors, unknown keys (ValueError), bad enum values
        detail = " ".join(str(err).split())
        raise ConfigError(f"accelerate config {path} is not a valid Accelerate config: {detail}") from None
    summary = {
        "distributed_type": str(getattr(config.distributed_type, "value", config.distributed_type)),
        "num_processes": getattr(config, "num_processes", 1),
        "num_machines": getattr(config, "num_machines", 1),
        "mixed_precision": config.mixed_precision,
        "rdzv_backend": getattr(config, "rdzv_backend", None),
    }
    ds = getattr(config, "deepspeed_config", None) or {}
    ds_file = ds.get("deepspeed_config_file")
    if summary["distributed_type"] == "DEEPSPEED":
        if not ds_file:
            raise ConfigError(f"accelerate config {path}: deepspeed_config.deepspeed_config_file is not set")
        summary["deepspeed_config_file"] = ds_file = bundled_deepspeed_json(ds_file, path)  # a wheel's: in it
        read_deepspeed_json(ds_file, named_in=path)
    return summary


def read_deepspeed_json(path: str | os.PathLike, named_in: str | os.PathLike | None = None) -> dict[str, Any]:
    """A DeepSpeed JSON config as a dict; missing or malformed is a ConfigError naming it."""
    where = f" (named in {named_in}; a relative path is read from the directory you launch in)" if named_in else ""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"DeepSpeed config {path} does not exist{where}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"DeepSpeed config {path} is unreadable{where}: {err}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON{where}: {err}") from None


# ---- torchrun with a clear rendezvous error ------------------------------------------------------


def _torchrun_option(args: list[str], *names: str) -> str | None:
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def rendezvous_failure_message(args: list[str], stderr_tail: str) -> str | None:
    """A one-paragraph explanation when torchrun's agent gave up on the rendezvous, else None.

    torchrun ends with a bare `RendezvousTimeoutError` traceback (or a connection error to the
    endpoint); this says which rendezvous, how long it waited and what to check.
    """
    timed_out = "RendezvousTimeoutError" in stderr_tail
    unreachable = "RendezvousConnectionError" in stderr_tail or "DistNetworkError" in stderr_tail
    if not (timed_out or unreachable):
        return None
    endpoint = _torchrun_option(args, "--rdzv-endpoint", "--rdzv_endpoint") or "(no --rdzv-endpoint)"
    nnodes = _torchrun_option(args, "--nnodes") or "1"
    conf = _torchrun_option(args, "--rdzv-conf", "--rdzv_conf") or ""
    join = next((kv.split("=", 1)[1] for kv in conf.split(",") if kv.startswith("join_timeout=")), "600 (default)")
    if timed_out:
        return (
            f"the rendezvous at {endpoint} did not form: --nnodes {nnodes} launchers were expected, not all of "
            f"them joined within join_timeout={join} s (RendezvousTimeoutError). Check that a launcher was "
            f"started on every node (SLURM: one task per node), that {endpoint} is reachable from each node, and "
            "that all use the same --rdzv-endpoint and --rdzv-id"
        )
    return (
        f"the rendezvous endpoint {endpoint} could not be reached (--nnodes {nnodes}): check the head node's "
        "address and port and that the launcher on the head node (node rank 0) is running"
    )


AGENT_SIGNALS_MIN_TORCH = (2, 9)  # torch reads PET_SIGNALS_TO_HANDLE (node_launch.sh sets it) from 2.9 on


def agent_sigterm_warning(torch_version: str) -> str | None:
    """Why SIGTERM may kill a checkpointing trainer under torchrun's agent with this torch, or None."""
    release = tuple(int(part) for part in re.findall(r"\d+", torch_version.split("+")[0])[:2])
    if release >= AGENT_SIGNALS_MIN_TORCH:
        return None
    need = ".".join(map(str, AGENT_SIGNALS_MIN_TORCH))
    return (
        f"torch {torch_version} ignores PET_SIGNALS_TO_HANDLE (read from torch {need} on): torchrun's agent "
        "handles SIGTERM itself, and a second one (scancel, preemption) can kill the trainers while they write "
        f"their checkpoint; install torch>={need} (bash launch/setup.sh installs the tested versions)"
    )


def warn_if_agent_handles_sigterm() -> None:
    """One stderr line at start when torchrun's agent cannot be told to leave SIGTERM to the trainers."""
    message = agent_sigterm_warning(torch.__version__)
    if message:
        print(f"golf: warning: {message}", file=sys.stderr, flush=True)


def run_torchrun(args: list[str]) -> int:
    """`python -m torch.distributed.run ARGS`, output passed through; a failed rendezvous ends with a
    clear `error:` line (exit 1). SIGTERM, SIGINT and SIGUSR2 are forwarded to torchrun."""
    import collections
    import signal
    import subprocess

    warn_if_agent_handles_sigterm()
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], stderr=subprocess.PIPE, text=True)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
        signal.signal(sig, lambda num, _frame: proc.send_signal(num))
    tail: collections.deque[str] = collections.deque(maxlen=200)
    assert proc.stderr is not None
    for line in proc.stderr:
        sys.stderr.write(line)
        tail.append(line)
    code = proc.wait()
    if code != 0:
        message = rendezvous_failure_message(args, "".join(tail))
        if message:
            print(f"error: {message}", file=sys.stderr, flush=True)
            return 1
    return code


# ---- accelerate launch without a launcher process for a single process ----------------------------


def accelerate_launch(args: list[str]) -> int:
    """`accelerate launch ARGS`, except that a run Accelerate would start as one plain child process (its simple
    launcher: no multi-GPU, DeepSpeed, FSDP, TPU or SageMaker) becomes that process: the command and environment
    Accelerate builds for it are exec'd in place of the launcher. A launcher must outlive a trainer that
    checkpoints on SIGTERM, and the simple launcher does not (since 1.16 it installs its own SIGTERM handler
    and kills its child's process tree); with no launcher process nothing depends on what a release does."""
    from accelerate.commands import launch as accelerate_cli
    from accelerate.utils import ComputeEnvironment, prepare_simple_launcher_cmd_env

    args = bundled_launch_args(args)  # --config_file one_node: the bundled file
    parsed = accelerate_cli.launch_command_parser().parse_args(args)
    # Accelerate's own reading of config file and flags (private; what launch_command uses): (args, defaults, ...)
    parsed, defaults = accelerate_cli._validate_launch_command(parsed)[:2]
    distributed = any(
        getattr(parsed, name, False) for name in ("use_deepspeed", "use_fsdp", "use_megatron_lm", "multi_gpu", "tpu")
    )
    sagemaker = defaults is not None and defaults.compute_environment == ComputeEnvironment.AMAZON_SAGEMAKER
    if (distributed and not parsed.cpu) or sagemaker:
        warn_if_agent_handles_sigterm()
        os.execv(sys.executable, [sys.executable, "-m", "accelerate.commands.launch", *args])
    cmd, env = prepare_simple_launcher_cmd_env(parsed)
    sys.stdout.flush(), sys.stderr.flush()
    os.execvpe(cmd[0], cmd, env)
    return 1  # not reached: exec replaced this process


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m golf_dist.commands.launch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-config", help="check an accelerate config file (and its DeepSpeed JSON)")
    check.add_argument("config", help="e.g. configs/accelerate/multi_node.yaml")
    run = sub.add_parser(
        "torchrun",
        help="torchrun with a clear error when the rendezvous cannot form (args after --)",
        description="python -m golf_dist.commands.launch torchrun -- --nnodes 2 --node_rank 0 --nproc_per_node 8 "
        "--rdzv-backend c10d --rdzv-endpoint HEAD:29500 --rdzv-conf join_timeout=300 launch/train.py --stage f",
    )
    run.add_argument("torchrun_args", nargs=argparse.REMAINDER, help="arguments for torch.distributed.run")
    launch = sub.add_parser("accelerate-launch", help="accelerate launch (args after --), one process without it")
    launch.add_argument("launch_args", nargs=argparse.REMAINDER, help="arguments for accelerate launch")
    args = parser.parse_args(argv)
    if args.command in ("torchrun", "accelerate-launch"):
        rest = args.torchrun_args if args.command == "torchrun" else args.launch_args
        rest = rest[1:] if rest[:1] == ["--"] else rest
        return run_torchrun(rest) if args.command == "torchrun" else accelerate_launch(rest)
    print(json.dumps(check_accelerate_config(args.config)))
    return 0


if __name__ == "__main__":
    from golf_dist.commands.common import run_main

    run_main(main)
