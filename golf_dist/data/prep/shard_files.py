"""What one shard holds and where it is written: the plan of a split's shards (which pairs go in which
tar), a shard's members made from the source pairs, and the two places shards go, a local folder or an
S3 prefix, each writing a shard whole or not at all. Used by the offline writer (golf_dist.data.prep.sharding)
and verifier (golf_dist.data.prep.shard_verify), never by training.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from golf_dist.data import storage
from golf_dist.data.formats import decode, encode
from golf_dist.data.prep.gopro import Pair
from golf_dist.data.shard_reader import dali_index, index_shard, read_member
from golf_dist.errors import DataError
from golf_dist.files import atomic_path, sha256_file, write_atomic


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
class ShardPlan:
    """A shard before its pairs are checked: name, split, format and (key, pair) in tar order."""

    relpath: str
    split: str
    fmt: str
    items: tuple[tuple[str, Pair], ...]


@dataclass(frozen=True)
class Shard:
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


def plan_split(pairs: list[Pair], split: str, fmt: str, maxcount: int, seed: int) -> list[ShardPlan]:
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
        ShardPlan(f"{split}/{split}-{n:06d}.tar", split, fmt, tuple(items[start : start + maxcount]))
        for n, start in enumerate(range(0, len(items), maxcount))
    ]


def fill_shard(src: Path, plan: ShardPlan, sizes: dict[Pair, tuple[int, int]], blur_dir: str) -> Shard:
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
    return Shard(plan.relpath, plan.split, plan.fmt, tuple(samples))


def _matches_plan(path: Path, shard: Shard) -> bool:
    """Whether an existing shard holds exactly the planned members (names, sizes and .json bytes)."""
    refs = index_shard(path)
    found = [(f"{r.key}.{s}", size) for r in refs for s, (_, size) in r.members.items()]
    planned = [m for sample in shard.samples for m in sample.members(shard.fmt)]
    if len(found) != len(planned) or any(
        name != p_name or (p_size is not None and size != p_size)
        for (name, size), (p_name, p_size) in zip(found, planned)
    ):
        return False
    return all(read_member(path, *ref.members["json"]) == s.info for ref, s in zip(refs, shard.samples))


def _write_files(folder: Path, shard: Shard) -> None:
    """Write one shard, then its DALI index, each to a temporary name, fsync, rename: whole or not at all."""
    path = folder / shard.relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
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
        index = dali_index(index_shard(tmp))
    write_atomic(folder / shard.index_relpath, index)


def _file_entry(relpath: str, path: Path) -> dict:
    return {"path": relpath, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _entry(folder: Path, shard: Shard) -> dict:
    entry = _file_entry(shard.relpath, folder / shard.relpath)
    entry["samples"] = len(shard.samples)
    entry["index"] = _file_entry(shard.index_relpath, folder / shard.index_relpath)
    return entry


# ---------------------------------------------------------------- where shards go: a folder or S3


@dataclass(frozen=True)
class LocalTarget:
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
        write_atomic(path, data)

    def delete(self, relpath: str) -> None:
        (self.out / relpath).unlink(missing_ok=True)

    def size(self, relpath: str) -> int | None:
        path = self.out / relpath
        return path.stat().st_size if path.is_file() else None

    def matches(self, shard: Shard) -> bool:
        return _matches_plan(self.out / shard.relpath, shard)

    def complete(self, shard: Shard) -> bool:
        return True  # a lost or stale index is rewritten from its shard (cheap: tar headers only)

    def clean_tmp(self, relpaths: list[str]) -> None:
        """Remove what killed runs left under temporary names (only for files this run owns)."""
        for relpath in relpaths:
            path = self.out / relpath
            for stale in path.parent.glob(f"{glob_escape(path.name)}.tmp-*") if path.parent.is_dir() else ():
                stale.unlink(missing_ok=True)

    def job(self, shard: Shard, reuse: bool) -> dict:
        if not reuse:
            _write_files(self.out, shard)
        else:  # a finished shard: its index may have been lost to a kill between the two renames
            index = dali_index(index_shard(self.out / shard.relpath))
            if self.read(shard.index_relpath) != index:
                write_atomic(self.out / shard.index_relpath, index)
        return _entry(self.out, shard)

    def close(self) -> None:
        pass


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


@dataclass(frozen=True)
class S3Target:
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
        return sorted(
            k[start:] for k in keys if k.endswith((".tar", ".idx")) and "/" not in k[len(self.key(split)) + 1 :]
        )

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

    def matches(self, shard: Shard) -> bool:
        head = storage.head(self.bucket, self.key(shard.relpath))
        return head is not None and head.get("Metadata", {}).get("golf-plan") == shard.fingerprint()

    def complete(self, shard: Shard) -> bool:
        """Both the shard and its index are up, whole, from this plan (else both are made and sent again)."""
        plan = shard.fingerprint()
        return all(self._uploaded(r, plan) is not None for r in (shard.relpath, shard.index_relpath))

    def clean_tmp(self, relpaths: list[str]) -> None:
        pass  # S3 has no partial objects; the staging folder is this run's own

    def job(self, shard: Shard, reuse: bool) -> dict:
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


def shard_target(out: str | Path, stage: bool = True):
    if storage.is_s3_url(str(out)):
        url = str(out).rstrip("/")
        storage.split_s3_url(url)
        return S3Target(url, Path(tempfile.mkdtemp(prefix="golf-shards-stage-")) if stage else None)
    return LocalTarget(Path(out))
