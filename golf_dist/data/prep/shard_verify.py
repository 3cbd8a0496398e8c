"""Verifying a shard set (`data_prep/shard_gopro.py --verify`): every shard and index the manifest lists
is re-hashed, in a folder or on S3. Offline work: training never imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from golf_dist.data import storage
from golf_dist.data.prep.shard_files import LocalTarget, S3Target, shard_target
from golf_dist.data.shard_reader import HOW_TO_MAKE_SHARDS, MANIFEST, parse_manifest
from golf_dist.errors import DataError
from golf_dist.files import sha256_file


@dataclass
class VerifyResult:
    """What --verify found: files checked, their bytes, and one line per missing/truncated/changed file."""

    where: str
    checked: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)


def verify_shards(where: str | Path, progress: bool = True) -> VerifyResult:
    """Re-hash every shard and index the manifest at `where` (a folder or s3:// URL) lists; one problem
    line per file missing, truncated (size differs) or changed (SHA-256 differs)."""
    target = shard_target(where, stage=False)
    if isinstance(target, LocalTarget) and not target.out.is_dir():
        raise DataError(f"shard folder {target.out} does not exist: {HOW_TO_MAKE_SHARDS}")
    target.open()
    data = target.read(MANIFEST)
    if data is None:
        raise DataError(
            f"{target.describe(MANIFEST)} is missing (an unfinished or foreign shard set): {HOW_TO_MAKE_SHARDS}"
        )
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
        if isinstance(target, S3Target):
            size = target.size(item["path"])
            got = (
                None
                if size is None or size != item["bytes"]
                else storage.hash_object(target.bucket, target.key(item["path"]))
            )
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
