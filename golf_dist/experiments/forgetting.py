"""Catastrophic forgetting in blind deconvolution (the paper's Figure 5), at CPU scale on a shard set.

Two tasks for one network F: task 1 maps a sharp crop to itself (what G's later iterates ask of a network
that is applied to its own output), task 2 maps a blurred crop to its sharp one. Four schedules, each the
same number of steps: (a) task 1 then task 2, (b) task 2 alone, (c) task 2 then task 1, (d) both at once
(each batch half of each task). Validated every few steps on fixed crops of the test split: PSNR of
F(sharp) against sharp (task 1), and the gain of F(blur) over the blurred input (task 2). The paper's
claim: training on one task after the other undoes the first ((a), (c)), and both at once hardly improves
deconvolution (d) - the reason F and G are trained apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from golf_dist.data.torch_loader import ShardPairs, to_tensor
from golf_dist.errors import DataError
from golf_dist.metrics import psnr
from golf_dist.models import f_net

# (name, the task of each phase): "1" sharp -> sharp, "2" blur -> sharp, "both" half of each per batch
SCHEDULES = {
    "a: task 1 then task 2": ("1", "2"),
    "b: task 2 alone": ("2", "2"),
    "c: task 2 then task 1": ("2", "1"),
    "d: both at once": ("both", "both"),
}


INITIAL_TAIL_SCALE = 0.01


@dataclass
class ForgettingConfig:
    steps_per_phase: int = 150
    batch: int = 8
    crop: int = 64
    lr: float = 1e-3
    val_every: int = 30
    train_pairs: int = 128  # decoded once into memory
    val_crops: int = 32
    seed: int = 0


class CropBank:
    """Pairs decoded once; random paired crops as Nx3xCxC float tensors."""

    def __init__(self, shards: str, split: str, pairs: int, crop: int):
        source = ShardPairs(shards, split)
        count = min(pairs, len(source))
        frames = [source.load(i)[:2] for i in tqdm(range(count), desc=f"decode {split}", leave=False)]
        if any(min(b.shape[:2]) < crop for b, _ in frames):
            raise DataError(f"shards {shards}: split '{split}' has frames smaller than the {crop}-pixel crop")
        self.frames, self.crop = frames, crop

    def sample(self, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        blurs, sharps = [], []
        for _ in range(n):
            blur, sharp = self.frames[rng.integers(len(self.frames))]
            top = rng.integers(blur.shape[0] - self.crop + 1)
            left = rng.integers(blur.shape[1] - self.crop + 1)
            window = (slice(top, top + self.crop), slice(left, left + self.crop))
            blurs.append(to_tensor(blur[window]))
            sharps.append(to_tensor(sharp[window]))
        return torch.stack(blurs), torch.stack(sharps)


def _batch(task: str, bank: CropBank, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    blur, sharp = bank.sample(n, rng)
    if task == "1":
        return sharp, sharp
    if task == "2":
        return blur, sharp
    half = n // 2  # both: the first half task 1, the rest task 2
    return torch.cat([sharp[:half], blur[half:]]), sharp


@torch.no_grad()
def _validate(net: torch.nn.Module, blur: torch.Tensor, sharp: torch.Tensor) -> tuple[float, float]:
    """(PSNR of F(sharp) against sharp, gain of F(blur) over blur), means over the crops."""
    net.eval()
    restored_sharp, restored_blur = net(sharp), net(blur)  # InstanceNorm is per image: a batch changes nothing
    task1 = float(np.mean([psnr(o[None], s[None]).item() for o, s in zip(restored_sharp, sharp)]))
    task2 = float(
        np.mean(
            [(psnr(o[None], s[None]) - psnr(b[None], s[None])).item() for o, b, s in zip(restored_blur, blur, sharp)]
        )
    )
    net.train()
    return task1, task2


def run_schedule(
    phases: tuple[str, str], train: CropBank, val: tuple[torch.Tensor, torch.Tensor], cfg: ForgettingConfig
) -> dict[str, list]:
    """One F trained through both phases from the same initial weights and crop stream; its curves."""
    torch.manual_seed(cfg.seed)
    # near the identity, not at it: the trainer's F starts exactly as the identity (zero last layer), which
    # solves task 1 before any step; a last layer at 1% of its random initialisation leaves task 1 to learn
    net = f_net(zero_init_last=False)
    with torch.no_grad():
        net.tail.weight.mul_(INITIAL_TAIL_SCALE)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    rng = np.random.default_rng(cfg.seed)
    curve = {"step": [0], "task1_psnr": [], "task2_gain": []}
    for value, key in zip(_validate(net, *val), ("task1_psnr", "task2_gain")):
        curve[key].append(value)
    step = 0
    for task in phases:
        for _ in range(cfg.steps_per_phase):
            inputs, target = _batch(task, train, cfg.batch, rng)
            loss = torch.nn.functional.mse_loss(net(inputs), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step % cfg.val_every == 0:
                curve["step"].append(step)
                for value, key in zip(_validate(net, *val), ("task1_psnr", "task2_gain")):
                    curve[key].append(value)
    return curve


def run_experiment(
    shards: str, out: Path, cfg: ForgettingConfig, tracking_uri: str | None, experiment: str = "golf-paper"
) -> dict:
    from golf_dist.evaluation import plots
    from golf_dist.experiments import record

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train = CropBank(shards, "train", cfg.train_pairs, cfg.crop)
    val = CropBank(shards, "test", cfg.val_crops, cfg.crop).sample(cfg.val_crops, np.random.default_rng(12345))
    curves = {name: run_schedule(phases, train, val, cfg) for name, phases in tqdm(SCHEDULES.items(), desc="schedules")}
    figure = plots.forgetting(curves, cfg.steps_per_phase, out / "forgetting.png")
    final = {
        name: {
            "task1_psnr": c["task1_psnr"][-1],
            "task2_gain": c["task2_gain"][-1],
            "task1_psnr_after_phase1": c["task1_psnr"][c["step"].index(cfg.steps_per_phase)],
            "task2_gain_after_phase1": c["task2_gain"][c["step"].index(cfg.steps_per_phase)],
        }
        for name, c in curves.items()
    }
    result = {"config": asdict(cfg), "shards": str(shards), "curves": curves, "final": final, "figure": str(figure)}
    metrics = (
        ({f"{name.split(':')[0]}_task1_psnr": t1, f"{name.split(':')[0]}_task2_gain": t2}, step)
        for name, c in curves.items()
        for step, t1, t2 in zip(c["step"], c["task1_psnr"], c["task2_gain"])
    )
    record("forgetting", out, result, {**asdict(cfg), "shards": str(shards)}, metrics, figure, tracking_uri, experiment)
    return result
