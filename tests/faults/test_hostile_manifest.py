"""A manifest with hostile paths, served by the real loopback S3 server: the shard cache every training rank
fills (storage.local_shard_dir) and `shard_gopro.py --verify` must refuse it naming the manifest and the
field, and write nothing outside the cache folder (nothing at all for a refused manifest); a valid manifest
whose split folder in the cache is a symlink leading out of it is refused too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_bucket, run_cli

FAULT = "manifest with hostile paths"
BUCKET = "faults-hostile"


def _manifest(shards: Path) -> dict:
    return json.loads((shards / "manifest.json").read_text())


def _cases(shards: Path, outside: Path) -> list[tuple[str, str, object]]:
    """(name, field, value): shard or index paths that point elsewhere, or are not paths at all."""
    return [
        ("parent escape", "splits.train.shards[0].path", "../../escaped.tar"),
        ("absolute path", "splits.train.shards[0].path", str(outside / "abs-escaped.tar")),
        ("escape through the split", "splits.train.shards[0].path", "train/../../escaped.tar"),
        ("backslashes", "splits.train.shards[0].path", "train\\..\\..\\escaped.tar"),
        ("nested folder", "splits.train.shards[0].path", "train/sub/escaped.tar"),
        ("index escape", "splits.train.shards[0].index.path", "../../root/.ssh/authorized_keys.idx"),
        ("absolute index", "splits.test.shards[0].index.path", str(outside / "abs-escaped.idx")),
        ("null path", "splits.train.shards[0].path", None),
        ("number as path", "splits.test.shards[0].path", 7),
    ]


def _set(tree: dict, dotted: str, value) -> None:
    *parents, last = [int(p) if p.isdigit() else p for p in dotted.replace("[0]", ".0").split(".")]
    for part in parents:
        tree = tree[part]
    tree[last] = value


def _snapshot(root: Path, skip: Path) -> set[str]:
    return {str(p) for p in root.rglob("*") if skip not in p.parents and p != skip}


@pytest.mark.slow
def test_hostile_manifest_paths_are_refused_and_nothing_is_written_outside(
    shards, s3_server, tmp_path, monkeypatch, record
):
    import boto3

    from golf_dist.data import storage
    from golf_dist.errors import DataError

    record.expect(FAULT, "S3 shard cache and --verify")
    env = s3_server
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    storage._clients.clear()
    make_bucket(env, BUCKET)
    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    for p in shards.rglob("*"):
        if p.is_file() and p.name != "manifest.json":
            client.put_object(Bucket=BUCKET, Key=f"set/{p.relative_to(shards).as_posix()}", Body=p.read_bytes())
    outside = tmp_path / "outside"
    outside.mkdir()
    cache = tmp_path / "deep" / "er" / "cache"
    cache.mkdir(parents=True)  # the cache folder itself is the user's choice: only what lands beside it counts
    names = []
    try:
        for i, (name, field, value) in enumerate(_cases(shards, outside)):
            manifest = _manifest(shards)
            _set(manifest, field, value)
            client.put_object(Bucket=BUCKET, Key=f"h{i}/manifest.json", Body=json.dumps(manifest).encode())
            for p in shards.rglob("*"):  # the set's objects beside it, so a naive cache would go on writing
                if p.is_file() and p.name != "manifest.json":
                    client.copy_object(
                        Bucket=BUCKET,
                        Key=f"h{i}/{p.relative_to(shards).as_posix()}",
                        CopySource={"Bucket": BUCKET, "Key": f"set/{p.relative_to(shards).as_posix()}"},
                    )
            url = f"s3://{BUCKET}/h{i}"
            before = _snapshot(tmp_path, cache)
            try:
                storage.local_shard_dir(url, cache)
                error = None
            except DataError as err:
                error = str(err)
            record.injections = i + 1
            written = sorted(_snapshot(tmp_path, cache) - before)
            folder = cache / BUCKET / f"h{i}"
            cached = [p for p in folder.rglob("*") if p.is_file() and p.name != ".lock"] if folder.is_dir() else []
            if written or cached:
                record(
                    FAULT,
                    "S3 shard cache (storage.local_shard_dir)",
                    i + 1,
                    "data lost",
                    f"{name} ({field}={value!r}): wrote {written} outside the cache, {cached} inside it",
                )
            assert error is not None, f"{name}: the cache accepted {field}={value!r}"
            assert f"{url}/manifest.json" in error and field.split(".")[-1] in error, error
            names.append(name)

        # a valid manifest, and the cache's split folder a symlink leading out of the cache
        url = f"s3://{BUCKET}/set"
        client.put_object(Bucket=BUCKET, Key="set/manifest.json", Body=(shards / "manifest.json").read_bytes())
        (cache / BUCKET / "set").mkdir(parents=True)
        (cache / BUCKET / "set" / "train").symlink_to(outside, target_is_directory=True)
        try:
            storage.local_shard_dir(url, cache)
            error = None
        except DataError as err:
            error = str(err)
        record.injections += 1
        if list(outside.iterdir()):
            record(
                FAULT,
                "S3 shard cache (storage.local_shard_dir)",
                record.injections,
                "data lost",
                f"a symlinked split folder: wrote {sorted(p.name for p in outside.iterdir())} outside the cache",
            )
        assert error is not None and "leads outside the cache" in error, error
        names.append("split folder symlinked out of the cache")
    finally:
        storage._clients.clear()
    record(
        FAULT,
        "S3 shard cache (storage.local_shard_dir)",
        len(names),
        "named error",
        f"{len(names)} cases ({', '.join(names)}): each refused naming the manifest and the field; "
        "nothing written outside the cache, nothing cached",
    )

    # --verify reads the same manifests: refused by name, no traceback
    verified = []
    for i, (name, field, _value) in enumerate(_cases(shards, outside)[:3]):
        proc = run_cli("data_prep/shard_gopro.py", "--verify", f"s3://{BUCKET}/h{i}", "--no-progress", env=env)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert f"s3://{BUCKET}/h{i}/manifest.json" in proc.stderr and field.split(".")[-1] in proc.stderr, proc.stderr
        verified.append(name)
    record(
        FAULT,
        "shard_gopro.py --verify s3://",
        len(verified),
        "named error",
        f"{len(verified)} manifests ({', '.join(verified)}): exit 1 naming the manifest and the field",
    )
