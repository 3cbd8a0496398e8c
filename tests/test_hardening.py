"""Hardening: a manifest cannot choose where the cache writes, one damaged checkpoint does not stop
training, a full disk leaves no temporaries and says so by name, passwords in URIs are redacted, a
negative seed is refused, and the local SLURM cluster refuses a folder it cannot trust.

New names (StorageFullError, clean_stale_temporaries, redact_config_dict) are imported inside the
tests that use them, so each test fails on its own when its fix is missing."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import tmpfs, write_gopro

from golf_dist import checkpoints
from golf_dist.checkpoints import best_checkpoint, exported_weights, list_checkpoints, prune, save_checkpoint
from golf_dist.data import storage
from golf_dist.data.prep.sharding import shard_gopro
from golf_dist.data.shard_reader import parse_manifest, read_manifest
from golf_dist.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parent.parent
WHERE = "s3://bucket/set/manifest.json"


def _manifest() -> dict:
    """The shape shard_gopro writes (see sharding._build_manifest / shard_files._entry)."""
    return {
        "format_version": 1,
        "image_format": "png",
        "blur_dir": "blur",
        "seed": 0,
        "maxcount": 4,
        "splits": {
            "train": {
                "pairs": 2,
                "height": 32,
                "width": 48,
                "image_format": "png",
                "shards": [
                    {
                        "path": "train/train-000000.tar",
                        "samples": 2,
                        "bytes": 10,
                        "sha256": "0" * 64,
                        "index": {"path": "train/train-000000.idx", "bytes": 5, "sha256": "1" * 64},
                    }
                ],
            }
        },
    }


def _dump(manifest: dict) -> bytes:
    return json.dumps(manifest).encode()


# ---------------------------------------------------------------- 1. the manifest decides nothing


def test_manifests_the_sharder_writes_stay_valid(tmp_path):
    src = write_gopro(tmp_path / "GOPRO_Large")
    for fmt in ("png", "npy"):
        out = tmp_path / fmt
        shard_gopro(src, out, image_format=fmt, test_format="png", maxcount=2, workers=1, progress=False)
        parse_manifest((out / "manifest.json").read_bytes(), str(out / "manifest.json"))
        assert len(read_manifest(out)["splits"]["train"]["shards"]) == 2
    parse_manifest(_dump(_manifest()), WHERE)
    old = _manifest()  # from before per-split formats and index files
    del old["splits"]["train"]["image_format"], old["splits"]["train"]["shards"][0]["index"]
    parse_manifest(_dump(old), WHERE)


@pytest.mark.parametrize(
    "path",
    [
        "../evil.tar",
        "/etc/evil.tar",
        "train/../../evil.tar",
        "train/../evil.tar",
        "train\\evil.tar",
        "train//evil.tar",
        "train/evil.txt",
        "val/val-000000.tar",
        "train/sub/evil.tar",
        "./train/evil.tar",
        "train/.tar",
        "train/",
        "train/train-000000.idx",
        "",
    ],
)
def test_manifest_shard_paths_must_be_split_relative(path):
    manifest = _manifest()
    manifest["splits"]["train"]["shards"][0]["path"] = path
    with pytest.raises(DataError, match=r"s3://bucket/set/manifest.json.*splits.train.shards\[0\].path"):
        parse_manifest(_dump(manifest), WHERE)


@pytest.mark.parametrize("path", ["../../root/.ssh/authorized_keys.idx", "train/train-000000.tar", "test/x.idx"])
def test_manifest_index_paths_must_be_split_relative(path):
    manifest = _manifest()
    manifest["splits"]["train"]["shards"][0]["index"]["path"] = path
    with pytest.raises(DataError, match=r"manifest.json.*splits.train.shards\[0\].index.path"):
        parse_manifest(_dump(manifest), WHERE)


def test_a_split_named_dot_dot_is_no_way_out():
    manifest = _manifest()
    manifest["splits"][".."] = manifest["splits"].pop("train")
    manifest["splits"][".."]["shards"][0]["path"] = "../x.tar"
    with pytest.raises(DataError, match=r"manifest.json.*shards\[0\].path '\.\./x.tar'"):
        parse_manifest(_dump(manifest), WHERE)


def _set(tree: dict, dotted: str, value) -> None:
    *parents, last = [int(p) if p.isdigit() else p for p in dotted.replace("[0]", ".0").split(".")]
    for part in parents:
        tree = tree[part]
    tree[last] = value


@pytest.mark.parametrize(
    "field, value",
    [
        ("splits.train.shards[0].path", None),
        ("splits.train.shards[0].path", 7),
        ("splits.train.shards[0].bytes", "10"),
        ("splits.train.shards[0].bytes", True),
        ("splits.train.shards[0].bytes", -1),
        ("splits.train.shards[0].samples", 2.5),
        ("splits.train.shards[0].sha256", None),
        ("splits.train.shards[0].index.path", None),
        ("splits.train.shards[0].index.bytes", [5]),
        ("splits.train.shards[0].index.sha256", {}),
        ("splits.train.shards[0].index", "train/train-000000.idx"),
        ("splits.train.shards[0]", None),
        ("splits.train.shards", {}),
        ("splits.train.pairs", None),
        ("splits.train.height", "32"),
        ("splits.train.width", -48),
        ("splits.train.image_format", 3),
        ("splits.train", []),
        ("splits", ["train"]),
        ("image_format", None),
        ("blur_dir", 1),
        ("seed", "0"),
        ("maxcount", None),
    ],
)
def test_every_manifest_field_is_type_checked(field, value):
    manifest = _manifest()
    _set(manifest, field, value)
    with pytest.raises(DataError) as caught:
        parse_manifest(_dump(manifest), WHERE)
    assert WHERE in str(caught.value) and field.split(".")[-1] in str(caught.value), str(caught.value)


def test_mixed_frame_sizes_null_height_and_width_are_valid():
    manifest = _manifest()
    manifest["splits"]["train"]["height"] = manifest["splits"]["train"]["width"] = None
    parse_manifest(_dump(manifest), WHERE)


@pytest.fixture()
def fake_bucket(monkeypatch):
    """storage's S3 calls answered in-process: the manifest served, every download recorded (and written)."""
    served: dict[str, bytes] = {}
    downloads: list[Path] = []

    def get_bytes(bucket, key):
        return served.get(key)

    def download_verified(bucket, key, dest, size, sha256):
        downloads.append(Path(dest))
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        Path(dest).write_bytes(b"x" * size)

    monkeypatch.setattr(storage, "get_bytes", get_bytes)
    monkeypatch.setattr(storage, "download_verified", download_verified)
    return served, downloads


def test_the_cache_writes_nothing_a_hostile_manifest_points_outside(fake_bucket, tmp_path):
    served, downloads = fake_bucket
    manifest = _manifest()
    manifest["splits"]["train"]["shards"][0]["path"] = "../../../escaped.tar"
    served["set/manifest.json"] = _dump(manifest)
    cache = tmp_path / "a" / "b" / "cache"
    with pytest.raises(DataError, match=r"s3://bucket/set/manifest.json.*splits.train.shards\[0\].path"):
        storage.local_shard_dir("s3://bucket/set", cache)
    assert downloads == [] and not list(tmp_path.rglob("escaped.tar"))


def test_the_cache_refuses_a_destination_resolving_outside_it(fake_bucket, tmp_path):
    served, downloads = fake_bucket
    served["set/manifest.json"] = _dump(_manifest())
    cache, elsewhere = tmp_path / "cache", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (cache / "bucket" / "set").mkdir(parents=True)
    (cache / "bucket" / "set" / "train").symlink_to(elsewhere)  # a valid-looking path, through a symlink
    with pytest.raises(DataError, match=r"splits.train.shards\[0\].path 'train/train-000000.tar' leads outside"):
        storage.local_shard_dir("s3://bucket/set", cache)
    assert downloads == [] and list(elsewhere.iterdir()) == []


# ---------------------------------------------------------------- 2. a damaged checkpoint


def _save(root, step, psnr=None, value=0.0, ema=None, opt_size=2):
    model = {"w": torch.full((2, 2), value)}
    opt = {"state": {0: {"exp_avg": torch.ones(opt_size)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    ema_state = None if ema is None else {"w": torch.full((2, 2), ema)}
    return save_checkpoint(
        root,
        step,
        model,
        {"optimizer": opt, "scheduler": {"last_epoch": step}},
        {"val_psnr": psnr},
        ema_state=ema_state,
    )


def test_prune_after_a_save_survives_a_truncated_oldest_state_json(tmp_path):
    for step, psnr in [(1, 30.0), (2, 20.0), (3, 21.0)]:
        _save(tmp_path, step, psnr)
    state = tmp_path / "step-00000001" / "state.json"
    state.write_text(state.read_text()[:12])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        removed = prune(tmp_path, keep_last=2)
    assert [p.name for p in removed] == ["step-00000001"]  # damaged and not among the newest: it goes
    assert len(caught) == 1 and "step-00000001" in str(caught[0].message), [str(w.message) for w in caught]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing damaged is left: no warning at all
        _save(tmp_path, 4, 22.0)
        assert [p.name for p in prune(tmp_path, keep_last=2)] == ["step-00000002"]
        assert best_checkpoint(tmp_path).name == "step-00000004"


def test_a_damaged_newest_checkpoint_is_kept_for_load_latest_and_warned_once(tmp_path):
    for step, psnr in [(1, 20.0), (2, 25.0), (3, 21.0)]:
        _save(tmp_path, step, psnr)
    (tmp_path / "step-00000003" / "state.json").write_text("[1, 2]")  # JSON, but not a state
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        removed = prune(tmp_path, keep_last=1)
    assert [p.name for p in removed] == ["step-00000001"]
    assert len(caught) == 1 and "step-00000003" in str(caught[0].message)


def test_best_checkpoint_is_one_whose_exported_weights_load(tmp_path):
    _save(tmp_path, 1, 20.0, value=1.0)
    bad_model = _save(tmp_path, 2, 30.0, value=2.0)
    (bad_model / "model.safetensors").write_bytes((bad_model / "model.safetensors").read_bytes()[:-7])
    bad_ema = _save(tmp_path, 3, 25.0, value=3.0, ema=3.5)
    (bad_ema / "ema.safetensors").write_bytes(b"\0" * 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        best = best_checkpoint(tmp_path)
    assert best.name == "step-00000001"
    assert len(caught) == 1
    assert "step-00000002" in str(caught[0].message) and "step-00000003" in str(caught[0].message)
    assert torch.equal(exported_weights(best)["w"], torch.full((2, 2), 1.0))  # what the trainer exports
    _save(tmp_path, 4, 40.0, value=4.0, ema=4.5)  # a whole EMA checkpoint: its EMA is what is exported
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert best_checkpoint(tmp_path).name == "step-00000004"
    assert torch.equal(exported_weights(tmp_path / "step-00000004")["w"], torch.full((2, 2), 4.5))
    assert prune(tmp_path, keep_last=1) == [tmp_path / f"step-0000000{i}" for i in (1, 2, 3)]


# ---------------------------------------------------------------- 3. a full disk


@pytest.fixture()
def small_disk(tmp_path):
    """A 2 MB tmpfs mounted for the test (root only), unmounted after it."""
    with tmpfs(tmp_path / "disk", 2 << 20) as mount:
        yield mount


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if ".tmp-" in p.name or p.name.startswith(".old-"))


@pytest.mark.parametrize("too_big", ["model", "optimizer", "ema"])
def test_a_full_disk_during_save_checkpoint_leaves_nothing_and_says_so(small_disk, too_big):
    from golf_dist.errors import StorageFullError

    root = small_disk / "checkpoints"
    _save(root, 1, 20.0)
    big = 1 << 20  # 4 MB of float32 on a 2 MB disk
    model = {"w": torch.zeros(big if too_big == "model" else 4)}
    opt = {"state": {0: {"exp_avg": torch.zeros(big if too_big == "optimizer" else 2)}}, "param_groups": []}
    ema = {"w": torch.zeros(big)} if too_big == "ema" else None
    with pytest.raises(StorageFullError) as caught:
        save_checkpoint(root, 2, model, {"optimizer": opt}, {"val_psnr": 21.0}, ema_state=ema)
    message = str(caught.value)
    assert str(root / "step-00000002") in message and "MB free of" in message, message
    assert isinstance(caught.value, DataError)
    assert [p.name for p in root.iterdir()] == ["step-00000001"], _leftovers(root)
    assert checkpoints.load_checkpoint(root / "step-00000001")["state"]["val_psnr"] == 20.0


def test_a_full_disk_during_save_weights_and_write_atomic(small_disk):
    from golf_dist.errors import StorageFullError
    from golf_dist.files import write_atomic

    with pytest.raises(StorageFullError, match=re.escape(str(small_disk / "w.safetensors"))):
        checkpoints.save_weights({"w": torch.zeros(1 << 20)}, small_disk / "w.safetensors")
    with pytest.raises(StorageFullError, match=re.escape(str(small_disk / "cache.json"))):
        write_atomic(small_disk / "cache.json", b"x" * (3 << 20))
    assert list(small_disk.iterdir()) == []


def test_a_full_disk_while_sharding_leaves_no_partial_shard(small_disk, tmp_path):
    from golf_dist.errors import StorageFullError

    src = write_gopro(tmp_path / "GOPRO_Large", train=6, test=2, height=48, width=64)
    usage = shutil.disk_usage(small_disk)
    (small_disk / "filler").write_bytes(b"\0" * (usage.free - (40 << 10)))  # 40 kB left: one npy shard does not fit
    out = small_disk / "shards"
    with pytest.raises(StorageFullError, match=r"no space left while writing .*/shards/train/train-00000\d\.(tar|idx)"):
        shard_gopro(src, out, image_format="npy", maxcount=3, workers=1, progress=False)
    assert _leftovers(out) == []
    assert not (out / "manifest.json").exists()


def test_save_checkpoint_fsyncs_the_temporary_folder_before_the_rename(tmp_path, monkeypatch):
    synced: list[str] = []
    real = checkpoints.fsync_dir

    def record(path):
        synced.append(Path(path).name)
        real(path)

    monkeypatch.setattr(checkpoints, "fsync_dir", record)
    _save(tmp_path, 5)
    assert any(name.startswith(".tmp-step-00000005-") for name in synced), synced


def test_clean_stale_temporaries_removes_what_dead_writers_left(tmp_path):
    from golf_dist.checkpoints import clean_stale_temporaries

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        keep = _save(tmp_path, 1, 20.0)
        (tmp_path / f".tmp-step-00000002-{dead.pid}").mkdir()
        (tmp_path / f".tmp-step-00000002-{dead.pid}" / "model.safetensors").write_bytes(b"partial")
        (tmp_path / f".tmp-step-00000003-{live.pid}").mkdir()  # a live writer's: not touched
        (tmp_path / f".tmp-step-00000004-{os.getpid()}").mkdir()  # this pid at start-up: an earlier run's
        shutil.copytree(keep, tmp_path / f".old-step-00000001-{dead.pid}")  # step-1 is there: goes
        whole = _save(tmp_path, 6, 26.0)
        os.replace(whole, tmp_path / f".old-step-00000006-{dead.pid}")  # killed mid-swap: the only copy
        (tmp_path / f".best.safetensors.tmp-{dead.pid}").write_bytes(b"partial")  # save_weights' temporary
        (tmp_path / "notes.tmp-1").write_text("not ours")
        removed = clean_stale_temporaries(tmp_path)
        assert sorted(p.name for p in removed) == sorted(
            [
                f".tmp-step-00000002-{dead.pid}",
                f".tmp-step-00000004-{os.getpid()}",
                f".old-step-00000001-{dead.pid}",
                f".best.safetensors.tmp-{dead.pid}",
            ]
        )
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            ["step-00000001", "step-00000006", f".tmp-step-00000003-{live.pid}", "notes.tmp-1"]
        )
        assert checkpoints.load_checkpoint(tmp_path / "step-00000006")["state"]["val_psnr"] == 26.0
        assert clean_stale_temporaries(tmp_path / "absent") == []
    finally:
        live.kill()
        live.wait()


# ---------------------------------------------------------------- 4. secrets


@pytest.mark.parametrize(
    "text, shown",
    [
        ("https://user:p@ss/word@host/path", "https://***@host/path"),
        ("https://user:p/ss@host:8443/x", "https://***@host:8443/x"),
        ("postgresql://mlflow:s3cr@t@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
        ("https://u:p?w#d@host/x", "https://***@host/x"),
        ("http://u:pw@127.0.0.1:5000", "http://***@127.0.0.1:5000"),
        (
            "failed: 'https://a:b@h:1/api?x=1' (retry https://c:d@e)",
            "failed: 'https://***@h:1/api?x=1' (retry https://***@e)",
        ),
        ("http://127.0.0.1:5000/api and s3://bucket/key", "http://127.0.0.1:5000/api and s3://bucket/key"),
        ("sqlite:////tmp/a@b/mlflow.db", "sqlite:////tmp/a@b/mlflow.db"),
        ("https://github.com/org/repo@v1", "https://github.com/org/repo@v1"),
    ],
)
def test_redact_hides_passwords_holding_slashes_and_ats(text, shown):
    from golf_dist.tracking import redact

    assert redact(text) == shown
    for secret in ("p@ss/word", "p/ss", "s3cr@t", "p?w#d", ":pw@", "a:b@", "c:d@"):
        assert secret not in redact(text)


def test_redact_config_dict_redacts_every_uri_in_a_nested_config():
    from golf_dist.tracking import redact_config_dict

    cfg = {
        "seed": 1,
        "tracking": {"uri": "https://user:p@ss/word@mlflow.example/", "experiment": "x"},
        "data": {"shards": "s3://key:secret@bucket/set", "crops": [1, 2]},
        "train": {"resume_from": ["runs:/abc/checkpoints", "https://u:pw@h/ck"]},
        "none": None,
    }
    before = copy.deepcopy(cfg)
    out = redact_config_dict(cfg)
    assert out == {
        "seed": 1,
        "tracking": {"uri": "https://***@mlflow.example/", "experiment": "x"},
        "data": {"shards": "s3://***@bucket/set", "crops": [1, 2]},
        "train": {"resume_from": ["runs:/abc/checkpoints", "https://***@h/ck"]},
        "none": None,
    }
    assert cfg == before  # a copy: the config itself keeps its URIs


def test_real_env_files_are_ignored_and_examples_are_not():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(
        [
            "git",
            "check-ignore",
            "infra/mlflow/server.env",
            "infra/mlflow/trainer.env",
            "infra/mlflow/server.env.example",
            "infra/mlflow/trainer.env.example",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert ignored == ["infra/mlflow/server.env", "infra/mlflow/trainer.env"]


# ---------------------------------------------------------------- 6. small things


def test_a_negative_seed_is_refused_by_name():
    from golf_dist.config import load_config
    from golf_dist.configs import DEFAULT_CONFIG

    with pytest.raises(ConfigError, match="'seed'"):
        load_config(DEFAULT_CONFIG, stage="f", overrides=["seed=-1"])
    assert load_config(DEFAULT_CONFIG, stage="f", overrides=["seed=0"]).seed == 0


CLUSTER = ROOT / "infra" / "slurm" / "local_cluster.sh"


def _cluster(*args, path: Path):
    """local_cluster.sh with `path` first on PATH (fake daemons there: nothing real ever starts)."""
    env = {**os.environ, "PATH": f"{path}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    return subprocess.run(
        [shutil.which("bash"), str(CLUSTER), *map(str, args)], capture_output=True, text=True, timeout=60, env=env
    )


@pytest.fixture()
def fake_slurm(tmp_path) -> Path:
    """A folder of SLURM and munge commands that fail at once: found (so nothing is installed), never run."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("local_cluster.sh's ownership checks apply when it runs as root")
    fake = tmp_path / "bin"
    fake.mkdir()
    for daemon in ("slurmctld", "slurmd", "sbatch", "munged", "scancel", "squeue", "sinfo", "scontrol"):
        (fake / daemon).write_text("#!/bin/sh\nexit 1\n")
        (fake / daemon).chmod(0o755)
    return fake


@pytest.mark.parametrize("how", ["other owner", "world-writable", "group-writable"])
def test_local_cluster_refuses_a_folder_root_does_not_own_alone(fake_slurm, tmp_path, how):
    folder = tmp_path / "cluster"
    folder.mkdir(mode=0o755)
    if how == "other owner":
        os.chown(folder, 65534, 65534)
    else:
        folder.chmod(0o777 if how == "world-writable" else 0o775)
    proc = _cluster("start", folder, path=fake_slurm)
    assert proc.returncode == 1, proc.stderr
    assert f"refusing {folder}" in proc.stderr
    assert sorted(os.listdir(folder)) == []  # no config, key or daemon state written


def test_local_cluster_refuses_a_munge_key_or_config_someone_else_planted(fake_slurm, tmp_path):
    folder = tmp_path / "cluster"
    (folder / "munge").mkdir(parents=True)
    (folder / "etc").mkdir()
    for planted in (folder / "munge" / "munge.key", folder / "etc" / "slurm.conf"):
        planted.write_text("theirs")
        os.chown(planted, 65534, 65534)
        proc = _cluster("stop", folder, path=fake_slurm)
        assert proc.returncode == 1 and f"refusing {planted}: owned by uid 65534" in proc.stderr, proc.stderr
        planted.unlink()


def test_local_cluster_creates_the_munge_key_under_umask_077(fake_slurm, tmp_path):
    umask_log = tmp_path / "umask"
    (fake_slurm / "dd").write_text(f'#!/bin/sh\numask > "{umask_log}"\nexec {shutil.which("dd")} "$@"\n')
    (fake_slurm / "dd").chmod(0o755)
    folder = tmp_path / "cluster"
    proc = _cluster("start", folder, path=fake_slurm)  # stops where the (fake) munged fails to start
    assert proc.returncode == 1, proc.stderr  # our munged refused to start
    key = folder / "munge" / "munge.key"
    assert umask_log.read_text().strip() == "0077"
    assert key.stat().st_size == 1024 and stat.S_IMODE(key.stat().st_mode) == 0o400 and key.stat().st_uid == 0
    assert not (folder / "munge" / "munge.key.tmp").exists()
