"""GoPro pairs as WebDataset tar shards plus DALI index files and a manifest: writing them (to a folder
or to S3), verifying them, and the read-side helpers.

Layout written: `OUT/{split}/{split}-{i:06d}.tar`, beside each its DALI index `{split}-{i:06d}.idx`,
and `OUT/manifest.json` (last). A sample is `{scene}-{frame}.blur.{ext}`, `.sharp.{ext}` and `.json`
(where it came from and its size), ext the split's image format (golf_dist.data.formats: png keeps
the source bytes, jp2 and npy re-encode them losslessly). Shards, indexes and manifest are
byte-for-byte reproducible from the same input and arguments, each appears whole or not at all
(temporary name, fsync, rename; one PUT per object on S3), and an interrupted run is finished by
running it again. `--num-parts N --part I` writes one N-th of the shards (a SLURM array task) plus a
part record under OUT/parts/; `--merge` then writes the manifest once every part is there.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from tqdm import tqdm

from golf_dist.data import storage
from golf_dist.data.formats import FORMATS, decode, encode
from golf_dist.data.gopro import HOW_TO_GET_GOPRO, Pair, check_pair, scan_gopro
from golf_dist.errors import ConfigError, DataError, raise_if_storage_full

FORMAT_VERSION = 1
SPLITS = ("train", "test")
MANIFEST = "manifest.json"
PARTS_DIR = "parts"
DALI_INDEX_VERSION = "v1.2"  # the index format of DALI's wds2idx and fn.readers.webdataset(index_paths=...)
HOW_TO_MAKE_SHARDS = "make them with: python data_prep/shard_gopro.py --src GOPRO_Large --out SHARD_DIR"
# WebDataset's own key/suffix split: the key is the member path up to the first dot of its file name.
_KEY_SUFFIX = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


@dataclass(frozen=True)
class SampleRef:
    """Where one sample's members lie in a shard: suffix ("blur.png", "sharp.png", "json") -> (offset, size)."""

    key: str
    members: dict[str, tuple[int, int]]


@dataclass(frozen=True)
class ShardResult:
    """What shard_gopro did: the manifest (or part record) it wrote, where, and shards written or reused."""

    manifest: dict
    manifest_path: str
    written: int
    reused: int
    part: int | None = None


@dataclass
class VerifyResult:
    """What --verify found: files checked, their bytes, and one line per missing/truncated/changed file."""

    where: str
    checked: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_member(path: str | Path, offset: int, size: int) -> bytes:
    """The `size` bytes at `offset` of a shard (a member's data, as given by index_shard)."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise DataError(f"{path} ends before byte {offset + size}: the shard is truncated; make the shards again")
    return data


def index_shard(path: str | Path) -> list[SampleRef]:
    """One SampleRef per sample, in tar order, from the tar headers alone (no member data is read)."""
    path = Path(path)
    fix = "make the shards again (python data_prep/shard_gopro.py ... --overwrite)"
    samples: list[SampleRef] = []
    seen: set[str] = set()
    try:
        file_size = path.stat().st_size
        with tarfile.open(path, mode="r:") as tar:
            for info in iter(tar.next, None):
                if not info.isfile():
                    continue
                if info.offset_data + info.size > file_size:
                    raise DataError(f"{path} is truncated inside member {info.name}: {fix}")
                match = _KEY_SUFFIX.match(info.name)
                if match is None:
                    raise DataError(f"{path}: member {info.name} has no suffix, so it belongs to no sample: {fix}")
                key, suffix = match.groups()
                if not samples or samples[-1].key != key:
                    if key in seen:
                        raise DataError(f"{path}: sample {key} appears twice, its members are not together: {fix}")
                    seen.add(key)
                    samples.append(SampleRef(key, {}))
                if suffix in samples[-1].members:
                    raise DataError(f"{path}: sample {key} has two {suffix} members: {fix}")
                samples[-1].members[suffix] = (info.offset_data, info.size)
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


# ---------------------------------------------------------------- planning


def _map(fn, items: list, workers: int, progress: bool, **bar) -> list:
    """fn over items in `workers` processes (inline for one), results in input order, with a progress bar.

    In input order also means the first failing item raises, whatever the scheduling.
    """
    with tqdm(total=len(items), disable=not progress, **bar) as pbar:
        if workers == 1 or len(items) < 2:
            results = []
            for item in items:
                results.append(fn(item))
                pbar.update()
            return results
        pool = ProcessPoolExecutor(min(workers, len(items)))
        try:
            results = []
            for result in pool.map(fn, items, chunksize=max(1, min(32, len(items) // (4 * workers)))):
                results.append(result)
                pbar.update()
            return results
        finally:
            pool.shutdown(cancel_futures=True)  # on an error, do not wait for the rest of the work


@lru_cache(maxsize=16)
def _npy_size(height: int, width: int) -> int:
    return len(encode(np.zeros((height, width, 3), np.uint8), "npy"))


@dataclass(frozen=True)
class _Sample:
    key: str
    blur_path: Path
    sharp_path: Path
    info: bytes  # the .json member
    height: int
    width: int

    def members(self, fmt: str) -> list[tuple[str, int | None]]:
        """Planned (member name, size) in tar order; a jp2 size is known only once encoded (None)."""
        if fmt == "png":
            sizes = (self.blur_path.stat().st_size, self.sharp_path.stat().st_size)
        elif fmt == "npy":
            sizes = (_npy_size(self.height, self.width),) * 2
        else:
            sizes = (None, None)
        return [
            (f"{self.key}.blur.{fmt}", sizes[0]),
            (f"{self.key}.sharp.{fmt}", sizes[1]),
            (f"{self.key}.json", len(self.info)),
        ]

    def datas(self, fmt: str) -> tuple[bytes, bytes, bytes]:
        images = []
        for path in (self.blur_path, self.sharp_path):
            data = path.read_bytes()
            if fmt != "png":  # re-encode the decoded RGB pixels losslessly
                data = encode(decode(data, "png", str(path)), fmt)
            images.append(data)
        return images[0], images[1], self.info


@dataclass(frozen=True)
class _ShardPlan:
    """A shard before its pairs are checked: name, split, format and (key, pair) in tar order."""

    relpath: str
    split: str
    fmt: str
    items: tuple[tuple[str, Pair], ...]


@dataclass(frozen=True)
class _Shard:
    relpath: str  # relative to the shard folder, with forward slashes
    split: str
    fmt: str
    samples: tuple[_Sample, ...]

    @property
    def index_relpath(self) -> str:
        return self.relpath[: -len(".tar")] + ".idx"

    def fingerprint(self) -> str:
        """What the shard must hold (names, known sizes, .json bytes): kept with an uploaded object so a
        rerun can tell a finished upload of this plan from one of another plan without downloading it."""
        planned = [[m for s in self.samples for m in s.members(self.fmt)], [s.info.decode() for s in self.samples]]
        return hashlib.sha256(json.dumps([self.relpath, self.fmt, planned]).encode()).hexdigest()


def _plan_split(pairs: list[Pair], split: str, fmt: str, maxcount: int, seed: int) -> list[_ShardPlan]:
    order = np.random.default_rng(seed).permutation(len(pairs)) if split == "train" else range(len(pairs))
    items, keys = [], set()
    for i in order:
        pair = pairs[i]
        if "." in pair.scene or "." in pair.frame:
            raise DataError(
                f"{pair.blur_path}: a dot in the scene or frame name would split the WebDataset key; rename it"
            )
        if any(c.isspace() for c in pair.scene + pair.frame):
            raise DataError(f"{pair.blur_path}: white space in the scene or frame name breaks DALI's index; rename it")
        key = f"{pair.scene}-{pair.frame}"
        if key in keys:
            raise DataError(f"{pair.blur_path}: sample key {key} is not unique in {split}; rename the scene or frame")
        keys.add(key)
        items.append((key, pair))
    return [
        _ShardPlan(f"{split}/{split}-{n:06d}.tar", split, fmt, tuple(items[start : start + maxcount]))
        for n, start in enumerate(range(0, len(items), maxcount))
    ]


def _fill(src: Path, plan: _ShardPlan, sizes: dict[Pair, tuple[int, int]], blur_dir: str) -> _Shard:
    samples = []
    for key, pair in plan.items:
        height, width = sizes[pair]
        info = {
            "scene": pair.scene,
            "frame": pair.frame,
            "split": plan.split,
            "blur_dir": blur_dir,
            "height": height,
            "width": width,
            "blur_src": pair.blur_path.relative_to(src).as_posix(),
            "sharp_src": pair.sharp_path.relative_to(src).as_posix(),
        }
        info_bytes = json.dumps(info, sort_keys=True, separators=(",", ":")).encode()
        samples.append(_Sample(key, pair.blur_path, pair.sharp_path, info_bytes, height, width))
    return _Shard(plan.relpath, plan.split, plan.fmt, tuple(samples))


def _matches_plan(path: Path, shard: _Shard) -> bool:
    """Whether an existing shard holds exactly the planned members (names, sizes and .json bytes)."""
    refs = index_shard(path)
    found = [(f"{r.key}.{s}", size) for r in refs for s, (_, size) in r.members.items()]
    planned = [m for sample in shard.samples for m in sample.members(shard.fmt)]
    if len(found) != len(planned) or any(
        name != p_name or (p_size is not None and size != p_size) for (name, size), (p_name, p_size) in zip(found, planned)
    ):
        return False
    return all(read_member(path, *ref.members["json"]) == s.info for ref, s in zip(refs, shard.samples))


def _write_files(folder: Path, shard: _Shard) -> None:
    """Write one shard, then its DALI index, each to a temporary name, fsync, rename: whole or not at all."""
    path = folder / shard.relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = storage.tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:
                for sample in shard.samples:
                    names = [name for name, _ in sample.members(shard.fmt)]
                    for name, data in zip(names, sample.datas(shard.fmt)):
                        info = tarfile.TarInfo(name)
                        info.size, info.mtime, info.mode = len(data), 0, 0o444
                        info.uid = info.gid = 0
                        info.uname = info.gname = ""
                        tar.addfile(info, io.BytesIO(data))
            f.flush()
            os.fsync(f.fileno())
        index = dali_index(index_shard(tmp))
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        raise_if_storage_full(err, path)
        raise
    storage.write_atomic(folder / shard.index_relpath, index)


def _file_entry(relpath: str, path: Path) -> dict:
    return {"path": relpath, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _entry(folder: Path, shard: _Shard) -> dict:
    entry = _file_entry(shard.relpath, folder / shard.relpath)
    entry["samples"] = len(shard.samples)
    entry["index"] = _file_entry(shard.index_relpath, folder / shard.index_relpath)
    return entry


# ---------------------------------------------------------------- where shards go: a folder or S3


@dataclass(frozen=True)
class _LocalTarget:
    out: Path

    def describe(self, relpath: str = "") -> str:
        return str(self.out / relpath) if relpath else str(self.out)

    def open(self) -> None:
        if self.out.exists() and not self.out.is_dir():
            raise DataError(f"{self.out} exists and is not a folder: choose another --out")

    def existing(self, split: str) -> list[str]:
        folder = self.out / split
        if not folder.is_dir():
            return []
        return sorted(f"{split}/{p.name}" for p in folder.iterdir() if p.suffix in (".tar", ".idx") and p.is_file())

    def read(self, relpath: str) -> bytes | None:
        path = self.out / relpath
        return path.read_bytes() if path.is_file() else None

    def write(self, relpath: str, data: bytes) -> None:
        path = self.out / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        storage.write_atomic(path, data)

    def delete(self, relpath: str) -> None:
        (self.out / relpath).unlink(missing_ok=True)

    def size(self, relpath: str) -> int | None:
        path = self.out / relpath
        return path.stat().st_size if path.is_file() else None

    def matches(self, shard: _Shard) -> bool:
        return _matches_plan(self.out / shard.relpath, shard)

    def complete(self, shard: _Shard) -> bool:
        return True  # a lost or stale index is rewritten from its shard (cheap: tar headers only)

    def clean_tmp(self, relpaths: list[str]) -> None:
        """Remove what killed runs left under temporary names (only for files this run owns)."""
        for relpath in relpaths:
            path = self.out / relpath
            for stale in path.parent.glob(f"{glob_escape(path.name)}.tmp-*") if path.parent.is_dir() else ():
                stale.unlink(missing_ok=True)

    def job(self, shard: _Shard, reuse: bool) -> dict:
        if not reuse:
            _write_files(self.out, shard)
        else:  # a finished shard: its index may have been lost to a kill between the two renames
            index = dali_index(index_shard(self.out / shard.relpath))
            if self.read(shard.index_relpath) != index:
                storage.write_atomic(self.out / shard.index_relpath, index)
        return _entry(self.out, shard)

    def close(self) -> None:
        pass


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


@dataclass(frozen=True)
class _S3Target:
    url: str
    stage: Path | None  # local staging folder for shards on their way up (None: this run writes none)

    @property
    def bucket(self) -> str:
        return storage.split_s3_url(self.url)[0]

    @property
    def prefix(self) -> str:
        return storage.split_s3_url(self.url)[1]

    def key(self, relpath: str) -> str:
        return storage.s3_key(self.prefix, relpath)

    def describe(self, relpath: str = "") -> str:
        return storage.s3_url(self.bucket, self.key(relpath)) if relpath else self.url

    def open(self) -> None:
        storage.check_bucket(self.bucket)

    def existing(self, split: str) -> list[str]:
        start = len(self.key(""))
        keys = storage.list_keys(self.bucket, self.key(split))
        return sorted(k[start:] for k in keys if k.endswith((".tar", ".idx")) and "/" not in k[len(self.key(split)) + 1 :])

    def read(self, relpath: str) -> bytes | None:
        return storage.get_bytes(self.bucket, self.key(relpath))

    def write(self, relpath: str, data: bytes) -> None:
        storage.put_bytes(data, self.bucket, self.key(relpath))

    def delete(self, relpath: str) -> None:
        storage.delete(self.bucket, self.key(relpath))

    def size(self, relpath: str) -> int | None:
        head = storage.head(self.bucket, self.key(relpath))
        return None if head is None else head["ContentLength"]

    def _uploaded(self, relpath: str, plan: str) -> dict | None:
        """The entry of an object uploaded whole by a run of this plan, else None."""
        head = storage.head(self.bucket, self.key(relpath))
        if head is None:
            return None
        meta = head.get("Metadata", {})
        if meta.get("golf-plan") != plan or meta.get("bytes") != str(head["ContentLength"]) or "sha256" not in meta:
            return None
        return {"path": relpath, "bytes": head["ContentLength"], "sha256": meta["sha256"]}

    def matches(self, shard: _Shard) -> bool:
        head = storage.head(self.bucket, self.key(shard.relpath))
        return head is not None and head.get("Metadata", {}).get("golf-plan") == shard.fingerprint()

    def complete(self, shard: _Shard) -> bool:
        """Both the shard and its index are up, whole, from this plan (else both are made and sent again)."""
        plan = shard.fingerprint()
        return all(self._uploaded(r, plan) is not None for r in (shard.relpath, shard.index_relpath))

    def clean_tmp(self, relpaths: list[str]) -> None:
        pass  # S3 has no partial objects; the staging folder is this run's own

    def job(self, shard: _Shard, reuse: bool) -> dict:
        plan = shard.fingerprint()
        tar = self._uploaded(shard.relpath, plan) if reuse else None
        idx = self._uploaded(shard.index_relpath, plan) if reuse else None
        if tar is None or idx is None:
            _write_files(self.stage, shard)
            try:
                for relpath in (shard.relpath, shard.index_relpath):  # the index after its shard
                    path = self.stage / relpath
                    entry = _file_entry(relpath, path)
                    self._upload(path, relpath, entry["sha256"], plan)
                    if relpath == shard.relpath:
                        tar = entry
                    else:
                        idx = entry
            finally:
                for relpath in (shard.relpath, shard.index_relpath):
                    (self.stage / relpath).unlink(missing_ok=True)
        return {**tar, "samples": len(shard.samples), "index": idx}

    def _upload(self, path: Path, relpath: str, sha: str, plan: str) -> None:
        storage.upload_file(path, self.bucket, self.key(relpath), sha, extra={"golf-plan": plan})

    def close(self) -> None:
        if self.stage is not None:
            shutil.rmtree(self.stage, ignore_errors=True)


def _target(out: str | Path, stage: bool = True):
    if storage.is_s3_url(str(out)):
        url = str(out).rstrip("/")
        storage.split_s3_url(url)
        return _S3Target(url, Path(tempfile.mkdtemp(prefix="golf-shards-stage-")) if stage else None)
    return _LocalTarget(Path(out))


# ---------------------------------------------------------------- writing


def _check_existing(
    target, planned: dict[str, _ShardPlan], mine: dict[str, _Shard], splits, params: dict, overwrite: bool, whole: bool
) -> set[str]:
    """Shards this run owns that are already there and equal the plan (to reuse); anything from another
    plan is an error unless `overwrite` (then it is removed). Other parts' shards are left alone."""
    redo = "pass --overwrite to replace the shards there, or choose another --out"
    reusable: set[str] = set()
    for split in splits:
        for relpath in target.existing(split):
            tar_rel = relpath[: -len(".idx")] + ".tar" if relpath.endswith(".idx") else relpath
            if tar_rel in planned and tar_rel not in mine:
                continue  # another part's
            if tar_rel not in planned:
                if overwrite:
                    target.delete(relpath)
                    continue
                raise DataError(
                    f"{target.describe(relpath)} is not part of this run's plan (another source, seed, "
                    f"--maxcount or --format wrote it): {redo}"
                )
            if relpath.endswith(".idx"):
                continue  # judged with its shard; rewritten from it when needed
            if target.matches(mine[tar_rel]):
                if target.complete(mine[tar_rel]):
                    reusable.add(tar_rel)
            elif overwrite:
                target.delete(relpath)
            else:
                raise DataError(
                    f"{target.describe(relpath)} was written from another source, seed, --maxcount, --blur-dir or "
                    f"--format than this run: {redo}"
                )
    old_data = target.read(MANIFEST)
    if old_data is not None:
        if overwrite:
            if whole:
                target.delete(MANIFEST)
            return reusable
        try:
            old = json.loads(old_data)
            differs = [k for k, v in params.items() if k != "splits" and old.get(k) != v]
            for split in splits:
                if split in old.get("splits", {}):
                    info = old["splits"][split]
                    listed = [(s["path"], s["samples"]) for s in info["shards"]]
                    wanted = [(p.relpath, len(p.items)) for p in planned.values() if p.split == split]
                    if listed != wanted:
                        differs.append(f"splits.{split}.shards")
                    if info.get("image_format", old.get("image_format")) != params["splits"][split]:
                        differs.append(f"splits.{split}.image_format")
        except (ValueError, TypeError, KeyError, AttributeError):
            differs = ["(unreadable)"]
        if differs:
            raise DataError(f"{target.describe(MANIFEST)} describes another plan ({', '.join(differs)} differ): {redo}")
    return reusable


def _job(job) -> dict:
    target, shard, reuse = job
    return target.job(shard, reuse)


def part_relpath(part: int, num_parts: int) -> str:
    return f"{PARTS_DIR}/part-{part:05d}-of-{num_parts:05d}.json"


def _dump(obj: dict) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=2) + "\n").encode()


def _build_manifest(params: dict, pairs: dict, frame_sizes: dict, entries: dict, plans: dict, splits) -> dict:
    manifest = {k: v for k, v in params.items() if k != "splits"}
    manifest["splits"] = {}
    for split in splits:
        sizes = {tuple(s) for s in frame_sizes[split]}
        height, width = sizes.pop() if len(sizes) == 1 else (None, None)
        manifest["splits"][split] = {
            "pairs": len(pairs[split]),
            "height": height,
            "width": width,
            "image_format": params["splits"][split],
            "shards": [entries[p.relpath] for p in plans[split]],
        }
    return manifest


def _validate(splits, maxcount, workers, seed, image_format, test_format, num_parts, part) -> None:
    if not splits or len(set(splits)) != len(splits) or any(s not in SPLITS for s in splits):
        raise ConfigError(f"--splits must be a comma-separated subset of {','.join(SPLITS)}, got {','.join(splits)}")
    for flag, value, low in (
        ("--maxcount", maxcount, 1), ("--workers", workers, 1), ("--seed", seed, 0), ("--num-parts", num_parts, 1)
    ):
        if value < low:
            raise ConfigError(f"{flag} must be at least {low}, got {value}")
    for flag, value in (("--format", image_format), ("--test-format", test_format)):
        if value not in FORMATS:
            raise ConfigError(f"{flag} must be one of {', '.join(FORMATS)}, got {value!r}")
    if part is not None and not 0 <= part < num_parts:
        raise ConfigError(f"--part must be in 0..{num_parts - 1} (--num-parts {num_parts}), got {part}")


def _plan(src: Path, splits, blur_dir, maxcount, seed, image_format, test_format):
    if not src.is_dir():
        raise DataError(f"GoPro folder {src} does not exist; {HOW_TO_GET_GOPRO}")
    formats = {split: (test_format if split == "test" else image_format) for split in splits}
    pairs = {split: scan_gopro(src, split, blur_dir) for split in splits}
    plans = {split: _plan_split(pairs[split], split, formats[split], maxcount, seed) for split in splits}
    params = dict(
        format_version=FORMAT_VERSION, image_format=image_format, blur_dir=blur_dir, seed=seed, maxcount=maxcount,
        splits=formats,
    )
    return pairs, plans, params


def shard_gopro(
    src: str | Path,
    out: str | Path,
    *,
    splits: tuple[str, ...] = SPLITS,
    blur_dir: str = "blur",
    maxcount: int = 64,
    workers: int | None = None,
    seed: int = 0,
    image_format: str = "png",
    test_format: str | None = None,
    num_parts: int = 1,
    part: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ShardResult:
    """Validate the pairs of `src` (GOPRO_Large layout), then write the shards and, last, the manifest
    (or, with `part`, only the shards whose global index % num_parts == part and a part record).

    `out` is a folder or s3://bucket/prefix. Nothing is written until the input this run packs has
    been read and checked. Shards already in `out` from the same plan are kept (an interrupted run
    finishes where it stopped); shards or a manifest from another plan are an error unless `overwrite`.
    """
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    test_format = test_format or image_format
    _validate(splits, maxcount, workers, seed, image_format, test_format, num_parts, part)
    src = Path(src)
    pairs, plans, params = _plan(src, splits, blur_dir, maxcount, seed, image_format, test_format)
    flat = [p for split in splits for p in plans[split]]
    mine_plans = [p for i, p in enumerate(flat) if part is None or i % num_parts == part]

    to_check = [pair for p in mine_plans for _, pair in p.items]
    checked = _map(check_pair, to_check, workers, progress, desc="checking pairs", unit="pair")
    sizes = dict(zip(to_check, checked))
    mine = {p.relpath: _fill(src, p, sizes, blur_dir) for p in mine_plans}

    target = _target(out)
    try:
        target.open()
        planned = {p.relpath: p for p in flat}
        reusable = _check_existing(target, planned, mine, splits, params, overwrite, whole=part is None)
        owned = [r for s in mine.values() for r in (s.relpath, s.index_relpath)]
        owned += [MANIFEST] if part is None else [part_relpath(part, num_parts)]
        target.clean_tmp(owned)

        jobs = [(target, shard, shard.relpath in reusable) for shard in mine.values()]
        done = _map(_job, jobs, workers, progress, desc="writing shards", unit="shard")
        entries = {e["path"]: e for e in done}
        if part is not None:
            frame_sizes = {split: sorted({sizes[pair] for p in mine_plans if p.split == split for _, pair in p.items})
                           for split in splits}
            record = {
                "part": part, "num_parts": num_parts, "params": params,
                "frame_sizes": {split: [list(s) for s in v] for split, v in frame_sizes.items()},
                "shards": [entries[p.relpath] for p in mine_plans],
            }
            target.write(part_relpath(part, num_parts), _dump(record))
            return ShardResult(record, target.describe(part_relpath(part, num_parts)),
                               written=len(jobs) - len(reusable), reused=len(reusable), part=part)
        frame_sizes = {split: [sizes[pair] for pair in pairs[split]] for split in splits}
        manifest = _build_manifest(params, pairs, frame_sizes, entries, plans, splits)
        target.write(MANIFEST, _dump(manifest))  # last: a folder with a manifest is a finished one
        return ShardResult(manifest, target.describe(MANIFEST), written=len(jobs) - len(reusable), reused=len(reusable))
    finally:
        target.close()


def merge_parts(
    src: str | Path,
    out: str | Path,
    *,
    num_parts: int,
    splits: tuple[str, ...] = SPLITS,
    blur_dir: str = "blur",
    maxcount: int = 64,
    seed: int = 0,
    image_format: str = "png",
    test_format: str | None = None,
) -> ShardResult:
    """After `num_parts` part runs: check every part record is there and agrees with this plan and that
    each shard it lists exists at its size, then write the manifest (the same bytes as one whole run)."""
    test_format = test_format or image_format
    _validate(splits, maxcount, 1, seed, image_format, test_format, num_parts, None)
    src = Path(src)
    pairs, plans, params = _plan(src, splits, blur_dir, maxcount, seed, image_format, test_format)
    flat = [p for split in splits for p in plans[split]]
    target = _target(out, stage=False)
    target.open()
    records, missing = {}, []
    for part in range(num_parts):
        data = target.read(part_relpath(part, num_parts))
        if data is None:
            missing.append(part)
            continue
        try:
            records[part] = json.loads(data)
        except ValueError:
            raise DataError(f"{target.describe(part_relpath(part, num_parts))} is not readable JSON: rerun part {part}")
    if missing:
        names = ", ".join(target.describe(part_relpath(p, num_parts)) for p in missing)
        raise DataError(
            f"{len(missing)} of {num_parts} parts are missing (no {names}): run "
            + "; ".join(f"--num-parts {num_parts} --part {p}" for p in missing)
            + " with the same arguments, then --merge again"
        )
    entries, frame_sizes = {}, {split: set() for split in splits}
    for part, record in records.items():
        where = target.describe(part_relpath(part, num_parts))
        if record.get("params") != params or record.get("num_parts") != num_parts:
            raise DataError(f"{where} was written with other arguments than this --merge (source, --format, --seed, "
                            f"--maxcount, --splits or --blur-dir differ): rerun that part or fix the arguments")
        wanted = [p.relpath for i, p in enumerate(flat) if i % num_parts == part]
        if [e["path"] for e in record["shards"]] != wanted:
            raise DataError(f"{where} lists other shards than this plan gives part {part}: rerun that part")
        for split, values in record["frame_sizes"].items():
            frame_sizes[split].update(tuple(v) for v in values)
        for entry in record["shards"]:
            for listed in (entry, entry["index"]):
                size = target.size(listed["path"])
                if size != listed["bytes"]:
                    state = "missing" if size is None else f"{size} bytes, the part record says {listed['bytes']}"
                    raise DataError(f"{target.describe(listed['path'])} is {state}: rerun part {part}")
            entries[entry["path"]] = entry
    manifest = _build_manifest(params, pairs, frame_sizes, entries, plans, splits)
    target.write(MANIFEST, _dump(manifest))
    return ShardResult(manifest, target.describe(MANIFEST), written=0, reused=len(entries))


# ---------------------------------------------------------------- verifying


def verify_shards(where: str | Path, progress: bool = True) -> VerifyResult:
    """Re-hash every shard and index the manifest at `where` (a folder or s3:// URL) lists; one problem
    line per file missing, truncated (size differs) or changed (SHA-256 differs)."""
    target = _target(where, stage=False)
    if isinstance(target, _LocalTarget) and not target.out.is_dir():
        raise DataError(f"shard folder {target.out} does not exist: {HOW_TO_MAKE_SHARDS}")
    target.open()
    data = target.read(MANIFEST)
    if data is None:
        raise DataError(f"{target.describe(MANIFEST)} is missing (an unfinished or foreign shard set): {HOW_TO_MAKE_SHARDS}")
    manifest = parse_manifest(data, target.describe(MANIFEST))
    listed = [
        item
        for info in manifest["splits"].values()
        for shard in info["shards"]
        for item in (shard, shard.get("index"))
        if item
    ]
    result = VerifyResult(target.describe())
    for item in tqdm(listed, disable=not progress, desc="verifying", unit="file"):
        name = target.describe(item["path"])
        if isinstance(target, _S3Target):
            size = target.size(item["path"])
            got = None if size is None or size != item["bytes"] else storage.hash_object(target.bucket, target.key(item["path"]))
            sha = got[1] if got else None
        else:
            path = target.out / item["path"]
            size = path.stat().st_size if path.is_file() else None
            sha = sha256_file(path) if size == item["bytes"] else None
        result.checked += 1
        if size is None:
            result.problems.append(f"missing: {name}")
        elif size < item["bytes"]:
            result.problems.append(f"truncated: {name} has {size} of {item['bytes']} bytes")
        elif size != item["bytes"]:
            result.problems.append(f"changed: {name} has {size} bytes, the manifest says {item['bytes']}")
        elif sha != item["sha256"]:
            result.problems.append(f"changed: {name} has sha256 {sha}, the manifest says {item['sha256']}")
        else:
            result.bytes += size
    return result


def format_verify(result: VerifyResult) -> str:
    if result.problems:
        return "\n".join(
            [f"{len(result.problems)} of {result.checked} files in {result.where} are bad:"]
            + [f"  {p}" for p in result.problems]
            + ["make them again: rerun shard_gopro.py with the arguments that made them (add --overwrite)"]
        )
    return f"ok: {result.checked} files ({result.bytes / 1e6:.1f} MB) in {result.where} match the manifest"


def format_summary(out: str | Path, result: ShardResult) -> str:
    """Pairs and shards per split, where the manifest is, and the next step."""
    if result.part is not None:
        record = result.manifest
        return (
            f"part {record['part']} of {record['num_parts']}: wrote {result.written} shards "
            f"(kept {result.reused} already complete) to {out}; record: {result.manifest_path}\n"
            f"next: when every part is done, run the same command with --merge instead of --part"
        )
    lines = [f"wrote {result.written} shards (kept {result.reused} already complete) to {out}:"]
    for split, info in result.manifest["splits"].items():
        size = f", {info['width']}x{info['height']}" if info["height"] else ", mixed frame sizes"
        n = len(info["shards"])
        fmt = info.get("image_format", result.manifest["image_format"])
        per_pair = sum(s["bytes"] for s in info["shards"]) / max(1, info["pairs"]) / 1e6
        lines.append(
            f"  {split}: {info['pairs']} pairs in {n} shard{'' if n == 1 else 's'} of {fmt}{size}, "
            f"{per_pair:.3f} MB per pair"
        )
    lines.append(f"manifest: {result.manifest_path}")
    lines.append(f"next: point training at them with `data.shards: {out}` in the config")
    return "\n".join(lines)
