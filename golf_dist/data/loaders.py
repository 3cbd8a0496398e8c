"""Both training loaders behind one factory: `resolve_loader` picks DALI or PyTorch for data.loader =
auto | dali | torch (with the reason), `make_train_loader` builds it. One contract for both: batches of
(blur, sharp) float32 tensors, N x 3 x crop x crop in [0, 1], blur and sharp cut with one window and one
set of flips; `excluded` and `skipped_runtime` (bad samples), `close()`. Both follow one plan, in which
every sample is a pure function of (seed, stream position) (golf_dist.data.torch_loader): they hand out the same
batches, and a checkpoint needs only its step to resume either of them, at any world size.
"""

from __future__ import annotations

import torch

from golf_dist.config import Loader, choices_of
from golf_dist.data.crop_plan import CropPlan
from golf_dist.data.dali import DaliTrainLoader, dali_import_error
from golf_dist.data.split_check import CheckedSplit, check_split
from golf_dist.data.torch_loader import ShardPairs, train_loader
from golf_dist.errors import ConfigError

LOADERS = choices_of(Loader)  # auto | dali | torch, as the config schema declares them


class TorchTrainLoader:
    """The PyTorch loader (golf_dist.data.torch_loader.train_loader) with the same interface as DaliTrainLoader."""

    kind = "torch"

    def __init__(self, pairs: ShardPairs, plan: CropPlan, skip_bad: bool, **kwargs):
        self.loader = train_loader(pairs, plan, skip_bad=skip_bad, **kwargs)
        self.batches = iter(self.loader)
        checked = getattr(pairs, "checked", None)
        self.excluded = checked.n_bad if checked is not None else 0  # left out at start-up
        self.skipped_runtime = 0  # failed to load (corrupt data behind a good header), replaced

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        blur, sharp, skipped = next(self.batches)
        self.skipped_runtime += int(skipped.sum())
        return blur, sharp

    def close(self) -> None:
        """Stop the worker processes now."""
        shutdown = getattr(self.batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def resolve_loader(
    choice: str, checked: CheckedSplit | None = None, device: torch.device | None = None
) -> tuple[str, str]:
    """('dali' | 'torch', why) for data.loader = auto | dali | torch."""
    if choice not in LOADERS:
        raise ConfigError(f"config key 'data.loader' must be one of {', '.join(LOADERS)}, got {choice!r}")
    if choice == "torch":
        return "torch", "data.loader=torch"
    problem = dali_import_error()
    if problem is None and checked is not None:
        try:  # auto also needs the pipeline to build (e.g. a DALI without the CUDA runtime it was built for)
            DaliTrainLoader(
                checked,
                crop=1,
                flips=False,
                crops_per_frame=1,
                per_device=1,
                rank=0,
                world=1,
                seed=0,
                device=device if device is not None else torch.device("cpu"),
                num_threads=1,
            ).close()
        except Exception as err:  # any failure to build is a reason to fall back
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
            problem = f"its pipeline does not build ({type(err).__name__}: {first_line})"
    if choice == "dali":
        if problem:
            raise ConfigError(f"config key 'data.loader'=dali, but {problem}; install nvidia-dali-cuda120 or use torch")
        return "dali", "data.loader=dali"
    if problem:
        return "torch", f"data.loader=auto and DALI is not usable: {problem}"
    return "dali", "data.loader=auto and DALI imports and builds"


def make_train_loader(
    cfg,
    pairs: ShardPairs,
    *,
    global_batch: int,
    accum: int,
    world: int,
    rank: int,
    start_step: int,
    device: torch.device,
    loader: str,
):
    """The training batches of this rank from `start_step`, from the loader `loader` ('dali' or 'torch')."""
    d = cfg.data
    per_device = global_batch // (world * accum)
    if loader == "dali":
        checked = getattr(pairs, "checked", None) or check_split(pairs.shard_dir, pairs.split, d.on_bad_sample)
        return DaliTrainLoader(
            checked,
            crop=d.crop,
            flips=d.flips,
            crops_per_frame=d.crops_per_frame,
            per_device=per_device,
            accum=accum,
            rank=rank,
            world=world,
            seed=cfg.seed,
            device=device,
            num_threads=d.num_workers,
            start_step=start_step,
        )
    plan = CropPlan(len(pairs), d.crop, d.flips, cfg.seed, d.crops_per_frame)
    return TorchTrainLoader(
        pairs,
        plan,
        d.on_bad_sample == "skip",
        global_batch=global_batch,
        accum=accum,
        world=world,
        rank=rank,
        start_step=start_step,
        end_step=cfg.train.steps,
        num_workers=d.num_workers,
        pin_memory=torch.device(device).type == "cuda",
    )
