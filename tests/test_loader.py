"""The PyTorch loader: aligned windows and flips, disjoint ranks, world-size-independent order."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image

from golf_dist.data.crop_plan import CropPlan
from golf_dist.data.torch_loader import RankBatches, ShardPairs, TrainCrops, full_frame_loader, train_loader


def _coordinate_pairs(root: Path, height=40, width=56, frames=3):
    """Pairs whose pixels encode their own coordinates (R=row, G=col); blur = sharp + 1 in B."""
    for scene in ("GOPR0001_00_00", "GOPR0002_00_00"):
        for split in ("train", "test"):
            for frame in range(frames):
                rows, cols = np.mgrid[0:height, 0:width]
                sharp = np.stack([rows, cols, np.full_like(rows, 10 * frame)], -1).astype(np.uint8)
                blur = sharp.copy()
                blur[..., 2] += 1
                for kind, image in (("blur", blur), ("sharp", sharp)):
                    d = root / split / scene / kind
                    d.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(image).save(d / f"{frame + 40:06d}.png")


@pytest.fixture(scope="module")
def coordinate_shards(tmp_path_factory):
    base = tmp_path_factory.mktemp("coords")
    _coordinate_pairs(base / "GOPRO_Large")
    run_cli(
        "data_prep/shard_gopro.py",
        "--src",
        base / "GOPRO_Large",
        "--out",
        base / "shards",
        "--maxcount",
        2,
        "--workers",
        1,
        check=True,
    )
    return base / "shards"


def test_blur_and_sharp_share_window_and_flips(coordinate_shards):
    pairs = ShardPairs(coordinate_shards, "train")
    plan = CropPlan(len(pairs), crop=16, flips=True, seed=0)
    crops = TrainCrops(pairs, plan)
    seen_flips = set()
    for position in range(40):
        blur, sharp = (t.mul(255).round().byte().permute(1, 2, 0).numpy() for t in crops[position][:2])
        assert np.array_equal(blur[..., :2], sharp[..., :2])  # same window, same flips
        assert np.all(blur[..., 2].astype(int) - sharp[..., 2] == 1)
        rows, cols = sharp[..., 0].astype(int), sharp[..., 1].astype(int)
        hflip = cols[0, 0] > cols[0, -1]
        vflip = rows[0, 0] > rows[-1, 0]
        seen_flips.add((hflip, vflip))
        # the window is a contiguous 16x16 block of the frame, flipped as a whole
        assert abs(cols[0, -1] - cols[0, 0]) == 15 and abs(rows[-1, 0] - rows[0, 0]) == 15
    assert seen_flips == {(False, False), (True, False), (False, True), (True, True)}


def test_crop_is_a_function_of_seed_and_position(coordinate_shards):
    pairs = ShardPairs(coordinate_shards, "train")
    a = TrainCrops(pairs, CropPlan(len(pairs), 16, True, seed=0))
    b = TrainCrops(pairs, CropPlan(len(pairs), 16, True, seed=0))
    c = TrainCrops(pairs, CropPlan(len(pairs), 16, True, seed=1))
    assert all((a[p][0] == b[p][0]).all() for p in range(8))
    assert any((a[p][0] != c[p][0]).any() for p in range(8))


def test_each_epoch_visits_every_pair_once():
    plan = CropPlan(n_pairs=7, crop=8, flips=False, seed=4)
    for epoch in range(3):
        assert sorted(plan.pair_index(epoch * 7 + i) for i in range(7)) == list(range(7))


@pytest.mark.parametrize("world, accum", [(1, 1), (2, 1), (4, 2), (2, 4)])
def test_ranks_split_the_global_batch_without_duplicates(world, accum):
    batch, steps = 16, 5
    per_rank = [list(RankBatches(batch, accum, world, r, 0, steps)) for r in range(world)]
    flat = sorted(p for batches in per_rank for b in batches for p in b)
    assert flat == list(range(batch * steps))  # every position once, nothing else
    # step s of every rank draws only from step s's global positions: order independent of world size
    for rank_batches in per_rank:
        for i, b in enumerate(rank_batches):
            step = i // accum
            assert all(step * batch <= p < (step + 1) * batch for p in b)


def test_resuming_starts_at_the_saved_step():
    full = list(RankBatches(8, 1, 2, 1, 0, 6))
    resumed = list(RankBatches(8, 1, 2, 1, 3, 6))
    assert resumed == full[3:]


def test_loader_with_workers_matches_in_process(shards):
    pairs = ShardPairs(shards, "train")
    plan = CropPlan(len(pairs), 32, True, seed=2)
    a = [b for b, _, _ in train_loader(pairs, plan, 4, 1, 1, 0, 0, 3, num_workers=0)]
    b = [b for b, _, _ in train_loader(pairs, plan, 4, 1, 1, 0, 0, 3, num_workers=2)]
    assert len(a) == 3 and all((x == y).all() for x, y in zip(a, b))
    assert a[0].shape == (4, 3, 32, 32)


def test_full_frames_cover_the_split_once_across_ranks(shards):
    pairs = ShardPairs(shards, "test")
    keys = [key for r in range(3) for _, _, key, _ in full_frame_loader(pairs, r, 3)]
    assert sorted(keys) == sorted(ref.key for ref in pairs.refs) and len(keys) == len(pairs)


def test_an_error_in_a_loader_worker_keeps_its_one_line_message(shards):
    """A sample smaller than the crop, found inside a worker process, surfaces as one clear DataError."""
    from golf_dist.data.torch_loader import unwrap_worker_error
    from golf_dist.errors import DataError

    pairs = ShardPairs(shards, "train")
    plan = CropPlan(len(pairs), crop=128, flips=False, seed=0)  # frames are 64x96
    with pytest.raises(DataError) as caught:
        next(iter(train_loader(pairs, plan, 2, 1, 1, 0, 0, 1, num_workers=1)))
    clean = str(unwrap_worker_error(caught.value))
    assert "\n" not in clean and "smaller than data.crop=128" in clean and "64x96" in clean


def test_crops_per_frame_cuts_k_windows_from_one_decoded_pair(coordinate_shards):
    """data.crops_per_frame=2: positions 2i and 2i+1 come from one pair (decoded once), each with its own window."""
    pairs = ShardPairs(coordinate_shards, "train")
    plan = CropPlan(len(pairs), crop=16, flips=False, seed=0, crops_per_frame=2)
    assert [plan.pair_index(p) for p in range(0, 24, 2)] == [plan.pair_index(p) for p in range(1, 24, 2)]
    assert sorted(plan.pair_index(p) for p in range(0, 2 * len(pairs), 2)) == list(range(len(pairs)))
    crops = TrainCrops(pairs, plan)
    loads = []
    original = pairs.load
    pairs.load = lambda i: loads.append(i) or original(i)  # count decodes (the real decode still runs)
    differ = 0
    for position in range(0, 12, 2):
        (b0, s0, _), (b1, s1, _) = crops[position], crops[position + 1]
        differ += not torch.equal(b0, b1)
        for b, s in ((b0, s0), (b1, s1)):  # blue = 10 * frame: both crops of one pair show the same frame
            assert torch.equal(b[2].mul(255).round() - 1, s[2].mul(255).round())
        assert torch.equal(b0[2], b1[2])
    assert len(loads) == 6 and differ >= 5


@pytest.mark.slow
def test_batches_for_a_gpu_are_page_locked_so_their_copy_overlaps_the_step(shards):
    """The trainer copies each batch with non_blocking=True: from pinned memory that copy is asynchronous."""
    from golf_dist.config import load_config
    from golf_dist.data.loaders import make_train_loader

    cfg = load_config(
        "gopro", overrides=[f"data.shards={shards}", "data.crop=32", "data.num_workers=0", "train.steps=2"]
    )
    pairs = ShardPairs(shards, "train")
    for device, pinned in (("cpu", False), ("cuda", True)):
        loader = make_train_loader(
            cfg,
            pairs,
            global_batch=4,
            accum=1,
            world=1,
            rank=0,
            start_step=0,
            device=torch.device(device),
            loader="torch",
        )
        assert loader.loader.pin_memory is pinned
        loader.close()
