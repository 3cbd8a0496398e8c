"""Shared fixtures: a small synthetic GoPro set, its shards and a tiny training config, made once
per test session through the project's own command lines."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

ROOT = Path(__file__).resolve().parent.parent


def run_cli(script: str, *args: str, env: dict | None = None, timeout: int = 600, check: bool = False):
    """Run one of the project's command lines as a user would; returns the CompletedProcess."""
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    full_env.update({"PYTHONUNBUFFERED": "1", **(env or {})})
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        capture_output=True, text=True, env=full_env, timeout=timeout, cwd=ROOT,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """12 train + 4 test synthetic pairs of 64x96, sharded 4 pairs per shard."""
    base = tmp_path_factory.mktemp("data")
    run_cli("data_prep/synth_gopro.py", "--out", base / "GOPRO_Large", "--train-pairs", 12, "--test-pairs", 4,
            "--height", 64, "--width", 96, "--seed", 3, check=True)
    run_cli("data_prep/shard_gopro.py", "--src", base / "GOPRO_Large", "--out", base / "shards",
            "--maxcount", 4, "--workers", 1, check=True)
    return base / "shards"


def write_config(path: Path, shards: Path, output_dir: Path, **sections) -> Path:
    """A tiny CPU config: 32x32 crops, batch 4, no perceptual term, MLflow in a temporary store."""
    cfg = {
        "seed": 1,
        "output_dir": str(output_dir),
        "data": {"shards": str(shards), "crop": 32, "batch_size": 4, "num_workers": 0},
        "loss": {"perceptual_weight": 0},
        "train": {"steps": 6, "lr": 1e-3, "lr_decays": 1, "unroll": 3, "log_every": 2, "val_every": 3,
                  "checkpoint_every": 3, "keep_last": 2},
        "val": {"max_pairs": 2, "sample_images": 1},
        "eval": {"iterations": 2},
        "tracking": {"uri": f"sqlite:///{path.parent / 'mlflow.db'}", "experiment": "golf-test"},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


class AffineMap(nn.Module):
    """x -> 0.5 x + 0.5, with a parameter so checkpointing has something to differentiate."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        return self.scale * x + 0.5
