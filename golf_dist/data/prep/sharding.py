"""Writing a shard set (data_prep/shard_gopro.py): GoPro pairs as WebDataset tar shards plus DALI index
files and a manifest, to a folder or to S3. Offline work: training never imports this module.

Shards, indexes and manifest are byte-for-byte reproducible from the same input and arguments, each
appears whole or not at all (temporary name, fsync, rename; one PUT per object on S3), and an
interrupted run is finished by running it again. `--num-parts N --part I` writes one N-th of the shards
(a SLURM array task) plus a part record under OUT/parts/; `--merge` then writes the manifest once every
part is there.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from golf_dist.data.formats import FORMATS
from golf_dist.data.prep.gopro import HOW_TO_GET_GOPRO, check_pair, scan_gopro
from golf_dist.data.prep.shard_files import Shard, ShardPlan, fill_shard, plan_split, shard_target
from golf_dist.data.shard_reader import FORMAT_VERSION, MANIFEST, PARTS_DIR, SPLITS
from golf_dist.errors import ConfigError, DataError


@dataclass(frozen=True)
class ShardResult:
    """What shard_gopro did: the manifest (or part record) it wrote, where, and shards written or reused."""

    manifest: dict
    manifest_path: str
    written: int
    reused: int
    part: int | None = None


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


# ---------------------------------------------------------------- writing


def _check_existing(
    target, planned: dict[str, ShardPlan], mine: dict[str, Shard], splits, params: dict, overwrite: bool, whole: bool
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
        ("--maxcount", maxcount, 1),
        ("--workers", workers, 1),
        ("--seed", seed, 0),
        ("--num-parts", num_parts, 1),
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
    plans = {split: plan_split(pairs[split], split, formats[split], maxcount, seed) for split in splits}
    params = dict(
        format_version=FORMAT_VERSION,
        image_format=image_format,
        blur_dir=blur_dir,
        seed=seed,
        maxcount=maxcount,
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
    mine = {p.relpath: fill_shard(src, p, sizes, blur_dir) for p in mine_plans}

    target = shard_target(out)
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
            frame_sizes = {
                split: sorted({sizes[pair] for p in mine_plans if p.split == split for _, pair in p.items})
                for split in splits
            }
            record = {
                "part": part,
                "num_parts": num_parts,
                "params": params,
                "frame_sizes": {split: [list(s) for s in v] for split, v in frame_sizes.items()},
                "shards": [entries[p.relpath] for p in mine_plans],
            }
            target.write(part_relpath(part, num_parts), _dump(record))
            return ShardResult(
                record,
                target.describe(part_relpath(part, num_parts)),
                written=len(jobs) - len(reusable),
                reused=len(reusable),
                part=part,
            )
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
    target = shard_target(out, stage=False)
    target.open()
    records, missing = {}, []
    for part in range(num_parts):
        data = target.read(part_relpath(part, num_parts))
        if data is None:
            missing.append(part)
            continue
        try:
            records[part] = json.loads(data)
        except ValueError as err:
            raise DataError(
                f"{target.describe(part_relpath(part, num_parts))} is not readable JSON: rerun part {part}"
            ) from err
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
            raise DataError(
                f"{where} was written with other arguments than this --merge (source, --format, --seed, "
                f"--maxcount, --splits or --blur-dir differ): rerun that part or fix the arguments"
            )
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
