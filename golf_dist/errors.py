"""Errors that are the user's to fix: shown as one clear message and a non-zero exit, no traceback."""

import errno
import os
import shutil


class GolfError(Exception):
    """Bad input (a file, shard, or config key): the message says what, where, and what to do."""

    exit_code = 1


class ConfigError(GolfError):
    """An unknown config key, a wrong type or an impossible value: exit status 2, before any work."""

    exit_code = 2


class DataError(GolfError):
    """Missing, mismatched or undecodable data: the message names the file or shard."""


class TrackingError(GolfError):
    """The MLflow store could not do what the command was asked to do there (register a model)."""


class StorageFullError(DataError):
    """The disk (or the quota) ran out while writing: the partial temporary is already removed, and the
    message names the path and the space left, so the user knows where to free space."""


def storage_full(err: BaseException, path) -> StorageFullError | None:
    """A StorageFullError naming `path` when `err` (or an error it wraps) is ENOSPC/EDQUOT, else None.

    torch and safetensors wrap the OSError (a RuntimeError whose context is it, or only its message), so
    the whole chain and the message are looked at."""
    full = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
    texts = ("No space left on device", "Disk quota exceeded", f"(os error {errno.ENOSPC})")
    seen, cause = set(), err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if (isinstance(cause, OSError) and cause.errno in full) or any(text in str(cause) for text in texts):
            break
        cause = cause.__cause__ or cause.__context__
    else:
        return None
    where = os.path.abspath(path)
    probe = where
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        usage = shutil.disk_usage(probe)
        space = f"{usage.free / 1e6:.1f} MB free of {usage.total / 1e6:.1f} MB"
    except OSError:
        space = "free space unknown"
    return StorageFullError(
        f"no space left while writing {where} ({space} on its file system); the partial file was removed: "
        "free some space there (old runs, checkpoints, shard caches) or write somewhere else"
    )


def raise_if_storage_full(err: BaseException, path) -> None:
    """Raise the StorageFullError naming `path` (from None) when `err` is a full disk; else return, so the
    caller re-raises `err` as it was."""
    full = storage_full(err, path)
    if full is not None:
        raise full from None
