"""A training output folder without training: F and G with random weights, saved as training exports them
(golf_dist.checkpoints.save_weights). For the tests of what reads such a folder (deblur, export, the MLflow
model), where the weights' values do not matter, only that they are real files of the real networks."""

from __future__ import annotations

from pathlib import Path

import torch

from golf_dist.checkpoints import save_weights
from golf_dist.models import f_net, g_net


def write_random_model(folder: Path, seed: int = 0, with_g: bool = True, nan_g: bool = False) -> Path:
    """FOLDER/f.safetensors (and g.safetensors unless not `with_g`; every G weight NaN with `nan_g`, a G no
    exported graph can match); FOLDER."""
    torch.manual_seed(seed)
    save_weights(f_net(zero_init_last=False).state_dict(), Path(folder) / "f.safetensors")
    if with_g:
        g = g_net(zero_init_last=False).state_dict()
        if nan_g:
            g = {
                name: torch.full_like(value, float("nan")) if value.is_floating_point() else value
                for name, value in g.items()
            }
        save_weights(g, Path(folder) / "g.safetensors")
    return Path(folder)
