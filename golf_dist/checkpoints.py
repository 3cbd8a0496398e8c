"""Checkpoints that appear whole or not at all: save, list, load (falling back past corrupt ones), prune.

A checkpoint is a folder `step-00001234/` holding
    model.safetensors   the trained network's weights
    ema.safetensors     their exponential moving average (only with train.ema_decay > 0)
    optimizer.pt        optimizer and LR-scheduler state (tensors and numbers; loaded weights_only)
    rng.pt              torch / numpy / python RNG states
    state.json          step, data position, validation PSNR, MLflow run id ... (written last), and
                        `file_sha256`: every other file of the folder and its sha256
Loading checks each listed file against its digest before reading it (a `.pt` file is never unpickled
when its bytes differ), so a checkpoint altered after it was written (a flipped bit on a disk or in a
bucket, a file replaced in the artifact store) is a DataError naming the file, expected and found
digest: `load_latest` passes over it with a warning, `train.resume_from` stops. A local checkpoint written
before the digests were recorded loads with one warning that nothing was checked; one fetched from
elsewhere (`require_digests`, train.resume_from's artifact URIs) is refused unless train.resume_unverified.
The digests catch corruption, not tampering: whoever can rewrite a file can rewrite state.json too. With
GOLF_CHECKPOINT_KEY set in the environment, state.json also carries `state_hmac_sha256`, an HMAC-SHA256 of
its other keys (the digests included) under that key, and a checkpoint without a valid one is refused
(one without any: loaded with a warning under train.resume_unverified; a wrong one: never).
It is written under a temporary name and renamed into place, so a kill at any moment leaves either the
previous checkpoints or the new one complete, never a half-written folder under a final name. A full
disk removes the partial temporary and raises StorageFullError; what a killed process left under a
temporary name (`.tmp-*`, `.old-*`) is removed by `clean_stale_temporaries` at the next start.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from golf_dist.checkpoint_digests import (
    DIGESTS,
    HMAC,
    UnsignedCheckpointError,
    check_digests_present,
    check_hmac,
    check_weights,
    checkpoint_key,
    recorded_digests,
    state_hmac,
    verify_file,
)
from golf_dist.errors import DataError, raise_if_storage_full
from golf_dist.files import atomic_path, fsync_dir, fsync_file, sha256_file

_NAME = re.compile(r"^step-(\d{8})$")
RESUME = ".resume-"  # train.resume_from's download folders: .resume-<random>-<pid> (golf_dist.training.remote)
PRUNED = ".tmp-pruned-"  # a pruned checkpoint's name until it is deleted (clean_stale_temporaries removes it)


def save_weights(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file atomically (temporary name, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a dot name, not files.tmp_name's: clean_stale_temporaries removes a dead writer's .<name>.tmp-<pid>
    with atomic_path(path, tmp=path.with_name(f".{path.name}.tmp-{os.getpid()}")) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
    return path


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors weights file; a missing or corrupt file is a DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"weights file {path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise DataError(f"weights file {path} is not a readable safetensors file: {err}") from None


def load_into(module: torch.nn.Module, path: Path, what: str) -> torch.nn.Module:
    """Load a weights file into `module`; a file made for another network is a DataError naming it."""
    try:
        module.load_state_dict(load_weights(path))
    except RuntimeError as err:  # missing / unexpected keys, shape mismatches
        first = str(err).strip().splitlines()
        raise DataError(f"weights file {path} does not fit {what}: {' '.join(first[:2])[:300]}") from None
    return module


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_rest": torch.tensor([np_state[2], np_state[3]], dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_state[4]], dtype=torch.float64),
        "python": torch.tensor(random.getstate()[1], dtype=torch.int64),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    rest = state["numpy_rest"].tolist()
    np.random.set_state(
        ("MT19937", state["numpy_keys"].numpy().astype(np.uint32), rest[0], rest[1], float(state["numpy_gauss"][0]))
    )
    random.setstate((3, tuple(state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def save_checkpoint(
    root: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
    ema_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint `root/step-<step>` atomically and return its path."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        names = ["model.safetensors", "optimizer.pt", "rng.pt", "state.json"]
        save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
        if ema_state is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in ema_state.items()}, str(tmp / "ema.safetensors"))
            names.append("ema.safetensors")
        # through a Python file: torch.save to a path hides the OSError (ENOSPC) behind a bare RuntimeError
        for name, obj in (("optimizer.pt", optimizer_state), ("rng.pt", rng_state())):
            with open(tmp / name, "wb") as fh:
                torch.save(obj, fh)
        digests = {name: sha256_file(tmp / name) for name in sorted(names) if name != "state.json"}
        record = {**state, "step": step, DIGESTS: digests}
        key = checkpoint_key()
        if key is not None:
            record[HMAC] = state_hmac(record, key)
        (tmp / "state.json").write_text(json.dumps(record, indent=2, sort_keys=True))
        for name in names:
            fsync_file(tmp / name)
        fsync_dir(tmp)  # the folder's entries are on disk before its new name is
        if final.exists():  # the same step saved again (after a resume): swap, never delete first
            old = root / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old, final)
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise_if_storage_full(err, final)
        raise
    fsync_dir(root)
    return final


def is_checkpoint_name(name: str) -> bool:
    """A checkpoint folder's name: step-XXXXXXXX."""
    return bool(_NAME.match(name))


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first (temporary folders are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads((Path(path) / "state.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"checkpoint {path}: state.json is unreadable: {err}") from None
    if not isinstance(state, dict):
        raise DataError(f"checkpoint {path}: state.json is unreadable: a JSON {type(state).__name__}, not an object")
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise DataError(f"checkpoint {path}: state.json's step is {step!r}, not a step number (damaged or altered)")
    return state


def load_checkpoint(path: Path, *, require_digests: bool = False, allow_unverified: bool = False) -> dict[str, Any]:
    """Load one checkpoint folder; any unreadable part, or a file that differs from the sha256 state.json
    records for it, is a DataError naming the file. Every file is checked before any is read.

    `require_digests` (a checkpoint fetched from elsewhere): one whose state.json records no digests is
    refused unless `allow_unverified` (train.resume_unverified). With GOLF_CHECKPOINT_KEY set, state.json's
    HMAC is checked first (see the module doc)."""
    path = Path(path)
    state = read_state(path)
    key = checkpoint_key()
    if key is not None:
        check_hmac(path, state, key, allow_unverified)
    digests = recorded_digests(path, state)
    check_digests_present(path, digests, require_digests, allow_unverified)
    names = ["model.safetensors", "optimizer.pt", "rng.pt"]
    if (path / "ema.safetensors").exists() or (digests is not None and "ema.safetensors" in digests):
        names.append("ema.safetensors")
    for name in names:
        verify_file(path, name, digests)
    if digests is None:
        warnings.warn(
            f"checkpoint {path} records no sha256 of its files (written by an older golf-dist): loaded "
            "without an integrity check",
            stacklevel=2,
        )
    model = load_weights(path / "model.safetensors")
    loaded = {}
    for name in ("optimizer", "rng"):
        file = path / f"{name}.pt"
        try:
            loaded[name] = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for a damaged pickle/zip
            raise DataError(f"checkpoint file {file} is unreadable: {err}") from None
    ema = load_weights(path / "ema.safetensors") if "ema.safetensors" in names else None
    return {"model": model, "ema": ema, "optimizer": loaded["optimizer"], "rng": loaded["rng"], "state": state}


def _exported_file(path: Path) -> Path:
    ema = Path(path) / "ema.safetensors"
    return ema if ema.exists() else Path(path) / "model.safetensors"


def exported_weights(path: Path) -> dict[str, torch.Tensor]:
    """The weights a checkpoint stands for: the EMA when it has one (what validation scored), else the model;
    checked against the sha256 its state.json records."""
    file = _exported_file(path)
    return load_weights(verify_file(file.parent, file.name, recorded_digests(file.parent, read_state(file.parent))))


def _check_exported(path: Path) -> None:
    """DataError naming the file unless checkpoint `path`'s exported weights are whole and match their digest."""
    file = _exported_file(path)
    digests = recorded_digests(path, read_state(path))
    verify_file(path, file.name, digests)
    if digests is None:
        check_weights(file)


def load_latest(root: Path, allow_unverified: bool = False) -> dict[str, Any] | None:
    """The newest checkpoint that loads; a corrupt newer one is reported and skipped, not trusted."""
    for path in reversed(list_checkpoints(root)):
        try:
            ckpt = load_checkpoint(path, allow_unverified=allow_unverified)
        except UnsignedCheckpointError:
            raise
        except DataError as err:
            warnings.warn(f"{err}; falling back to the previous checkpoint", stacklevel=2)
            continue
        ckpt["path"] = path
        return ckpt
    return None


def best_checkpoint(root: Path, key: str = "val_psnr") -> Path | None:
    """The checkpoint with the highest `key` in its state.json whose exported weights are whole (None when
    none records it). An unreadable checkpoint is skipped with one warning, not raised: prune calls this
    after every save and the trainer exports the result at the end, so one damaged folder must stop neither.
    """
    damaged: list[str] = []
    scored = []
    for path in list_checkpoints(root):
        try:
            score = read_state(path).get(key)
        except DataError as err:
            damaged.append(str(err))
            continue
        if isinstance(score, (int, float)) and not isinstance(score, bool) and score == score:  # not NaN
            scored.append((score, path))
    best = None
    for _, path in sorted(scored, key=lambda sp: sp[0], reverse=True):  # stable: the oldest of equals first
        try:
            _check_exported(path)
        except DataError as err:
            damaged.append(str(err))
            continue
        best = path
        break
    if damaged:
        warnings.warn(f"skipping {len(damaged)} unreadable checkpoint(s): {'; '.join(damaged)}", stacklevel=2)
    return best


def prune(root: Path, keep_last: int, key: str = "val_psnr") -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints and the best by `key`; return what went.

    Damaged checkpoints are judged like any other by their names (best_checkpoint skips them with a
    warning): an old damaged one goes, a recent one stays for load_latest to report and pass over."""
    root = Path(root)
    all_ckpts = list_checkpoints(root)
    keep = set(all_ckpts[-keep_last:])
    best = best_checkpoint(root, key)
    if best is not None:
        keep.add(best)
    removed = [p for p in all_ckpts if p not in keep]
    # renamed first, deleted after: a kill mid-delete leaves a temporary that clean_stale_temporaries removes,
    # not a half-deleted step-N that is neither listed nor cleaned
    doomed = [root / f"{PRUNED}{p.name}-{os.getpid()}" for p in removed]
    for path, temporary in zip(removed, doomed):
        os.replace(path, temporary)
    if removed:
        fsync_dir(root)
    for temporary in doomed:
        shutil.rmtree(temporary)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except (OverflowError, OSError):
        return False
    return True


def clean_stale_temporaries(root: Path) -> list[Path]:
    """Remove what killed or failed writers left in `root`: `.tmp-*` checkpoint folders (`.tmp-pruned-*`: ones
    prune was deleting), `.old-*` swapped-out checkpoints, `.resume-*` downloads of train.resume_from and
    `.<name>.tmp-*` weights files whose owning process (the pid after the last '-') is
    gone; return what went. An `.old-step-N-<pid>` whose `step-N` is missing (killed mid-swap) holds the
    only whole copy of that step: it is renamed back, not removed.

    Call it at start-up, before this process writes anything there (the trainer's main rank): an entry
    named with this process's own pid is then from an earlier run whose pid repeated (containers)."""
    root = Path(root)
    if not root.is_dir():
        return []
    removed, restored = [], False
    for entry in sorted(root.iterdir()):
        name = entry.name
        if not (name.startswith((".tmp-", ".old-", RESUME)) or (name.startswith(".") and ".tmp-" in name)):
            continue
        pid = name.rsplit("-", 1)[-1]
        if not pid.isdigit() or (int(pid) != os.getpid() and _pid_alive(int(pid))):
            continue
        if name.startswith(".old-"):
            final = root / name[len(".old-") :].rsplit("-", 1)[0]
            if _NAME.match(final.name) and entry.is_dir() and not final.exists():
                os.replace(entry, final)
                restored = True
                continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    if removed or restored:
        fsync_dir(root)
    return removed
