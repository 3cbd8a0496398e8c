"""Stopping a run cleanly when the cluster wants its nodes back (SLURM preemption, time limit).

Two ways to ask a running trainer to stop:
  * a signal to the training processes: SIGUSR2 (what infra/slurm/train.sbatch asks SLURM for;
    SIGUSR1 is left to NCCL) or SIGTERM (what SLURM sends on scancel, at the time limit and on
    preemption with a grace time). The handler only sets a flag; nothing is done inside the handler.
    Every SIGTERM after the first is the same request, never "die now": SLURM signals every process
    of a job step, srun forwards its own SIGTERM to the step, torchrun's agent forwards its own to its
    workers, and a preemption's grace time ends with a second SIGTERM followed by SIGKILL after
    KillWait; dying on any of those would lose the checkpoint being written. SIGKILL stops at once.
  * a stop file, by default OUTPUT_DIR/<stage>/STOP (or $GOLF_STOP_FILE). This is how the batch
    script passes SLURM's signal on: torchrun and `accelerate launch` do not forward SIGUSR1/2 to
    their workers, so the batch shell traps the signal and touches the file.
The PyTorch loader's worker processes ignore both signals (`leave_stop_signals_to_the_rank`): the rank stops.

At every step boundary the ranks agree (one all_reduce MAX of a single int), so every rank stops after
the same optimizer step; the trainer then writes a checkpoint, the main process writes the marker
OUTPUT_DIR/<stage>/PREEMPTED (JSON: step, reason, checkpoint) and every process exits with status 0.
The marker, not an exit status, is the outcome a batch script reads: launchers (torchrun, accelerate)
turn any non-zero worker status into their own status 1. A rerun removes a leftover STOP file and
marker and resumes from the checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

from golf_dist.files import write_atomic
from golf_dist.log import get_logger

log = get_logger(__name__)

STOP_FILE_ENV = "GOLF_STOP_FILE"
STOP_NAME = "STOP"
MARKER_NAME = "PREEMPTED"
SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

# reasons, ordered: the all_reduce MAX picks the strongest one any rank saw
_NONE, _FILE, _SIGNAL = 0, 1, 2
_received: list[int] = []  # signal numbers seen by this process (a list: no `global` in the handler)


def _handler(signum: int, frame: Any) -> None:
    name = signal.Signals(signum).name
    # os.write, not print: print is not reentrant and the signal may land inside another print
    if signum in _received:  # the same request again (SLURM, srun and the launcher each send theirs)
        os.write(
            2, f"received {name} again: already stopping after the current step (SIGKILL stops at once)\n".encode()
        )
        return
    _received.append(signum)
    os.write(2, f"received {name}: will checkpoint and stop after the current step\n".encode())


def install(signals: tuple[int, ...] = SIGNALS) -> bool:
    """Install the flag-setting handler (idempotent). Only the main thread may; returns whether it did."""
    if threading.current_thread() is not threading.main_thread():
        return False
    for sig in signals:
        if signal.getsignal(sig) is not _handler:
            signal.signal(sig, _handler)
    return True


def leave_stop_signals_to_the_rank(worker_id: int) -> None:
    """worker_init_fn of the PyTorch loader's worker processes: a SIGTERM or SIGUSR2 meant for the run is the
    rank's to handle, not theirs.

    SLURM signals every process of a step, and torchrun signals each rank's whole process group, so a loader
    worker gets the rank's SIGTERM too; PyTorch's worker handler dies of one sent by anyone but its parent, and
    the rank then fails ("DataLoader worker ... is killed by signal: Terminated") before it can checkpoint. Here
    SIGUSR2 is ignored and SIGTERM blocked; a thread takes each SIGTERM and exits only when the worker's own
    rank sent it (what the DataLoader and multiprocessing do to end their workers at shutdown). A worker whose
    rank has died also notices it (its parent changes) and exits by itself.
    """
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_exit_on_sigterm_from_parent, name="sigterm-from-rank", daemon=True).start()


def _exit_on_sigterm_from_parent() -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == os.getppid():
            os._exit(0)  # as PyTorch's own worker handler does for its parent's SIGTERM


def signal_received() -> int | None:
    """The first stop signal this process received, or None."""
    return _received[0] if _received else None


def stop_file_for(stage_dir: Path) -> Path:
    return Path(os.environ.get(STOP_FILE_ENV) or Path(stage_dir) / STOP_NAME)


def marker_for(stage_dir: Path) -> Path:
    return Path(stage_dir) / MARKER_NAME


class StopCheck:
    """Decides, the same way on every rank, whether to stop after the current step.

    Only the main process looks at the stop file (one stat per step, not one per rank on a shared
    file system); every rank contributes the signals it received.
    """

    def __init__(self, stage_dir: Path, world: int, is_main: bool):
        import torch.distributed as dist

        self.stop_file = stop_file_for(stage_dir)
        self.marker = marker_for(stage_dir)
        self.world = world
        self.is_main = is_main
        self.group = None
        self.distributed = world > 1 and dist.is_available() and dist.is_initialized()
        if self.distributed and dist.get_backend() != "gloo":
            # the flag travels over a CPU (gloo) group: an all_reduce on the GPU and its .item() would
            # stall the CPU until the step's kernels are done, once per step (new_group: every rank calls it)
            self.group = dist.new_group(backend="gloo")
        install()
        if is_main:
            # leftovers of a previous stop: a rerun must not stop at once. A stop file given through
            # $GOLF_STOP_FILE belongs to whoever set it (train.sbatch clears it before it launches; one
            # touched while this process starts up is a real request), so only the default one is removed.
            leftovers = [self.marker] if os.environ.get(STOP_FILE_ENV) else [self.stop_file, self.marker]
            for path in leftovers:
                if path.exists():
                    path.unlink()
                    log.info(f"removed {path} left by an earlier stop")

    def _local(self) -> int:
        if _received:
            return _SIGNAL
        if self.is_main and self.stop_file.exists():
            return _FILE
        return _NONE

    def requested(self) -> str | None:
        """Call at a step boundary on every rank (it is a collective when world > 1)."""
        import torch  # here, not at the top: launch/train.py imports this module before its config checks

        code = self._local()
        if self.distributed:
            flag = torch.tensor([code], dtype=torch.int32)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.group)
            code = int(flag.item())
        if code == _SIGNAL:
            return "signal"
        if code == _FILE:
            return f"stop file {self.stop_file}"
        return None

    def write_marker(self, step: int, steps: int, reason: str, checkpoint: Path | None) -> None:
        """Main process: record that the run stopped early and where it can resume (atomic write)."""
        if not self.is_main:
            return
        info = {
            "step": step,
            "steps": steps,
            "reason": reason,
            "checkpoint": str(checkpoint) if checkpoint else None,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        }
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.marker, json.dumps(info, indent=2).encode())

    def clear_marker(self) -> None:
        if self.is_main and self.marker.exists():
            self.marker.unlink()


def print_stopped(stage: str, step: int, steps: int, reason: str, checkpoint: Path | None) -> None:
    log.info(
        f"stage {stage} stopped for preemption ({reason}) after step {step} of {steps}; checkpoint "
        f"{checkpoint}; run the same command again (or let the SLURM job requeue) to resume"
    )
