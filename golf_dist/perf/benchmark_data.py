"""The data path's benchmark: the paired crops per second each loader delivers from shard folders (one per
format, say), every (folder, loader) in interleaved rounds, the median reported."""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from golf_dist.errors import ConfigError, GolfError
from golf_dist.perf.benchmark import _sync, device_name

DATA_LOADERS = ("torch", "dali")


@dataclass
class DataSettings:
    """What one data benchmark does: every loader over every shard folder, the same crops and batch."""

    shards: tuple[str, ...]
    loaders: tuple[str, ...] = DATA_LOADERS
    device: str = "cpu"  # where the crops are delivered: cpu, or cuda (DALI then decodes jp2 on the GPU)
    split: str = "train"
    crop: int = 256
    batch: int = 16
    crops_per_frame: int = 1
    batches: int = 20  # timed batches per (folder, loader)
    warmup: int = 3
    repeats: int = 3  # rounds over every (folder, loader), interleaved; the median is reported
    workers: int | None = None  # torch loader processes = DALI threads; default: every CPU


def make_data_settings(shards: list[str], loader: str | None = None, device: str = "cpu", **overrides) -> DataSettings:
    """DataSettings from the command line; device gpu means cuda."""
    if not shards:
        raise ConfigError("--what data needs --shards DIR (one or more shard folders)")
    device = "cuda" if device == "gpu" else device
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device {device!r}: use cpu or gpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise GolfError("--device gpu: no CUDA device is visible to torch")
    if loader is not None and loader not in DATA_LOADERS:
        raise ConfigError(f"--loader must be one of {', '.join(DATA_LOADERS)}, got {loader!r}")
    s = DataSettings(
        tuple(shards),
        (loader,) if loader else DATA_LOADERS,
        device,
        **{k: v for k, v in overrides.items() if v is not None},
    )
    for name in ("crop", "batch", "crops_per_frame", "batches", "repeats"):
        if getattr(s, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(s, name)}")
    if s.batch % s.crops_per_frame:
        raise ConfigError(f"--crops-per-frame {s.crops_per_frame} must divide --batch {s.batch}")
    if s.workers is None:
        s.workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return s


def _data_rate(s: DataSettings, shard_dir: str, loader: str) -> dict:
    """Crop pairs per second one loader delivers from one shard folder onto s.device."""
    from golf_dist.config import load_config
    from golf_dist.configs import PAPER_CONFIG
    from golf_dist.data.loaders import make_train_loader, resolve_loader
    from golf_dist.data.split_check import open_pairs

    pairs = open_pairs(shard_dir, s.split)
    if loader == "dali":
        resolve_loader("dali")  # a clear ConfigError when DALI does not import
    cfg = load_config(
        PAPER_CONFIG,
        "f",
        [
            f"data.shards={shard_dir}",
            f"data.crop={s.crop}",
            f"data.num_workers={s.workers}",
            f"data.crops_per_frame={s.crops_per_frame}",
            f"train.steps={s.warmup + s.batches + 1}",
        ],
    )
    device = torch.device(s.device)
    batches = make_train_loader(
        cfg, pairs, global_batch=s.batch, accum=1, world=1, rank=0, start_step=0, device=device, loader=loader
    )
    for _ in range(s.warmup):
        blur, sharp = next(batches)
    _sync(s.device)
    t0 = time.perf_counter()
    for _ in range(s.batches):
        blur, sharp = next(batches)
        blur, sharp = blur.to(device, non_blocking=True), sharp.to(device, non_blocking=True)
    _sync(s.device)
    elapsed = time.perf_counter() - t0
    batches.close()  # its worker processes or pipeline threads end before the next measurement starts
    frame = pairs.frame_size
    return {
        "shards": shard_dir,
        "format": pairs.checked.fmt,
        "loader": loader,
        "frame": f"{frame[1]}x{frame[0]}" if frame else "mixed",
        "pairs_per_s": round(s.batches * s.batch / elapsed, 2),
    }


def run_data_benchmark(s: DataSettings) -> dict:
    """pairs_per_s of (blur, sharp) crop pairs delivered, per shard folder (format) and loader, as one dict."""
    import gc

    # Rounds interleave the measurements, so a change in the machine's load hits every figure alike; each
    # measurement builds its loader afresh (no batches prefetched while another loader was being timed).
    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(s.repeats):
        for shard_dir in s.shards:
            for loader in s.loaders:
                runs.setdefault((shard_dir, loader), []).append(_data_rate(s, shard_dir, loader))
                gc.collect()
    results = []
    for rounds in runs.values():
        rates = [r["pairs_per_s"] for r in rounds]
        results.append({**rounds[0], "pairs_per_s": round(statistics.median(rates), 2), "rounds": rates})
    return {
        "what": "data",
        "device": device_name(s.device),
        "machine": platform.node(),
        "cpu": device_name("cpu"),
        "torch": torch.__version__,
        "dali": _dali_version(),
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items()},
        "pairs_per_s": {f"{r['format']}/{r['loader']}": r["pairs_per_s"] for r in results},
        "results": results,
    }


def _dali_version() -> str | None:
    try:
        import nvidia.dali

        return nvidia.dali.__version__
    except Exception:  # not installed or broken: the torch figures still stand
        return None
