"""The start-up check of a split's shards, for both loaders.

Every shard of the split is checked from its tar headers and the first bytes of each image (format,
size): a truncated tar, a missing member, an image that is no image of the format, an image with alpha
and mismatched blur/sharp sizes are found there. `data.on_bad_sample: error` stops with the shard and
sample key named; `skip` leaves those samples out (DALI reads through index files that list only the good
samples; the PyTorch loader through CheckedPairs) and counts them. An image whose header is fine but
whose data is corrupt is found only when it is decoded: the PyTorch loader then skips it (skip) or names
it (error); DALI cannot skip inside a running pipeline, so it stops and names the sample (both modes).
The validation split's frames (the first val.max_pairs pairs) are decoded at start-up too (decode_first),
so a corrupt one stops the run before its first step (error) or is left out and counted (skip).
"""

from __future__ import annotations

import io
import math
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from golf_dist.data import formats
from golf_dist.data.shard_reader import SampleRef, index_shard, read_manifest, shard_paths, tar_members
from golf_dist.data.shard_reader import split_format as _format
from golf_dist.data.storage import local_shard_dir
from golf_dist.data.torch_loader import PairRef, ShardPairs
from golf_dist.errors import ConfigError, DataError
from golf_dist.log import get_logger

log = get_logger(__name__)

FORMATS = formats.FORMATS  # the image formats a shard split may hold
FIX_BAD_SAMPLES = (
    "make the shards again (python data_prep/shard_gopro.py ... --overwrite), or set data.on_bad_sample=skip"
)


# ---- which format, which members -----------------------------------------------------------------


def split_format(manifest: dict, split: str) -> str:
    """The image format of a split's shards: per split if the manifest says, else its image_format."""
    fmt = _format(manifest, split)
    if fmt not in FORMATS:
        raise DataError(f"split {split!r}: image format {fmt!r} is not one of {', '.join(FORMATS)}")
    return fmt


def image_member(members: dict, kind: str) -> tuple[str, tuple[int, int]] | None:
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
    one, or one of more than formats.MAX_PIXELS pixels. `size`: the member's whole byte size (exact for .npy,
    at most formats.max_member_bytes for an encoded image)."""
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
            raise AlphaChannelError(
                f"an image with an alpha channel ({mode}); shards hold opaque RGB "
                "(data_prep/shard_gopro.py writes them so)"
            )
    if width * height > formats.MAX_PIXELS:
        raise ValueError(
            f"{width}x{height} = {width * height} pixels, more than formats.MAX_PIXELS={formats.MAX_PIXELS}"
        )
    if fmt != "npy" and size is not None and size > formats.max_member_bytes(height, width):
        raise ValueError(  # .npy sizes are exact (above); an encoded image has a generous bound
            f"the member holds {size} bytes, more than the {formats.max_member_bytes(height, width)} a "
            f"{width}x{height} image may take (formats.max_member_bytes): padding or other data appended"
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


def _salvage_listed(path: Path, shard_dir: Path, listed_shards: list[dict]) -> tuple[list[SampleRef], list[BadSample]]:
    """A damaged shard's readable samples (_salvage) and its problems, plus one for the samples the manifest lists
    that the damage lost."""
    refs, problems = _salvage(path)
    listed = next((s.get("samples") for s in listed_shards if (shard_dir / s["path"]) == path), None)
    lost = (listed or 0) - len(refs) - sum(1 for b in problems if b.key)
    if lost > 0:
        problems.append(
            BadSample(path, None, f"{lost} more sample(s) listed in the manifest are lost to the damage", lost)
        )
    return refs, problems


def _sample_problem(fh: BinaryIO, ref: SampleRef, fmt: str, min_side: int) -> str | None:
    """What is wrong with one sample of the open shard `fh` (its image members, their format, headers and sizes,
    a side shorter than `min_side`), or None."""
    sizes = []
    for kind in ("blur", "sharp"):
        member = image_member(ref.members, kind)
        if member is None:
            return f"no {kind} image member"
        suffix, (offset, length) = member
        if suffix != f"{kind}.{fmt}":
            return f"member {ref.key}.{suffix}, but the split's format is {fmt}"
        fh.seek(offset)
        head = fh.read(min(length, 4096))
        try:
            sizes.append(image_size(head, fmt, length))
        except AlphaChannelError as err:
            return f"{kind} image is {err}"
        except ValueError as err:
            return f"{kind} image cannot be decoded ({err})"
    if sizes[0] != sizes[1]:
        return f"blur {sizes[0]} and sharp {sizes[1]} differ in size"
    if min(sizes[0]) < min_side:
        return f"frame {sizes[0][1]}x{sizes[0][0]} is smaller than the {min_side}x{min_side} training crop (data.crop)"
    return None


def check_split(
    shard_dir: str | Path,
    split: str,
    on_bad_sample: str = "error",
    cache_dir: str | Path | None = None,
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
    declared_small = (
        bool(info.get("height") and info.get("width")) and min(int(info["height"]), int(info["width"])) < min_side
    )
    shards: list[tuple[Path, list[SampleRef]]] = []
    bad: list[BadSample] = []

    def found(problem: BadSample) -> None:
        if on_bad_sample == "error":
            raise DataError(f"bad sample: {problem}; {FIX_BAD_SAMPLES}")
        bad.append(problem)

    for path in shard_paths(shard_dir, manifest, split):
        try:
            refs = index_shard(path)
        except DataError as err:
            if on_bad_sample == "error":
                raise DataError(f"bad shard: {err}") from None
            refs, problems = _salvage_listed(path, shard_dir, manifest["splits"][split]["shards"])
            bad.extend(problems)
        good = []
        with open(path, "rb") as fh:
            for ref in refs:
                problem = _sample_problem(fh, ref, fmt, 0 if declared_small else min_side)
                if problem is None:
                    good.append(ref)
                else:
                    found(BadSample(path, ref.key, problem))
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
                (blur_suffix, blur), (sharp_suffix, sharp) = (image_member(ref.members, k) for k in ("blur", "sharp"))
                self.refs.append(
                    PairRef(path, ref.key, blur, sharp, blur_suffix.split(".", 1)[1], sharp_suffix.split(".", 1)[1])
                )


def decode_first(checked: CheckedSplit, count: int, on_bad_sample: str) -> None:
    """Decode the split's pairs in order until `count` of them load (validation's frames: val.max_pairs), so
    that data corrupt behind a good header is found at start-up too: raise naming it (error), or leave it out
    of `checked` and count it (skip; the next pair takes its place)."""
    pairs, broken = CheckedPairs(checked), set()
    loaded = 0
    for index, ref in enumerate(pairs.refs):
        if loaded == count:
            break
        try:
            pairs.load(index)
            loaded += 1
        except DataError as err:
            if on_bad_sample == "error":
                raise DataError(f"bad sample: {err}; {FIX_BAD_SAMPLES}") from None
            where = f"shard {ref.shard} sample {ref.key}"
            checked.bad.append(BadSample(ref.shard, ref.key, str(err).removeprefix(where).lstrip(": ")))
            broken.add((ref.shard, ref.key))
    checked.shards = [(path, [r for r in refs if (path, r.key) not in broken]) for path, refs in checked.shards]
    if broken:
        log.info(
            f"left out {len(broken)} bad {checked.split} sample(s) found by decoding (data.on_bad_sample=skip): "
            + "; ".join(map(str, checked.bad[-len(broken) :][:3]))
        )
    if checked.n_samples == 0:
        raise DataError(
            f"shard folder {checked.shard_dir}: split {checked.split!r} holds no usable samples "
            f"({len(checked.bad)} bad)"
        )


def open_pairs(
    shard_dir: str | Path,
    split: str,
    on_bad_sample: str = "error",
    cache_dir: str | Path | None = None,
    min_side: int = 0,
    decoded: int = 0,
) -> ShardPairs:
    """The PyTorch loader's pairs of a split after the start-up check (bad samples raise or are left out;
    `min_side`: check_split); `decoded`: the first that many pairs are also decoded (decode_first)."""
    checked = check_split(shard_dir, split, on_bad_sample, cache_dir, min_side)
    if decoded:
        decode_first(checked, decoded, on_bad_sample)
    pairs = CheckedPairs(checked) if checked.bad else ShardPairs(shard_dir, split, cache_dir)
    pairs.checked = checked
    return pairs


def check_crop_fits(crop: int, *splits: ShardPairs) -> None:
    """Config key data.crop against the frame size of each split: a ConfigError naming the key and the split."""
    for pairs in splits:
        size = pairs.frame_size
        if size is not None and min(size) < crop:
            raise ConfigError(
                f"config key 'data.crop'={crop} is larger than the {size[0]}x{size[1]} frames of "
                f"split '{pairs.split}' in {pairs.shard_dir}"
            )
