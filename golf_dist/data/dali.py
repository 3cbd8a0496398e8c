"""The DALI loader: training pipelines and full frames for evaluation.

Training follows the PyTorch loader's plan (golf_dist.data.torch_loader: CropPlan, RankBatches): at optimizer step s,
rank r gets the pairs of the same stream positions, with the same window and flips, so the two loaders hand out
the same crops bit for bit (tests/test_dali.py). What that buys: a run's numbers do not depend on the loader; the
order does not depend on the world size; resuming at step s needs nothing but s, whichever loader and world
size the run resumes with. (DALI's webdataset reader could not give this: it reads its shards in one fixed
order and shuffles only through a buffer of `initial_fill` samples, and on the demo that buffer, at 128
samples, trained a worse F than the PyTorch loader's permutation: docs/training-recipe.md.)

Pipeline per rank: an external source hands DALI, per step, the encoded blur and sharp of the rank's frames
(views of the shards, each mapped once, at the offsets the shard index gives) and their window draws -> decode
(GPU 'mixed' where the format is GPU-decodable and a GPU is used, else CPU; raw .npy frames are not decoded at all) -> k
windows per decoded pair (data.crops_per_frame), each one window + one (h, v) flip pair applied to blur and
sharp -> uint8 crops, copied to the GPU only after the crop -> float conversion in torch (the same ops as the
PyTorch loader). Evaluation's full frames go through DALI's webdataset reader, in shard order.
"""

from __future__ import annotations

import mmap
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from golf_dist.data import formats
from golf_dist.data.crop_plan import CropPlan
from golf_dist.data.shard_reader import SampleRef, index_path, read_member
from golf_dist.data.split_check import FIX_BAD_SAMPLES, CheckedPairs, CheckedSplit, image_member
from golf_dist.data.torch_loader import RankBatches
from golf_dist.errors import ConfigError, DataError

# nvJPEG2000 decodes JPEG 2000 on the GPU. PNG goes through the CPU even with device='mixed' (and is
# slower that way, docs/facts.md); .npy frames are raw pixels, nothing to decode.
GPU_DECODABLE = ("jp2",)

# ---- the DALI pipelines ---------------------------------------------------------------------------


def dali_import_error() -> str | None:
    """None when nvidia.dali imports, else why not."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.fn  # noqa: F401
    except Exception as err:  # an ImportError, or a broken install raising anything at import
        return f"nvidia.dali does not import ({type(err).__name__}: {err})"
    return None


class _IndexFiles:
    """DALI index files (v1.2) for a CheckedSplit: the shard maker's own `<shard>.idx` where it lists exactly
    the checked samples, else one written here (into a temporary folder removed with this object)."""

    def __init__(self, checked: CheckedSplit):
        self.paths: list[str] = []
        self._tmp: str | None = None
        for n, (path, refs) in enumerate(checked.shards):
            if not refs:
                continue
            lines = []
            for ref in refs:
                parts = []
                for suffix, (offset, size) in ref.members.items():
                    parts.append(f"{suffix} {offset} {size} {ref.key}.{suffix}")
                lines.append(" ".join(parts))
            text = f"v1.2 {len(refs)}\n" + "\n".join(lines) + "\n"
            own = _existing_index(path)
            if own is not None and _same_samples(own, refs):
                self.paths.append(str(own))
                continue
            if self._tmp is None:
                self._tmp = tempfile.mkdtemp(prefix="golf-dali-index-")
                weakref.finalize(self, shutil.rmtree, self._tmp, True)
            target = Path(self._tmp) / f"{n:06d}.idx"
            target.write_text(text)
            self.paths.append(str(target))


def _existing_index(shard: Path) -> Path | None:
    for candidate in (index_path(shard), shard.with_name(shard.name + ".idx")):
        if candidate.is_file():
            return candidate
    return None


def _same_samples(index: Path, refs: list[SampleRef]) -> bool:
    """Whether an index file lists exactly these samples (count and member offsets)."""
    try:
        lines = index.read_text().split("\n")
        head = lines[0].split()
        if head[0] not in ("v1.1", "v1.2") or int(head[1]) != len(refs):
            return False
        for line, ref in zip(lines[1:], refs):
            fields = line.split()
            step = 4 if head[0] == "v1.2" else 3
            offsets = {fields[i]: (int(fields[i + 1]), int(fields[i + 2])) for i in range(0, len(fields), step)}
            if offsets != ref.members:
                return False
        return True
    except (OSError, ValueError, IndexError):
        return False


def _paths(checked: CheckedSplit) -> list[str]:
    return [str(path) for path, refs in checked.shards if refs]


def _decode(raw, fmt: str, mixed: bool):
    from nvidia.dali import fn, types

    if fmt == "npy":
        return fn.decoders.numpy(raw)
    # adjust_orientation=False: Pillow (the PyTorch loader, formats.decode) ignores an EXIF orientation tag,
    # and DALI would otherwise rotate that member against its pair: both loaders read the stored pixels
    return fn.decoders.image(raw, device="mixed" if mixed else "cpu", output_type=types.RGB, adjust_orientation=False)


def _window(image, crop: int, u, flips):
    """The window's anchor (top, left) inside `image` from the draws `u` (float32 [u_top, u_left]) and the
    flips (int32 [hflip, vflip]), as DALI nodes: crop_plan.window_offset's float32 arithmetic."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    shape = fn.cast(image.shape(), dtype=types.INT32)
    top = dmath.min(
        fn.cast(dmath.floor(u[0] * fn.cast(shape[0] - crop + 1, dtype=types.FLOAT)), dtype=types.INT32), shape[0] - crop
    )
    left = dmath.min(
        fn.cast(dmath.floor(u[1] * fn.cast(shape[1] - crop + 1, dtype=types.FLOAT)), dtype=types.INT32), shape[1] - crop
    )
    return fn.stack(top, left), flips[0], flips[1]


def _cut(image, anchor, crop: int, hflip, vflip):
    from nvidia.dali import fn, types

    patch = fn.slice(
        image, anchor, types.Constant(np.array([crop, crop], dtype=np.int32)), axes=[0, 1], out_of_bounds_policy="error"
    )
    # HWC -> CHW here, in DALI's threads; the float conversion stays in torch (DALI's normalize multiplies
    # by 1/255, which differs from x / 255 in the last bit for some x)
    return fn.transpose(fn.flip(patch, horizontal=hflip, vertical=vflip), perm=[2, 0, 1])


class StepFrames:
    """The external source of one rank's training pipeline. For run i (optimizer step start_step + i) it reads
    the frames of this rank's stream positions, in the PyTorch loader's order (micro-batch by micro-batch),
    and returns their encoded blur and sharp with each window's draws (k per frame, CropPlan.draws)."""

    def __init__(self, pairs: CheckedPairs, plan: CropPlan, batches: RankBatches, start_step: int):
        self.pairs, self.plan, self.batches, self.start_step = pairs, plan, batches, start_step
        # each shard mapped once, a member handed to DALI as a view of the map (no copy): read() made one more
        # copy of every frame, and npy pairs through DALI came at 199 per second instead of 356 (docs/data.md)
        self._maps: dict[Path, mmap.mmap] = {}

    def _member(self, shard: Path, offset: int, size: int) -> np.ndarray:
        mapped = self._maps.get(shard)
        if mapped is None:
            with open(shard, "rb") as fh:
                mapped = self._maps[shard] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        if offset + size > len(mapped):
            raise DataError(f"{shard} ends before byte {offset + size}: the shard is truncated; make the shards again")
        return np.frombuffer(mapped, dtype=np.uint8, count=size, offset=offset)

    def close(self) -> None:
        for mapped in self._maps.values():
            try:
                mapped.close()
            except BufferError:  # a view still referenced (by DALI): the map is unmapped when that goes
                pass
        self._maps.clear()

    def frames(self, step: int) -> list[int]:
        """The first stream position of each frame this rank decodes at `step` (k positions share a frame)."""
        k = self.plan.crops_per_frame
        return [p for m in range(self.batches.accum) for p in self.batches.positions(step, m)[::k]]

    def sources(self, step: int) -> list[str]:
        refs = [self.pairs.refs[self.plan.pair_index(p)] for p in self.frames(step)]
        return [f"shard {ref.shard} sample {ref.key}" for ref in refs]

    def __call__(self, info) -> tuple[list[np.ndarray], ...]:  # info: DALI's BatchInfo
        k = self.plan.crops_per_frame
        blur, sharp, u, flips = [], [], [], []
        for first in self.frames(self.start_step + info.iteration):
            ref = self.pairs.refs[self.plan.pair_index(first)]
            blur.append(self._member(ref.shard, *ref.blur))
            sharp.append(self._member(ref.shard, *ref.sharp))
            draws = [self.plan.draws(first + i) for i in range(k)]
            u.append(np.array([d[:2] for d in draws], dtype=np.float32))
            flips.append(np.array([d[2:] for d in draws], dtype=np.int32))
        return blur, sharp, u, flips


def build_train_pipeline(
    frames: StepFrames, *, fmt: str, crop: int, frames_per_batch: int, device_id: int | None, num_threads: int
):
    """The training pipeline of one rank. Outputs, per window i < k: blur_i, sharp_i (uint8 CHW crops of
    each frame, on the GPU when device_id is set), window_i (int32 [top, left, hflip, vflip])."""
    from nvidia.dali import Pipeline, fn, types

    mixed = device_id is not None and fmt in GPU_DECODABLE
    pipe = Pipeline(
        batch_size=frames_per_batch, num_threads=num_threads, device_id=device_id, seed=0, prefetch_queue_depth=2
    )
    with pipe:
        blur_raw, sharp_raw, u, flips = fn.external_source(
            # no_copy: DALI reads the members from the shard maps, which stay open and unchanged until close()
            source=frames,
            num_outputs=4,
            batch=True,
            batch_info=True,
            no_copy=True,
            dtype=[types.UINT8, types.UINT8, types.FLOAT, types.INT32],
        )
        blur, sharp = _decode(blur_raw, fmt, mixed), _decode(sharp_raw, fmt, mixed)
        outputs = []
        for i in range(frames.plan.crops_per_frame):
            anchor, hflip, vflip = _window(blur, crop, u[i], flips[i])
            pair = [_cut(img, anchor, crop, hflip, vflip) for img in (blur, sharp)]
            if device_id is not None and not mixed:
                pair = [p.gpu() for p in pair]  # the copy to the GPU comes after the crop
            outputs += [*pair, fn.cat(anchor, fn.stack(hflip, vflip))]
        pipe.set_outputs(*outputs)
    pipe.build()
    return pipe


def _to_torch(batch, device: torch.device) -> torch.Tensor:
    """A DALI batch of uniform uint8 tensors -> one N x ... uint8 torch tensor on `device`."""
    from nvidia.dali.backend import TensorListGPU

    if isinstance(batch, TensorListGPU):
        from nvidia.dali.plugin.pytorch import feed_ndarray

        tensor = batch.as_tensor()
        out = torch.empty(tensor.shape(), dtype=torch.uint8, device=device)
        feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    return torch.from_numpy(batch.as_array()).to(device, non_blocking=True)


def to_float(batch: torch.Tensor, layout: str = "NCHW") -> torch.Tensor:
    """uint8 N x 3 x H x W (or NHWC) -> N x 3 x H x W float32 in [0, 1]: the PyTorch loader's to_tensor,
    batched (x / 255 elementwise: the same bits whatever the order of the copies)."""
    out = batch.float().div_(255.0)
    return out if layout == "NCHW" else out.permute(0, 3, 1, 2).contiguous()


def _source(info) -> str:
    text = bytes(np.asarray(info)).decode(errors="replace")  # "SHARD:OFFSET:MEMBER" (SHARD may hold ':')
    shard, _, member = text.rsplit(":", 2)
    return f"shard {shard} sample {member.split('.', 1)[0]}"


def _dali_failure(err: Exception, checked: CheckedSplit) -> DataError:
    """A DALI run failed: find the sample (decoding this split's samples on the CPU) and name it."""
    for path, refs in checked.shards:
        for ref in refs:
            where = f"shard {path} sample {ref.key}"
            images = []
            for kind in ("blur", "sharp"):
                _, (offset, size) = image_member(ref.members, kind)
                data = read_member(path, offset, size)
                try:
                    images.append(formats.decode(data, checked.fmt, f"{where} ({kind})"))
                except DataError as problem:
                    return DataError(f"bad sample: {problem}; {FIX_BAD_SAMPLES}")
            if images[0].shape != images[1].shape:
                return DataError(f"bad sample: {where}: blur and sharp differ in size; {FIX_BAD_SAMPLES}")
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return DataError(f"the DALI pipeline over {checked.shard_dir} ({checked.split}) failed: {first}")


class DaliTrainLoader:
    """Endless (blur, sharp) batches of `per_device` crops for one rank, on `device`, from DALI: the PyTorch
    loader's batches for the same seed and step, made by DALI.

    One pipeline run makes one optimizer step's crops of this rank (per_device x accum), handed out as
    `accum` micro-batches, each in stream order (the k crops of a frame next to each other).
    """

    kind = "dali"

    def __init__(
        self,
        checked: CheckedSplit,
        *,
        crop: int,
        flips: bool,
        crops_per_frame: int,
        per_device: int,
        rank: int,
        world: int,
        seed: int,
        device: torch.device,
        num_threads: int,
        accum: int = 1,
        start_step: int = 0,
    ):
        if per_device % crops_per_frame:
            raise ConfigError(
                f"config key 'data.crops_per_frame'={crops_per_frame} must divide the crops per micro-batch and "
                f"process, {per_device} (data.batch_size / processes / train.grad_accum): the DALI loader decodes "
                "each frame once for its k crops"
            )
        self.checked, self.device = checked, torch.device(device)
        self.k, self.per_device, self.accum = crops_per_frame, per_device, accum
        pairs = CheckedPairs(checked)  # the same pairs, in the same order, as the PyTorch loader's
        plan = CropPlan(len(pairs), crop, flips, seed, crops_per_frame)
        batches = RankBatches(per_device * accum * world, accum, world, rank, start_step, start_step)
        self.frames = StepFrames(pairs, plan, batches, start_step)
        self.step = start_step  # the optimizer step the next run makes
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        device_id = (self.device.index or 0) if self.device.type == "cuda" else None
        self.pipe = build_train_pipeline(
            self.frames,
            fmt=checked.fmt,
            crop=crop,
            device_id=device_id,
            frames_per_batch=per_device * accum // crops_per_frame,
            num_threads=max(1, num_threads),
        )
        self.excluded, self.skipped_runtime = checked.n_bad, 0  # DALI cannot skip at run time: it raises
        self.last_windows: list[np.ndarray] = []  # [top, left, hflip, vflip] per crop of the last batch
        self.last_sources: list[str] = []

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._pending:
            return self._micro()
        try:
            out = self.pipe.run()
        except RuntimeError as err:
            raise _dali_failure(err, self.checked) from None
        n, k = len(out[0]), self.k
        crops = {}
        for name, column in (("blur", 0), ("sharp", 1)):  # frame-major: frame j's crop i at j * k + i
            stacked = torch.stack([_to_torch(out[3 * i + column], self.device) for i in range(k)], dim=1)
            crops[name] = stacked.reshape(n * k, *stacked.shape[2:]).float().div_(255.0)
        windows = [np.asarray(out[3 * i + 2].as_array()) for i in range(k)]
        self._windows = [windows[i][j] for j in range(n) for i in range(k)]
        self._sources = [source for source in self.frames.sources(self.step) for _ in range(k)]
        self.step += 1
        b = self.per_device
        self._pending = [
            (crops["blur"][m * b : (m + 1) * b], crops["sharp"][m * b : (m + 1) * b]) for m in range(self.accum)
        ]
        return self._micro()

    def _micro(self) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.accum - len(self._pending)
        b = self.per_device
        self.last_windows = self._windows[m * b : (m + 1) * b]  # of the crops just returned, for tests
        self.last_sources = self._sources[m * b : (m + 1) * b]
        return self._pending.pop(0)

    def close(self) -> None:
        """Stop the pipeline's threads now (not whenever the garbage collector gets to it)."""
        self.pipe._shutdown()
        self.frames.close()


# ---- full frames (evaluation) ---------------------------------------------------------------------


def dali_full_frames(
    checked: CheckedSplit, rank: int, world: int, device: torch.device | str = "cpu", num_threads: int = 1
) -> Iterator[tuple[torch.Tensor, torch.Tensor, str]]:
    """(blur, sharp, key) whole frames, 3xHxW float in [0, 1], of this rank's part of the split: no crop, no
    shuffle; the ranks' parts are disjoint and together hold every sample of the split once.

    DALI's reader gives shard r the samples [r*N//world, (r+1)*N//world) and pads the last batch by
    repeating a sample; this reads exactly the rank's count, one frame per batch, so nothing repeats.
    """
    from nvidia.dali import Pipeline, fn

    device = torch.device(device)
    device_id = (device.index or 0) if device.type == "cuda" else None
    mixed = device_id is not None and checked.fmt in GPU_DECODABLE
    n = checked.n_samples
    count = (rank + 1) * n // world - rank * n // world
    if count == 0:
        return
    index = _IndexFiles(checked)
    pipe = Pipeline(batch_size=1, num_threads=max(1, num_threads), device_id=device_id, seed=0)
    with pipe:
        blur_raw, sharp_raw = fn.readers.webdataset(
            paths=_paths(checked),
            index_paths=index.paths,
            ext=[f"blur.{checked.fmt}", f"sharp.{checked.fmt}"],
            missing_component_behavior="error",
            shard_id=rank,
            num_shards=world,
            random_shuffle=False,
            pad_last_batch=True,
            stick_to_shard=True,
            name="Reader",
        )
        info = fn.get_property(blur_raw, key="source_info")
        pipe.set_outputs(_decode(blur_raw, checked.fmt, mixed), _decode(sharp_raw, checked.fmt, mixed), info)
    pipe.build()
    for _ in range(count):
        try:
            blur, sharp, src = pipe.run()
        except RuntimeError as err:
            raise _dali_failure(err, checked) from None
        where = _source(src.at(0))
        b, s = _to_torch(blur, device), _to_torch(sharp, device)
        if b.shape != s.shape:
            raise DataError(
                f"bad sample: {where}: blur {tuple(b.shape[1:3])} and sharp {tuple(s.shape[1:3])} differ in size"
            )
        yield to_float(b, "NHWC")[0], to_float(s, "NHWC")[0], where.rsplit(" ", 1)[-1]
    del index
