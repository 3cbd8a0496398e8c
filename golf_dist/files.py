"""Files written whole or not at all, and their digests: the one place the temporary-name + fsync + rename
pattern is written.

`atomic_path(path)` hands a writer a temporary name in the same folder (so the rename cannot cross file
systems); when the writer is done the file is fsynced, renamed over `path` and the folder fsynced, so after a
crash `path` holds the old bytes or the new, never part of them. On any error the temporary is removed, and a
full disk (ENOSPC, EDQUOT) becomes a StorageFullError naming `path`. `write_atomic` does this for bytes in
memory. `install_folders` does it for a tree of files (the synthetic set's splits). `sha256_file` is the
SHA-256 the manifests and checkpoints record.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path

from golf_dist.errors import raise_if_storage_full


def tmp_name(path: Path) -> Path:
    """A temporary name beside `path`, unique per host and process (shared file systems included)."""
    return path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    """The folder's entries (a new or renamed name in it) on disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path, tmp: Path | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path` (`tmp`: a writer's own name for it, in the same folder) for the
    writer to fill; then fsync, rename to `path`, fsync the folder. On an error the temporary is removed."""
    path = Path(path)
    tmp = tmp_name(path) if tmp is None else Path(tmp)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        raise_if_storage_full(err, path)
        raise
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def fsync_tree(folder: Path) -> None:
    """Every file under `folder` and every folder's entries on disk (before the tree is renamed into place)."""
    for root, _dirs, names in os.walk(folder):
        for name in names:
            fsync_file(Path(root) / name)
        fsync_dir(Path(root))


def install_folders(staged: Path, out: Path, names: Sequence[str]) -> None:
    """Put the folders `names`, made under `staged` (a temporary folder beside `out`), in place under `out`:
    the staged tree is fsynced first; a new `out` is `staged` renamed in one step; an existing one gets each
    folder by rename, the old folder moved into `staged` first (deleted with it by the caller), so the old
    data goes only once the new is in."""
    fsync_tree(staged)
    if not out.exists():
        os.replace(staged, out)
        fsync_dir(out.parent)
        return
    for name in names:
        if (out / name).exists():
            os.replace(out / name, staged / f"old-{name}")
        os.replace(staged / name, out / name)
    fsync_dir(out)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` whole or not at all (a full disk: StorageFullError, the temporary removed)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
