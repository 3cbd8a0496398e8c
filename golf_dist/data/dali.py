"""The DALI loader, the start-up check of a split's shards, and the choice between DALI and PyTorch.

One contract for both loaders: batches of (blur, sharp) float32 tensors, N x 3 x crop x crop in [0, 1],
blur and sharp cut with one window and one set of flips. The PyTorch loader (golf_dist.data.loader)
makes every sample a pure function of (seed, position); the DALI loader here is faster and draws its
windows, flips and shuffle from DALI's own generators, so its order depends on the world size, and
exact resume goes through DALI's pipeline checkpoints (one per rank, saved in the trainer's checkpoint).

Pipeline per rank: fn.readers.webdataset over the split's shards (`shard_id=rank, num_shards=world`,
shuffled for training) -> decode (GPU 'mixed' where the format is GPU-decodable and a GPU is used,
else CPU; raw .npy frames are not decoded at all) -> k windows per decoded pair (data.crops_per_frame),
each one window + one (h, v) flip pair drawn once and applied to blur and sharp -> uint8 crops, copied
to the GPU only after the crop -> float conversion in torch (the same ops as the PyTorch loader, so
both give identical pixels for the same window and flips).

Bad samples: every shard of the split is checked at start-up from its tar headers and the first bytes of
each image (format, size): a truncated tar, a missing member, an image that is no image of the format and
mismatched blur/sharp sizes are found there, for both loaders. `data.on_bad_sample: error` stops with the
shard and sample key named; `skip` leaves those samples out (DALI reads through index files that list only
the good samples) and counts them. An image whose header is fine but whose data is corrupt is found only
when it is decoded: the PyTorch loader then skips it (skip) or names it (error); DALI cannot skip inside a
running pipeline, so it stops and names the sample (both modes).
"""

from __future__ import annotations

import base64
import io
import math
import shutil
import tarfile
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from golf_dist.data import formats
from golf_dist.data.loader import CropPlan, PairRef, ShardPairs, train_loader
from golf_dist.data.shard_reader import (
    SampleRef, index_path, index_shard, read_manifest, read_member, shard_paths, split_format as _format, tar_members,
)
from golf_dist.data.storage import local_shard_dir
from golf_dist.errors import ConfigError, DataError

FORMATS = formats.FORMATS  # the image formats a shard split may hold
# nvJPEG2000 decodes JPEG 2000 on the GPU. PNG goes through the CPU even with device='mixed' (and is
# slower that way, docs/facts.md); .npy frames are raw pixels, nothing to decode.
GPU_DECODABLE = ("jp2",)
LOADERS = ("auto", "dali", "torch")
_FIX = "make the shards again (python data_prep/shard_gopro.py ... --overwrite), or set data.on_bad_sample=skip"


# ---- which format, which members -----------------------------------------------------------------


def split_format(manifest: dict, split: str) -> str:
    """The image format of a split's shards: per split if the manifest says, else its image_format."""
    fmt = _format(manifest, split)
    if fmt not in FORMATS:
        raise DataError(f"split {split!r}: image format {fmt!r} is not one of {', '.join(FORMATS)}")
    return fmt


def _image_member(members: dict, kind: str) -> tuple[str, tuple[int, int]] | None:
    for suffix, where in members.items():
        if suffix.startswith(f"{kind}.") and suffix[len(kind) + 1 :] in FORMATS:
            return suffix, where
    return None


def _npy_shape(head: bytes, size: int | None = None) -> tuple[int, ...]:
    """Shape from an .npy header (NumPy's parser), checking the payload is C-ordered uint8 and, given the
    member's `size`, that the header's shape is exactly what the member holds (DALI trusts the header)."""
    shape, fortran, dtype, offset = formats.npy_header(head)
    if dtype != np.uint8 or fortran:
        raise ValueError(f"not a C-ordered uint8 array ({dtype.str}, fortran_order={fortran})")
    if size is not None and size - offset != math.prod(shape):
        raise ValueError(
            f"its header claims shape {shape} ({math.prod(shape)} bytes), the member holds {size - offset}"
        )
    return shape


class AlphaChannelError(ValueError):
    """An image that decodes but carries alpha (or a transparency key): refused in training shards."""


def image_size(data: bytes, fmt: str, size: int | None = None) -> tuple[int, int]:
    """(height, width) from an image's first bytes, without decoding its pixels; ValueError if it is not
    one, or one of more than formats.MAX_PIXELS pixels. `size`: the member's whole byte size (checks .npy)."""
    if fmt == "npy":
        shape = _npy_shape(data, size)
        if len(shape) != 3 or shape[2] != 3:
            raise ValueError(f"array of shape {shape}, not HxWx3")
        height, width = int(shape[0]), int(shape[1])
    else:
        import warnings

        from PIL import Image

        expected = {"png": "PNG", "jp2": "JPEG2000"}[fmt]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as img:
                    found, mode, (width, height) = img.format, img.mode, img.size
                    alpha = mode in formats.ALPHA_MODES or "transparency" in img.info
        except Exception as err:  # a hostile header can make a Pillow plugin raise anything (struct.error, ...)
            raise ValueError(str(err) or f"not an image ({type(err).__name__})") from None
        if found != expected:
            raise ValueError(f"a {found} image, not {expected}")
        if alpha:  # DALI's decoder drops alpha where formats.decode composites it: the loaders would differ
            raise AlphaChannelError(f"an image with an alpha channel ({mode}); shards hold opaque RGB "
                             "(data_prep/shard_gopro.py writes them so)")
    if width * height > formats.MAX_PIXELS:
        raise ValueError(
            f"{width}x{height} = {width * height} pixels, more than formats.MAX_PIXELS={formats.MAX_PIXELS}"
        )
    return height, width


# ---- the start-up check of a split ----------------------------------------------------------------


@dataclass(frozen=True)
class BadSample:
    shard: Path
    key: str | None
    reason: str
    count: int = 1  # samples lost to this problem (a truncated tar can hide several)

    def __str__(self) -> str:
        return f"shard {self.shard}" + (f" sample {self.key}" if self.key else "") + f": {self.reason}"


def _salvage(path: Path) -> tuple[list[SampleRef], list[BadSample]]:
    """The whole samples of a damaged shard (tar headers read until the damage) and what is broken."""
    samples: list[SampleRef] = []
    bad: list[BadSample] = []
    size = path.stat().st_size
    try:
        with tarfile.open(path, mode="r:") as tar:
            try:
                for member in tar_members(tar, size):
                    if member.key is None:
                        continue
                    if not member.whole:
                        bad.append(BadSample(path, member.key, f"the tar is truncated inside member {member.name}"))
                        if samples and samples[-1].key == member.key:
                            samples.pop()
                        break
                    if not samples or samples[-1].key != member.key:
                        samples.append(SampleRef(member.key, {}))
                    samples[-1].members[member.suffix] = (member.offset, member.size)
            except tarfile.TarError as err:
                bad.append(BadSample(path, None, f"unreadable tar header after byte {tar.offset} ({err})"))
    except (tarfile.TarError, OSError) as err:
        bad.append(BadSample(path, None, f"not a readable tar ({err})"))
    return samples, bad


@dataclass
class CheckedSplit:
    """The samples of one split that passed the start-up check, per shard, and the ones left out."""

    shard_dir: Path
    split: str
    manifest: dict
    fmt: str
    shards: list[tuple[Path, list[SampleRef]]]
    bad: list[BadSample] = field(default_factory=list)
    source: str = ""  # what data.shards said (an s3:// URL or the folder)

    @property
    def n_samples(self) -> int:
        return sum(len(samples) for _, samples in self.shards)

    @property
    def n_bad(self) -> int:
        return sum(b.count for b in self.bad)


def check_split(
    shard_dir: str | Path, split: str, on_bad_sample: str = "error", cache_dir: str | Path | None = None,
    min_side: int = 0,
) -> CheckedSplit:
    """Index every shard of `split` and read each image's header; raise on the first bad sample (error)
    or leave the bad ones out and list them (skip). An s3:// shard set is read from its local cache.
    `min_side` (the training crop): a frame with a side shorter than it is a bad sample (unless the manifest
    declares the whole split smaller: the caller's config check names data.crop then)."""
    if on_bad_sample not in ("error", "skip"):
        raise ConfigError(f"config key 'data.on_bad_sample' must be error or skip, got {on_bad_sample!r}")
    source = str(shard_dir)
    shard_dir = local_shard_dir(source, cache_dir)
    manifest = read_manifest(shard_dir)
    fmt = split_format(manifest, split)
    info = manifest["splits"][split]
    # a split the manifest declares too small as a whole is the caller's config error (data.crop), not a bad
    # sample; otherwise every frame is held to min_side (the declared size may be wrong for one of them)
    declared_small = bool(info.get("height") and info.get("width")) and min(int(info["height"]), int(info["width"])) < min_side
    shards: list[tuple[Path, list[SampleRef]]] = []
    bad: list[BadSample] = []

    def found(problem: BadSample) -> None:
        if on_bad_sample == "error":
            raise DataError(f"bad sample: {problem}; {_FIX}")
        bad.append(problem)

    for path in shard_paths(shard_dir, manifest, split):
        try:
            refs = index_shard(path)
        except DataError as err:
            if on_bad_sample == "error":
                raise DataError(f"bad shard: {err}") from None
            refs, problems = _salvage(path)
            listed = next((s.get("samples") for s in manifest["splits"][split]["shards"]
                           if (shard_dir / s["path"]) == path), None)
            lost = (listed or 0) - len(refs) - sum(1 for b in problems if b.key)
            if lost > 0:
                problems.append(BadSample(path, None, f"{lost} more sample(s) listed in the manifest are lost "
                                                      "to the damage", lost))
            bad.extend(problems)
        good = []
        with open(path, "rb") as fh:
            for ref in refs:
                sizes = []
                for kind in ("blur", "sharp"):
                    member = _image_member(ref.members, kind)
                    if member is None:
                        found(BadSample(path, ref.key, f"no {kind} image member"))
                        break
                    suffix, (offset, length) = member
                    if suffix != f"{kind}.{fmt}":
                        found(BadSample(path, ref.key, f"member {ref.key}.{suffix}, but the split's format is {fmt}"))
                        break
                    fh.seek(offset)
                    head = fh.read(min(length, 4096))
                    try:
                        sizes.append(image_size(head, fmt, length))
                    except AlphaChannelError as err:
                        found(BadSample(path, ref.key, f"{kind} image is {err}"))
                        break
                    except ValueError as err:
                        found(BadSample(path, ref.key, f"{kind} image cannot be decoded ({err})"))
                        break
                else:
                    if sizes[0] != sizes[1]:
                        found(BadSample(path, ref.key, f"blur {sizes[0]} and sharp {sizes[1]} differ in size"))
                    elif not declared_small and min(sizes[0]) < min_side:
                        found(BadSample(path, ref.key, f"frame {sizes[0][1]}x{sizes[0][0]} is smaller than "
                                                       f"the {min_side}x{min_side} training crop (data.crop)"))
                    else:
                        good.append(ref)
        shards.append((path, good))
    checked = CheckedSplit(shard_dir, split, manifest, fmt, shards, bad, source)
    if checked.n_samples == 0:
        raise DataError(f"shard folder {shard_dir}: split {split!r} holds no usable samples ({len(bad)} bad)")
    return checked


class CheckedPairs(ShardPairs):
    """ShardPairs (the PyTorch loader's random access) over the samples a CheckedSplit kept."""

    def __init__(self, checked: CheckedSplit):  # not super().__init__: it would index (and fail on) bad shards
        self.source = checked.source or str(checked.shard_dir)
        self.shard_dir = checked.shard_dir
        self.split = checked.split
        self.manifest = checked.manifest
        self.checked = checked
        self.refs = []
        for path, refs in checked.shards:
            for ref in refs:
                (blur_suffix, blur), (sharp_suffix, sharp) = (_image_member(ref.members, k) for k in ("blur", "sharp"))
                self.refs.append(
                    PairRef(path, ref.key, blur, sharp, blur_suffix.split(".", 1)[1], sharp_suffix.split(".", 1)[1])
                )


def open_pairs(
    shard_dir: str | Path, split: str, on_bad_sample: str = "error", cache_dir: str | Path | None = None,
    min_side: int = 0,
) -> ShardPairs:
    """The PyTorch loader's pairs of a split after the start-up check (bad samples raise or are left out;
    `min_side`: check_split)."""
    checked = check_split(shard_dir, split, on_bad_sample, cache_dir, min_side)
    pairs = CheckedPairs(checked) if checked.bad else ShardPairs(shard_dir, split, cache_dir)
    pairs.checked = checked
    return pairs


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
    return fn.decoders.image(raw, device="mixed" if mixed else "cpu", output_type=types.RGB)


def _window(image, crop: int, flips: bool):
    """One window (top, left) inside `image` and one (hflip, vflip) draw, as DALI nodes."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    shape = fn.cast(image.shape(), dtype=types.INT32)
    u = fn.random.uniform(range=[0.0, 1.0], shape=[2])
    # floor(u * (extent - crop + 1)), kept <= extent - crop: the same law as CropPlan.window
    top = dmath.min(fn.cast(dmath.floor(u[0] * fn.cast(shape[0] - crop + 1, dtype=types.FLOAT)), dtype=types.INT32),
                    shape[0] - crop)
    left = dmath.min(fn.cast(dmath.floor(u[1] * fn.cast(shape[1] - crop + 1, dtype=types.FLOAT)), dtype=types.INT32),
                     shape[1] - crop)
    if flips:
        hflip = fn.random.coin_flip(dtype=types.INT32)
        vflip = fn.random.coin_flip(dtype=types.INT32)
    else:
        hflip = vflip = types.Constant(np.int32(0))
    return fn.stack(top, left), hflip, vflip


def _cut(image, anchor, crop: int, hflip, vflip):
    from nvidia.dali import fn, types

    patch = fn.slice(image, anchor, types.Constant(np.array([crop, crop], dtype=np.int32)),
                     axes=[0, 1], out_of_bounds_policy="error")
    # HWC -> CHW here, in DALI's threads; the float conversion stays in torch (DALI's normalize multiplies
    # by 1/255, which differs from x / 255 in the last bit for some x)
    return fn.transpose(fn.flip(patch, horizontal=hflip, vertical=vflip), perm=[2, 0, 1])


def build_train_pipeline(
    checked: CheckedSplit, *, crop: int, flips: bool, crops_per_frame: int, frames_per_batch: int,
    rank: int, world: int, seed: int, device_id: int | None, num_threads: int, checkpoint: bytes | None = None,
):
    """The training pipeline of one rank. Outputs, per window i < k: blur_i, sharp_i (uint8 CHW crops,
    on the GPU when device_id is set), window_i (int32 [top, left, hflip, vflip]); last the source info."""
    from nvidia.dali import Pipeline, fn

    index = _IndexFiles(checked)
    per_rank = max(1, checked.n_samples // world)
    mixed = device_id is not None and checked.fmt in GPU_DECODABLE
    pipe = Pipeline(
        batch_size=frames_per_batch, num_threads=num_threads, device_id=device_id,
        seed=seed * 1_000_003 + rank, enable_checkpointing=True, checkpoint=checkpoint,
        prefetch_queue_depth=2,
    )
    with pipe:
        blur_raw, sharp_raw = fn.readers.webdataset(
            paths=_paths(checked), index_paths=index.paths, ext=[f"blur.{checked.fmt}", f"sharp.{checked.fmt}"],
            missing_component_behavior="error", shard_id=rank, num_shards=world,
            random_shuffle=True, initial_fill=min(per_rank, 128), name="Reader",
        )
        info = fn.get_property(blur_raw, key="source_info")
        blur, sharp = _decode(blur_raw, checked.fmt, mixed), _decode(sharp_raw, checked.fmt, mixed)
        outputs = []
        for _ in range(crops_per_frame):
            anchor, hflip, vflip = _window(blur, crop, flips)
            pair = [_cut(img, anchor, crop, hflip, vflip) for img in (blur, sharp)]
            if device_id is not None and not mixed:
                pair = [p.gpu() for p in pair]  # the copy to the GPU comes after the crop
            window = fn.cat(anchor, fn.stack(hflip, vflip))
            outputs += [*pair, window]
        pipe.set_outputs(*outputs, info)
    pipe._golf_index = index  # keep the index files alive as long as the pipeline
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


def _into_float(batch, out: torch.Tensor) -> None:
    """A DALI batch of uint8 CHW crops -> `out` (float32, N x 3 x H x W, on the training device) as x / 255,
    in one pass on the CPU (reading DALI's output buffer in place, before the next run reuses it)."""
    from nvidia.dali.backend import TensorListGPU

    if isinstance(batch, TensorListGPU):
        src = _to_torch(batch, out.device)
    else:
        src = torch.from_numpy(np.asarray(batch.as_tensor())).to(out.device, non_blocking=True)
    torch.div(src, 255.0, out=out)  # the same bits as to_tensor's .float().div_(255.0)


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
                _, (offset, size) = _image_member(ref.members, kind)
                data = read_member(path, offset, size)
                try:
                    images.append(formats.decode(data, checked.fmt, f"{where} ({kind})"))
                except DataError as problem:
                    return DataError(f"bad sample: {problem}; {_FIX}")
            if images[0].shape != images[1].shape:
                return DataError(f"bad sample: {where}: blur and sharp differ in size; {_FIX}")
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return DataError(f"the DALI pipeline over {checked.shard_dir} ({checked.split}) failed: {first}")


class DaliTrainLoader:
    """Endless (blur, sharp) batches of `per_device` crops for one rank, on `device`, from DALI.

    One pipeline run makes one optimizer step's crops of this rank (per_device x accum), handed out as
    `accum` micro-batches: gradient accumulation does not change what DALI draws, and a checkpoint (taken
    between steps) falls between two runs.
    """

    kind = "dali"

    def __init__(
        self, checked: CheckedSplit, *, crop: int, flips: bool, crops_per_frame: int, per_device: int,
        rank: int, world: int, seed: int, device: torch.device, num_threads: int, state: str | None = None,
        accum: int = 1,
    ):
        if (per_device * accum) % crops_per_frame:
            raise ConfigError(
                f"config key 'data.crops_per_frame'={crops_per_frame} must divide the crops per step and process, "
                f"{per_device * accum} (data.batch_size / processes)"
            )
        self.checked, self.device = checked, torch.device(device)
        self.k, self.per_device, self.accum = crops_per_frame, per_device, accum
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        device_id = (self.device.index or 0) if self.device.type == "cuda" else None
        self.pipe = build_train_pipeline(
            checked, crop=crop, flips=flips, crops_per_frame=crops_per_frame,
            frames_per_batch=per_device * accum // crops_per_frame, rank=rank, world=world, seed=seed,
            device_id=device_id, num_threads=max(1, num_threads),
            checkpoint=base64.b64decode(state) if state else None,
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
        n = len(out[0])
        blur = torch.empty((n * self.k, *out[0].as_tensor().shape()[1:]), dtype=torch.float32, device=self.device)
        sharp = torch.empty_like(blur)
        for i in range(self.k):  # crop i of every frame, then crop i + 1 ...
            _into_float(out[3 * i], blur[i * n : (i + 1) * n])
            _into_float(out[3 * i + 1], sharp[i * n : (i + 1) * n])
        self._windows = [w for i in range(self.k) for w in np.asarray(out[3 * i + 2].as_array())]
        self._sources = [_source(out[-1].at(j)) for j in range(len(out[-1]))] * self.k
        b = self.per_device
        self._pending = [(blur[m * b : (m + 1) * b], sharp[m * b : (m + 1) * b]) for m in range(self.accum)]
        return self._micro()

    def _micro(self) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.accum - len(self._pending)
        b = self.per_device
        self.last_windows = self._windows[m * b : (m + 1) * b]  # of the crops just returned, for tests
        self.last_sources = self._sources[m * b : (m + 1) * b]
        return self._pending.pop(0)

    def state(self) -> str:
        """The reader's position and the generators' states after the steps returned so far (base64)."""
        if self._pending:
            raise RuntimeError("a DALI reader state is only defined between optimizer steps")
        return base64.b64encode(self.pipe.checkpoint()).decode("ascii")

    def close(self) -> None:
        """Stop the pipeline's threads now (not whenever the garbage collector gets to it)."""
        self.pipe._shutdown()


class TorchTrainLoader:
    """The PyTorch loader (golf_dist.data.loader.train_loader) with the same interface as DaliTrainLoader."""

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

    def state(self) -> None:  # the PyTorch loader's position is a function of the step: nothing to save
        return None

    def close(self) -> None:
        """Stop the worker processes now."""
        shutdown = getattr(self.batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def resolve_loader(choice: str, checked: CheckedSplit | None = None, device: torch.device | None = None) -> tuple[str, str]:
    """('dali' | 'torch', why) for data.loader = auto | dali | torch."""
    if choice not in LOADERS:
        raise ConfigError(f"config key 'data.loader' must be one of {', '.join(LOADERS)}, got {choice!r}")
    if choice == "torch":
        return "torch", "data.loader=torch"
    problem = dali_import_error()
    if problem is None and checked is not None:
        try:  # auto also needs the pipeline to build (e.g. a DALI without the CUDA runtime it was built for)
            build_train_pipeline(checked, crop=1, flips=False, crops_per_frame=1, frames_per_batch=1, rank=0,
                                 world=1, seed=0, num_threads=1,
                                 device_id=(device.index or 0) if device is not None and device.type == "cuda" else None)
        except Exception as err:  # any failure to build is a reason to fall back
            problem = f"its pipeline does not build ({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''})"
    if choice == "dali":
        if problem:
            raise ConfigError(f"config key 'data.loader'=dali, but {problem}; install nvidia-dali-cuda120 or use torch")
        return "dali", "data.loader=dali"
    if problem:
        return "torch", f"data.loader=auto and DALI is not usable: {problem}"
    return "dali", "data.loader=auto and DALI imports and builds"


def make_train_loader(
    cfg, pairs: ShardPairs, *, global_batch: int, accum: int, world: int, rank: int, start_step: int,
    device: torch.device, loader: str, reader_state: str | None = None,
):
    """The training batches of this rank from `start_step`, from the loader `loader` ('dali' or 'torch')."""
    d = cfg.data
    per_device = global_batch // (world * accum)
    if loader == "dali":
        checked = getattr(pairs, "checked", None) or check_split(pairs.shard_dir, pairs.split, d.on_bad_sample)
        return DaliTrainLoader(
            checked, crop=d.crop, flips=d.flips, crops_per_frame=d.crops_per_frame, per_device=per_device,
            accum=accum, rank=rank, world=world, seed=cfg.seed, device=device, num_threads=d.num_workers,
            state=reader_state,
        )
    plan = CropPlan(len(pairs), d.crop, d.flips, cfg.seed, d.crops_per_frame)
    return TorchTrainLoader(
        pairs, plan, d.on_bad_sample == "skip", global_batch=global_batch, accum=accum, world=world, rank=rank,
        start_step=start_step, end_step=cfg.train.steps, num_workers=d.num_workers,
    )


# ---- full frames (evaluation) ---------------------------------------------------------------------


def dali_full_frames(
    checked: CheckedSplit, rank: int, world: int, device: torch.device | str = "cpu", num_threads: int = 1,
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
            paths=_paths(checked), index_paths=index.paths, ext=[f"blur.{checked.fmt}", f"sharp.{checked.fmt}"],
            missing_component_behavior="error", shard_id=rank, num_shards=world, random_shuffle=False,
            pad_last_batch=True, stick_to_shard=True, name="Reader",
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
            raise DataError(f"bad sample: {where}: blur {tuple(b.shape[1:3])} and sharp {tuple(s.shape[1:3])} differ in size")
        yield to_float(b, "NHWC")[0], to_float(s, "NHWC")[0], where.rsplit(" ", 1)[-1]
    del index
