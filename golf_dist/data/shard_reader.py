"""The read side of a shard set, below everything that reads or writes one: the manifest (parsed and
checked), the tar index of a shard (where each sample's members lie), the DALI index text, and the
paths of a split's shards and indexes. Training, the loaders, the S3 cache and the offline writer and
verifier all read shards through this module; it imports no other part of golf_dist.data but formats.

Layout of a shard set (written by golf_dist.data.prep.sharding): `OUT/{split}/{split}-{i:06d}.tar`, beside
each its DALI index `{split}-{i:06d}.idx`, and `OUT/manifest.json` (last). A sample is
`{scene}-{frame}.blur.{ext}`, `.sharp.{ext}` and `.json` (where it came from and its size), ext the
split's image format (golf_dist.data.formats).
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from golf_dist.data.formats import FORMATS
from golf_dist.errors import DataError

FORMAT_VERSION = 1
SPLITS = ("train", "test")
MANIFEST = "manifest.json"
PARTS_DIR = "parts"
DALI_INDEX_VERSION = "v1.2"  # the index format of DALI's wds2idx and fn.readers.webdataset(index_paths=...)
HOW_TO_MAKE_SHARDS = (
    "make them with: python data_prep/shard_gopro.py --src GOPRO_Large --out SHARD_DIR (without "
    "the GoPro download, python data_prep/synth_gopro.py --out GOPRO_Large makes a synthetic set "
    "to shard; bash launch/quickstart.sh makes the demo config's)"
)
# WebDataset's own key/suffix split: the key is the member path up to the first dot of its file name.
_KEY_SUFFIX = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


@dataclass(frozen=True)
class SampleRef:
    """Where one sample's members lie in a shard: suffix ("blur.png", "sharp.png", "json") -> (offset, size)."""

    key: str
    members: dict[str, tuple[int, int]]


def read_member(path: str | Path, offset: int, size: int) -> bytes:
    """The `size` bytes at `offset` of a shard (a member's data, as given by index_shard)."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise DataError(f"{path} ends before byte {offset + size}: the shard is truncated; make the shards again")
    return data


@dataclass(frozen=True)
class TarMember:
    """One file member of a shard, from its tar header: key and suffix split as WebDataset does (None for
    a member with no suffix), where its data lies, and whether the file holds all of it."""

    name: str
    key: str | None
    suffix: str | None
    offset: int
    size: int
    whole: bool


def tar_members(tar: tarfile.TarFile, file_size: int) -> Iterator[TarMember]:
    """The file members of an open shard in tar order, from the headers alone: the one walk of a shard that
    index_shard (strict) and the DALI start-up check (salvaging what it can) share. A damaged header raises
    tarfile.TarError from here, with tar.offset at the damage."""
    for info in iter(tar.next, None):
        if not info.isfile():
            continue
        match = _KEY_SUFFIX.match(info.name)
        key, suffix = match.groups() if match else (None, None)
        yield TarMember(info.name, key, suffix, info.offset_data, info.size, info.offset_data + info.size <= file_size)


def index_shard(path: str | Path) -> list[SampleRef]:
    """One SampleRef per sample, in tar order, from the tar headers alone (no member data is read)."""
    path = Path(path)
    fix = "make the shards again (python data_prep/shard_gopro.py ... --overwrite)"
    samples: list[SampleRef] = []
    seen: set[str] = set()
    try:
        file_size = path.stat().st_size
        with tarfile.open(path, mode="r:") as tar:
            for member in tar_members(tar, file_size):
                if not member.whole:
                    raise DataError(f"{path} is truncated inside member {member.name}: {fix}")
                if member.key is None:
                    raise DataError(f"{path}: member {member.name} has no suffix, so it belongs to no sample: {fix}")
                key, suffix = member.key, member.suffix
                if not samples or samples[-1].key != key:
                    if key in seen:
                        raise DataError(f"{path}: sample {key} appears twice, its members are not together: {fix}")
                    seen.add(key)
                    samples.append(SampleRef(key, {}))
                if suffix in samples[-1].members:
                    raise DataError(f"{path}: sample {key} has two {suffix} members: {fix}")
                samples[-1].members[suffix] = (member.offset, member.size)
            end = tar.offset
        # tarfile stops quietly at a header cut short; a whole archive ends with two zero blocks.
        with open(path, "rb") as f:
            f.seek(end)
            tail = f.read(1024)
    except (tarfile.TarError, OSError) as err:
        raise DataError(f"{path} is not a readable tar shard ({err}): {fix}") from None
    if len(tail) < 1024 or tail.count(0) != len(tail):
        raise DataError(f"{path} is truncated or corrupt after byte {end} (no end-of-archive marker): {fix}")
    for sample in samples:
        for kind in ("blur", "sharp"):
            if not any(suffix.startswith(f"{kind}.") for suffix in sample.members):
                raise DataError(
                    f"{path}: sample {sample.key} has no {kind} image member ({kind}.png, .jp2 or .npy): {fix}"
                )
    return samples


def dali_index(refs: list[SampleRef]) -> bytes:
    """The DALI index of a shard (what wds2idx writes): `v1.2 <samples>`, then per sample, in tar order,
    `<ext> <data offset> <size> <member name>` for each member, all on one line."""
    lines = [f"{DALI_INDEX_VERSION} {len(refs)}"]
    for ref in refs:
        lines.append(" ".join(f"{ext} {offset} {size} {ref.key}.{ext}" for ext, (offset, size) in ref.members.items()))
    return ("\n".join(lines) + "\n").encode()


def index_path(shard: str | Path) -> Path:
    """The DALI index file beside a shard: train/train-000000.tar -> train/train-000000.idx."""
    return Path(shard).with_suffix(".idx")


# ---------------------------------------------------------------- the manifest


def _manifest_relpath(value: str, splits, ext: str) -> bool:
    """Whether a listed path has the shape the sharder writes: `<split>/<name><ext>`, relative, POSIX, and
    nothing else (no '..', no absolute path, no backslash, no empty part): a manifest read from S3 must
    not choose where the cache writes."""
    parts = value.split("/")
    return (
        len(parts) == 2
        and parts[0] in splits
        and parts[1].endswith(ext)
        and len(parts[1]) > len(ext)
        and all(part not in ("", ".", "..") for part in parts)
        and not any(c in value for c in "\\\0")
        and not value.startswith("/")
    )


def parse_manifest(data: bytes, where: str) -> dict:
    """A manifest's bytes, checked for its keys, their types and the shape of every listed path (not for
    the files it lists); every problem is a DataError naming `where` and the field."""
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise DataError(f"{where} is not readable JSON ({err}): {HOW_TO_MAKE_SHARDS}") from None
    bad = f"{where} is not a shard manifest of format_version {FORMAT_VERSION}"

    def need(obj, keys, at):
        if not isinstance(obj, dict):
            raise DataError(f"{bad}: {at} is not an object; {HOW_TO_MAKE_SHARDS}")
        missing = [k for k in keys if k not in obj]
        if missing:
            raise DataError(f"{bad}: {at} lacks {', '.join(missing)}; {HOW_TO_MAKE_SHARDS}")

    def typed(obj, key, at, kind, nullable=False):
        value = obj[key]
        if value is None and nullable:
            return
        if kind == "count":  # JSON true/false are Python ints: not counts
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
            what = "a whole number >= 0"
        else:
            ok = isinstance(value, kind)
            what = {str: "a string", list: "a list", dict: "an object"}[kind]
        if not ok:
            what += " or null" if nullable else ""
            raise DataError(f"{bad}: {at}{key} is {json.dumps(value)[:80]}, not {what}; {HOW_TO_MAKE_SHARDS}")

    def listed_file(obj, at, ext, splits):
        for key in ("path", "sha256"):
            typed(obj, key, at, str)
        typed(obj, "bytes", at, "count")
        if not _manifest_relpath(obj["path"], splits, ext):
            raise DataError(
                f"{bad}: {at}path {obj['path']!r} is not <split>/<name>{ext} under the shard folder "
                f"(split one of {', '.join(splits)}); refusing it; {HOW_TO_MAKE_SHARDS}"
            )

    need(manifest, ("format_version", "image_format", "blur_dir", "seed", "maxcount", "splits"), "the top level")
    if manifest["format_version"] != FORMAT_VERSION or isinstance(manifest["format_version"], bool):
        raise DataError(f"{bad} (it says {manifest['format_version']!r}): {HOW_TO_MAKE_SHARDS}")
    for key in ("image_format", "blur_dir"):
        typed(manifest, key, "", str)
    for key in ("seed", "maxcount"):
        typed(manifest, key, "", "count")
    need(manifest["splits"], (), "splits")
    splits = list(manifest["splits"])
    for split, info in manifest["splits"].items():
        at = f"splits.{split}."
        need(info, ("pairs", "height", "width", "shards"), f"splits.{split}")
        typed(info, "pairs", at, "count")
        for key in ("height", "width"):
            typed(info, key, at, "count", nullable=True)
        typed(info, "shards", at, list)
        if "image_format" in info:
            typed(info, "image_format", at, str)
        fmt = info.get("image_format", manifest["image_format"])
        if fmt not in FORMATS:
            raise DataError(f"{bad}: splits.{split}.image_format is {fmt!r}, not one of {', '.join(FORMATS)}")
        for i, shard in enumerate(info["shards"]):
            need(shard, ("path", "samples", "bytes", "sha256"), f"splits.{split}.shards[{i}]")
            listed_file(shard, f"{at}shards[{i}].", ".tar", splits)
            typed(shard, "samples", f"{at}shards[{i}].", "count")
            if "index" in shard:
                need(shard["index"], ("path", "bytes", "sha256"), f"splits.{split}.shards[{i}].index")
                listed_file(shard["index"], f"{at}shards[{i}].index.", ".idx", splits)
    return manifest


def read_manifest(shard_dir: str | Path) -> dict:
    """The shard folder's manifest.json, checked: its keys, and that every shard it lists exists."""
    shard_dir = Path(shard_dir)
    path = shard_dir / MANIFEST
    if not shard_dir.is_dir():
        raise DataError(f"shard folder {shard_dir} does not exist: {HOW_TO_MAKE_SHARDS}")
    if not path.is_file():
        raise DataError(f"{path} is missing (an unfinished or foreign shard folder): {HOW_TO_MAKE_SHARDS}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path} is not readable JSON ({err}): {HOW_TO_MAKE_SHARDS}") from None
    manifest = parse_manifest(data, str(path))
    for info in manifest["splits"].values():
        for shard in info["shards"]:
            for listed in (shard, shard.get("index")):
                if listed and not (shard_dir / listed["path"]).is_file():
                    raise DataError(
                        f"{shard_dir / listed['path']} is listed in {path} but missing: "
                        f"run shard_gopro.py again with the same arguments to finish the folder"
                    )
    return manifest


def split_format(manifest: dict, split: str) -> str:
    """The image format of one split's members (manifests from before per-split formats: the top level's)."""
    info = manifest["splits"].get(split, {})
    return info.get("image_format", manifest.get("image_format", "png"))


def shard_paths(shard_dir: str | Path, manifest: dict, split: str) -> list[Path]:
    """The shard files of one split, in manifest order."""
    info = manifest["splits"].get(split)
    if not info or not info["pairs"] or not info["shards"]:
        listed = ", ".join(sorted(manifest["splits"])) or "none"
        raise DataError(
            f"split {split!r} has no samples in {Path(shard_dir) / MANIFEST} (splits there: {listed}): "
            f"make the shards with --splits including {split}"
        )
    return [Path(shard_dir) / shard["path"] for shard in info["shards"]]


def index_paths(shard_dir: str | Path, manifest: dict, split: str) -> list[Path] | None:
    """The DALI index files of one split, in shard order; None when the manifest lists none (shards
    made before index files existed: DALI then infers the index from the tars, slowly)."""
    shard_paths(shard_dir, manifest, split)  # the same error for an empty or unknown split
    shards = manifest["splits"][split]["shards"]
    if not all("index" in shard for shard in shards):
        return None
    return [Path(shard_dir) / shard["index"]["path"] for shard in shards]
