"""GoPro pairs as WebDataset tar shards plus a manifest: writing them, and the read-side helpers.

Layout written: `SHARD_DIR/{split}/{split}-{i:06d}.tar` and `SHARD_DIR/manifest.json`. A sample is
`{scene}-{frame}.blur.png`, `.sharp.png` (the source PNG bytes, unchanged) and `.json` (where it came
from and its size). Shards and manifest are byte-for-byte reproducible from the same input and
arguments, each appears whole or not at all, and an interrupted run is finished by running it again.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from golf_dist.data.gopro import HOW_TO_GET_GOPRO, Pair, check_pair, scan_gopro
from golf_dist.errors import ConfigError, DataError

FORMAT_VERSION = 1
SPLITS = ("train", "test")
MEMBER_ORDER = ("blur.png", "sharp.png", "json")
MANIFEST = "manifest.json"
HOW_TO_MAKE_SHARDS = "make them with: python data_prep/shard_gopro.py --src GOPRO_Large --out SHARD_DIR"
# WebDataset's own key/suffix split: the key is the member path up to the first dot of its file name.
_KEY_SUFFIX = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


@dataclass(frozen=True)
class SampleRef:
    """Where one sample's members lie in a shard: suffix ("blur.png", "sharp.png", "json") -> (offset, size)."""

    key: str
    members: dict[str, tuple[int, int]]


@dataclass(frozen=True)
class _Sample:
    key: str
    blur_path: Path
    sharp_path: Path
    info: bytes  # the .json member

    def members(self) -> list[tuple[str, int]]:
        """Planned (member name, size) in tar order."""
        sizes = (self.blur_path.stat().st_size, self.sharp_path.stat().st_size, len(self.info))
        return [(f"{self.key}.{suffix}", size) for suffix, size in zip(MEMBER_ORDER, sizes)]


@dataclass(frozen=True)
class _Shard:
    relpath: str  # relative to the shard folder, with forward slashes
    samples: tuple[_Sample, ...]


@dataclass(frozen=True)
class ShardResult:
    """What shard_gopro did: the manifest it wrote, where, and how many shards it wrote or reused."""

    manifest: dict
    manifest_path: Path
    written: int
    reused: int


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
        for needed in ("blur.png", "sharp.png"):
            if needed not in sample.members:
                raise DataError(f"{path}: sample {sample.key} has no {needed} member: {fix}")
    return samples


def read_manifest(shard_dir: str | Path) -> dict:
    """The shard folder's manifest.json, checked: its keys, and that every shard it lists exists."""
    shard_dir = Path(shard_dir)
    path = shard_dir / MANIFEST
    if not shard_dir.is_dir():
        raise DataError(f"shard folder {shard_dir} does not exist: {HOW_TO_MAKE_SHARDS}")
    if not path.is_file():
        raise DataError(f"{path} is missing (an unfinished or foreign shard folder): {HOW_TO_MAKE_SHARDS}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path} is not readable JSON ({err}): {HOW_TO_MAKE_SHARDS}") from None
    bad = f"{path} is not a shard manifest of format_version {FORMAT_VERSION}"

    def need(obj, keys, where):
        if not isinstance(obj, dict):
            raise DataError(f"{bad}: {where} is not an object; {HOW_TO_MAKE_SHARDS}")
        missing = [k for k in keys if k not in obj]
        if missing:
            raise DataError(f"{bad}: {where} lacks {', '.join(missing)}; {HOW_TO_MAKE_SHARDS}")

    need(manifest, ("format_version", "image_format", "blur_dir", "seed", "maxcount", "splits"), "the top level")
    if manifest["format_version"] != FORMAT_VERSION:
        raise DataError(f"{bad} (it says {manifest['format_version']!r}): {HOW_TO_MAKE_SHARDS}")
    need(manifest["splits"], (), "splits")
    for split, info in manifest["splits"].items():
        need(info, ("pairs", "height", "width", "shards"), f"splits.{split}")
        if not isinstance(info["shards"], list):
            raise DataError(f"{bad}: splits.{split}.shards is not a list; {HOW_TO_MAKE_SHARDS}")
        for i, shard in enumerate(info["shards"]):
            need(shard, ("path", "samples", "bytes", "sha256"), f"splits.{split}.shards[{i}]")
            if not (shard_dir / shard["path"]).is_file():
                raise DataError(
                    f"{shard_dir / shard['path']} is listed in {path} but missing: "
                    f"run shard_gopro.py again with the same arguments to finish the folder"
                )
    return manifest


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


def _plan_split(
    src: Path, split: str, pairs: list[Pair], sizes: list[tuple[int, int]], blur_dir: str, maxcount: int, seed: int
) -> list[_Shard]:
    order = np.random.default_rng(seed).permutation(len(pairs)) if split == "train" else range(len(pairs))
    samples, keys = [], set()
    for i in order:
        pair, (height, width) = pairs[i], sizes[i]
        if "." in pair.scene or "." in pair.frame:
            raise DataError(
                f"{pair.blur_path}: a dot in the scene or frame name would split the WebDataset key; rename it"
            )
        key = f"{pair.scene}-{pair.frame}"
        if key in keys:
            raise DataError(f"{pair.blur_path}: sample key {key} is not unique in {split}; rename the scene or frame")
        keys.add(key)
        info = {
            "scene": pair.scene,
            "frame": pair.frame,
            "split": split,
            "blur_dir": blur_dir,
            "height": height,
            "width": width,
            "blur_src": pair.blur_path.relative_to(src).as_posix(),
            "sharp_src": pair.sharp_path.relative_to(src).as_posix(),
        }
        info_bytes = json.dumps(info, sort_keys=True, separators=(",", ":")).encode()
        samples.append(_Sample(key, pair.blur_path, pair.sharp_path, info_bytes))
    return [
        _Shard(f"{split}/{split}-{n:06d}.tar", tuple(samples[start : start + maxcount]))
        for n, start in enumerate(range(0, len(samples), maxcount))
    ]


def _matches_plan(path: Path, shard: _Shard) -> bool:
    """Whether an existing shard holds exactly the planned members (names, sizes and .json bytes)."""
    refs = index_shard(path)
    found = [(f"{r.key}.{s}", size) for r in refs for s, (_, size) in r.members.items()]
    if found != [m for sample in shard.samples for m in sample.members()]:
        return False
    return all(read_member(path, *ref.members["json"]) == s.info for ref, s in zip(refs, shard.samples))


def _entry(out: Path, shard: _Shard) -> dict:
    path = out / shard.relpath
    size, digest = path.stat().st_size, sha256_file(path)
    return {"path": shard.relpath, "samples": len(shard.samples), "bytes": size, "sha256": digest}


def _shard_job(job: tuple[Path, _Shard, bool]) -> dict:
    """Write one planned shard, or (when already complete) only hash it; its manifest entry."""
    out, shard, reuse = job
    return _entry(out, shard) if reuse else _write_shard(out, shard)


def _write_shard(out: Path, shard: _Shard) -> dict:
    """Write one shard to a temporary name, fsync, then rename: it appears whole or not at all."""
    path = out / shard.relpath
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:
                for sample in shard.samples:
                    datas = (sample.blur_path.read_bytes(), sample.sharp_path.read_bytes(), sample.info)
                    for suffix, data in zip(MEMBER_ORDER, datas):
                        info = tarfile.TarInfo(f"{sample.key}.{suffix}")
                        info.size, info.mtime, info.mode = len(data), 0, 0o444
                        info.uid = info.gid = 0
                        info.uname = info.gname = ""
                        tar.addfile(info, io.BytesIO(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return _entry(out, shard)


def _check_existing(out: Path, plan: dict[str, list[_Shard]], params: dict, overwrite: bool) -> set[str]:
    """Shards already in `out` that equal the plan (to reuse); anything from another plan is an error."""
    redo = "pass --overwrite to replace the shards there, or choose another --out"
    reusable: set[str] = set()
    for split, shards in plan.items():
        planned = {s.relpath: s for s in shards}
        for path in sorted((out / split).glob("*.tar")):
            if overwrite:
                path.unlink()
                continue
            relpath = f"{split}/{path.name}"
            if relpath not in planned or not _matches_plan(path, planned[relpath]):
                raise DataError(
                    f"{path} was written from another source, seed, --maxcount or --blur-dir than this run: {redo}"
                )
            reusable.add(relpath)
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        if overwrite:
            manifest_path.unlink()
            return reusable
        try:
            old = json.loads(manifest_path.read_text(encoding="utf-8"))
            differs = [k for k, v in params.items() if old.get(k) != v]
            for split, shards in plan.items():
                if split in old.get("splits", {}):
                    listed = [(s["path"], s["samples"]) for s in old["splits"][split]["shards"]]
                    if listed != [(s.relpath, len(s.samples)) for s in shards]:
                        differs.append(f"splits.{split}.shards")
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            differs = ["(unreadable)"]
        if differs:
            raise DataError(f"{manifest_path} describes another plan ({', '.join(differs)} differ): {redo}")
    return reusable


def shard_gopro(
    src: str | Path,
    out: str | Path,
    *,
    splits: tuple[str, ...] = SPLITS,
    blur_dir: str = "blur",
    maxcount: int = 64,
    workers: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> ShardResult:
    """Validate every pair of `src` (GOPRO_Large layout), then write the shards and, last, the manifest.

    Nothing is written until all input has been read and checked. Shards already in `out` from the same
    plan are kept (an interrupted run finishes where it stopped); shards or a manifest from another plan
    are an error unless `overwrite`.
    """
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    if not splits or len(set(splits)) != len(splits) or any(s not in SPLITS for s in splits):
        raise ConfigError(f"--splits must be a comma-separated subset of {','.join(SPLITS)}, got {','.join(splits)}")
    for flag, value, low in (("--maxcount", maxcount, 1), ("--workers", workers, 1), ("--seed", seed, 0)):
        if value < low:
            raise ConfigError(f"{flag} must be at least {low}, got {value}")
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise DataError(f"GoPro folder {src} does not exist; {HOW_TO_GET_GOPRO}")
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} exists and is not a folder: choose another --out")

    pairs = {split: scan_gopro(src, split, blur_dir) for split in splits}
    flat = [pair for split in splits for pair in pairs[split]]
    flat_sizes = _map(check_pair, flat, workers, progress, desc="checking pairs", unit="pair")
    sizes, start = {}, 0
    for split in splits:
        sizes[split], start = flat_sizes[start : start + len(pairs[split])], start + len(pairs[split])
    plan = {split: _plan_split(src, split, pairs[split], sizes[split], blur_dir, maxcount, seed) for split in splits}
    params = dict(format_version=FORMAT_VERSION, image_format="png", blur_dir=blur_dir, seed=seed, maxcount=maxcount)
    reusable = _check_existing(out, plan, params, overwrite) if out.exists() else set()

    for split in splits:
        (out / split).mkdir(parents=True, exist_ok=True)
        for stale in (out / split).glob("*.tmp-*"):
            stale.unlink()
    for stale in out.glob(f"{MANIFEST}.tmp-*"):
        stale.unlink()

    jobs = [(out, shard, shard.relpath in reusable) for split in splits for shard in plan[split]]
    entries = {e["path"]: e for e in _map(_shard_job, jobs, workers, progress, desc="writing shards", unit="shard")}

    manifest = dict(params, splits={})
    for split in splits:
        frame_sizes = set(sizes[split])
        height, width = frame_sizes.pop() if len(frame_sizes) == 1 else (None, None)
        manifest["splits"][split] = {
            "pairs": len(pairs[split]),
            "height": height,
            "width": width,
            "shards": [entries[s.relpath] for s in plan[split]],
        }
    manifest_path = out / MANIFEST
    tmp = manifest_path.with_name(f"{MANIFEST}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(manifest, sort_keys=True, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, manifest_path)
    return ShardResult(manifest, manifest_path, written=len(jobs) - len(reusable), reused=len(reusable))


def format_summary(out: str | Path, result: ShardResult) -> str:
    """Pairs and shards per split, where the manifest is, and the next step."""
    lines = [f"wrote {result.written} shards (kept {result.reused} already complete) to {out}:"]
    for split, info in result.manifest["splits"].items():
        size = f", {info['width']}x{info['height']}" if info["height"] else ", mixed frame sizes"
        n = len(info["shards"])
        lines.append(f"  {split}: {info['pairs']} pairs in {n} shard{'' if n == 1 else 's'}{size}")
    lines.append(f"manifest: {result.manifest_path}")
    lines.append(f"next: point training at them with `data.shards: {out}` in the config")
    return "\n".join(lines)
