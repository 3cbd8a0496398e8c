"""What a run records about where it ran, as MLflow params: package versions, the git commit of the code
and the process topology. Kept apart from the training loop so evaluation and benchmarks can log the same."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch

from golf_dist import __version__


def git_commit() -> str:
    """HEAD of the repository the package runs from, or "unknown" (an installed copy, no git)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    import accelerate
    import mlflow
    import numpy

    return {
        "version.golf_dist": __version__,
        "version.python": platform.python_version(),
        "version.torch": torch.__version__,
        "version.accelerate": accelerate.__version__,
        "version.mlflow": mlflow.__version__,
        "version.numpy": numpy.__version__,
        "git_commit": git_commit(),
    }


def topology(accelerator) -> dict[str, object]:
    return {"world_size": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type.value)}


def run_params(accelerator) -> dict[str, object]:
    """Versions, git commit and topology, the params every training run logs."""
    return {**topology(accelerator), **versions()}
