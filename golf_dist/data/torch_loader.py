"""The PyTorch loader: aligned (blur, sharp) crops from WebDataset shards, reproducible at any world size.

Why map-style and not a streaming shuffle buffer: the shards' tar headers are indexed once at start-up
(cheap: headers only), and then every training sample is a pure function of (seed, global position):
    epoch = position // n_pairs, pair = permutation(seed, epoch)[position % n_pairs],
    window and flips = rng(seed, position).
Optimizer step s consumes the global positions [s * B, (s + 1) * B) of the stream, split between ranks
(and accumulation micro-batches) by position. So
  * blur and sharp always share one window and one set of flips;
  * ranks and loader workers never duplicate a sample, whatever their number;
  * the sample order does not depend on the world size (a preempted 8-GPU run can go on with 4);
  * resuming at step s is exact: the data position is s * B, nothing else to save.
The DALI loader (golf_dist.data.dali) follows the same plan (golf_dist.data.crop_plan, RankBatches): the two
loaders hand out the same crops, bit for bit, so a run's numbers do not depend on which one it used.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from golf_dist.data import formats
from golf_dist.data.crop_plan import CropPlan, paired_crop
from golf_dist.data.shard_reader import index_shard, read_manifest, read_member, shard_paths, split_format
from golf_dist.data.storage import local_shard_dir
from golf_dist.errors import DataError, GolfError
from golf_dist.training.preemption import leave_stop_signals_to_the_rank


@dataclass(frozen=True)
class PairRef:
    shard: Path
    key: str
    blur: tuple[int, int]  # (offset, size) of the member in the tar
    sharp: tuple[int, int]
    blur_ext: str | None = None  # the members' image formats (golf_dist.data.formats); None: the split's
    sharp_ext: str | None = None


def _member_suffix(members: dict, kind: str, shard: Path, key: str) -> str:
    """The suffix ("blur.png", "sharp.npy", ...) of a sample's `kind` image member."""
    for suffix in members:
        if suffix.startswith(f"{kind}."):
            return suffix
    raise DataError(f"shard {shard}: sample {key} has no {kind} image")


class ShardPairs:
    """Random access to the (blur, sharp) pairs of one split of a shard folder (or of an s3:// shard
    set, brought into the local cache `cache_dir` first: see golf_dist.data.storage.local_shard_dir)."""

    def __init__(self, shard_dir: str | Path, split: str, cache_dir: str | Path | None = None):
        self.source = str(shard_dir)  # as given (a folder or s3:// URL); shard_dir is where it is read
        self.shard_dir = local_shard_dir(str(shard_dir), cache_dir)
        self.split = split
        self.manifest = read_manifest(self.shard_dir)
        refs = []
        for shard in shard_paths(self.shard_dir, self.manifest, split):
            for sample in index_shard(shard):
                blur = _member_suffix(sample.members, "blur", shard, sample.key)
                sharp = _member_suffix(sample.members, "sharp", shard, sample.key)
                refs.append(
                    PairRef(
                        shard,
                        sample.key,
                        sample.members[blur],
                        sample.members[sharp],
                        blur.split(".", 1)[1],
                        sharp.split(".", 1)[1],
                    )
                )
        if not refs:
            raise DataError(f"shard folder {self.shard_dir}: split '{split}' holds no samples")
        self.refs = refs

    def __len__(self) -> int:
        return len(self.refs)

    @property
    def frame_size(self) -> tuple[int, int] | None:
        """(height, width) shared by every pair of the split, per the manifest, else None."""
        info = self.manifest["splits"][self.split]
        if info.get("height") and info.get("width"):
            return int(info["height"]), int(info["width"])
        return None

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        """Decode pair `index`: (blur HxWx3 uint8, sharp HxWx3 uint8, key)."""
        ref = self.refs[index]
        where = f"shard {ref.shard} sample {ref.key}"
        fmt = split_format(self.manifest, self.split)
        blur = formats.decode(read_member(ref.shard, *ref.blur), ref.blur_ext or fmt, f"{where} (blur)")
        sharp = formats.decode(read_member(ref.shard, *ref.sharp), ref.sharp_ext or fmt, f"{where} (sharp)")
        if blur.shape != sharp.shape:
            raise DataError(f"{where}: blur {blur.shape[:2]} and sharp {sharp.shape[:2]} differ in size")
        return blur, sharp, ref.key


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float32 in [0, 1]."""
    return torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float().div_(255.0)


class TrainCrops(torch.utils.data.Dataset):
    """Indexed by global stream position; returns (blur, sharp) float crops of one sample and how many bad
    samples were skipped to get it (0 unless `skip_bad`).

    With `skip_bad`, a pair that fails to load (undecodable, blur/sharp sizes differ) is replaced by the next
    pair (by index) that loads, with the position's own window: still a pure function of position.
    """

    def __init__(self, pairs: ShardPairs, plan: CropPlan, skip_bad: bool = False):
        self.pairs = pairs
        self.plan = plan
        self.skip_bad = skip_bad
        self._last: tuple[int, tuple] | None = None  # the last decoded pair: k crops per frame decode once

    def __len__(self) -> int:  # the stream is endless; positions come from the batch sampler
        return 2**62

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        if self._last is None or self._last[0] != index:
            self._last = (index, self.pairs.load(index))
        return self._last[1]

    def __getitem__(self, position: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        index, skipped = self.plan.pair_index(position), 0
        while True:
            try:
                blur, sharp, key = self._load(index)
                break
            except DataError:
                if not self.skip_bad or skipped + 1 >= len(self.pairs):
                    raise
                skipped += 1
                index = (index + 1) % len(self.pairs)
        height, width = blur.shape[:2]
        size = self.plan.crop
        if height < size or width < size:
            raise DataError(
                f"sample {key} of {self.pairs.shard_dir} is {height}x{width}, smaller than data.crop={size}"
            )
        top, left, hflip, vflip = self.plan.window(position, height, width)
        b, s = paired_crop(blur, sharp, top, left, size, hflip, vflip)
        return to_tensor(b), to_tensor(s), skipped


class RankBatches(torch.utils.data.Sampler):
    """Per optimizer step and micro-batch, this rank's slice of the global batch's positions.

    Global batch B per step, split into `accum` micro-batches of B/accum, each split across `world`
    ranks: rank r's micro-batch m of step s holds positions
    s*B + m*(B/accum) + r*b + [0, b) with b = B / (accum * world).
    """

    def __init__(self, global_batch: int, accum: int, world: int, rank: int, start_step: int, end_step: int):
        self.micro = global_batch // accum
        self.per_rank = self.micro // world
        self.global_batch, self.accum, self.rank = global_batch, accum, rank
        self.start_step, self.end_step = start_step, end_step

    def __len__(self) -> int:
        return (self.end_step - self.start_step) * self.accum

    def positions(self, step: int, micro: int) -> range:
        """This rank's stream positions in micro-batch `micro` of optimizer step `step`."""
        first = step * self.global_batch + micro * self.micro + self.rank * self.per_rank
        return range(first, first + self.per_rank)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.end_step):
            for m in range(self.accum):
                yield list(self.positions(step, m))


def train_loader(
    pairs: ShardPairs,
    plan: CropPlan,
    global_batch: int,
    accum: int,
    world: int,
    rank: int,
    start_step: int,
    end_step: int,
    num_workers: int,
    skip_bad: bool = False,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """Batches of (blur, sharp, skipped) for this rank, step by step from `start_step`, `accum` per step.

    `pin_memory` (for a CUDA device) puts each batch in page-locked memory, so the trainer's
    `.to(device, non_blocking=True)` overlaps the copy with the GPU's work instead of waiting for it."""
    sampler = RankBatches(global_batch, accum, world, rank, start_step, end_step)
    return torch.utils.data.DataLoader(
        TrainCrops(pairs, plan, skip_bad),
        batch_sampler=sampler,
        num_workers=num_workers,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
        pin_memory=pin_memory,
        worker_init_fn=leave_stop_signals_to_the_rank,  # SIGTERM to every process must not kill the workers
    )


class FullFrames(torch.utils.data.Dataset):
    """Whole (blur, sharp) frames of a split, for validation and evaluation; no crop, no shuffle."""

    def __init__(self, pairs: ShardPairs, indices: list[int]):
        self.pairs = pairs
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, str, int]:
        index = self.indices[i]
        blur, sharp, key = self.pairs.load(index)
        return to_tensor(blur), to_tensor(sharp), key, index


def full_frame_loader(
    pairs: ShardPairs, rank: int, world: int, limit: int | None = None, num_workers: int = 0
) -> torch.utils.data.DataLoader:
    """Pair i goes to rank i % world: every pair of the split (or the first `limit`) exactly once."""
    count = len(pairs) if limit is None else min(limit, len(pairs))
    indices = list(range(rank, count, world))
    return torch.utils.data.DataLoader(
        FullFrames(pairs, indices),
        batch_size=None,
        num_workers=min(num_workers, len(indices)),
        worker_init_fn=leave_stop_signals_to_the_rank,
    )


def unwrapped_errors(batches: Iterable) -> Iterator:
    """The items of a DataLoader; a GolfError raised in one of its workers re-raised with its own message
    (unwrap_worker_error), not a traceback of the worker."""
    try:
        yield from batches
    except GolfError as err:
        raise unwrap_worker_error(err) from None


def unwrap_worker_error(err: GolfError) -> GolfError:
    """A GolfError re-raised from a DataLoader worker carries the worker's traceback: keep the message."""
    lines = str(err).strip().splitlines()
    if len(lines) < 2:
        return err
    head, sep, message = lines[-1].partition(": ")  # "golf_dist.errors.DataError: <message>"
    return type(err)(message if sep and head.endswith(type(err).__name__) else lines[-1])
