"""What makes a checkpoint trusted: the sha256 of each of its files that state.json records (`file_sha256`),
and, with GOLF_CHECKPOINT_KEY set, an HMAC of state.json itself (`state_hmac_sha256`). Used by
golf_dist.checkpoints, which documents what a checkpoint holds and how loading uses these checks.

The digests catch corruption, not tampering: whoever can rewrite a file can rewrite state.json and its
digests too. The HMAC, keyed by a secret the writer and the reader hold in their environment (never
logged or written), is what tells a checkpoint altered by someone without the key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from golf_dist.errors import DataError
from golf_dist.files import sha256_file


class UnsignedCheckpointError(DataError):
    """A checkpoint without an HMAC while GOLF_CHECKPOINT_KEY is set: load_latest stops on it rather than
    passing over every checkpoint of a run that was started without the key (and training from step 0)."""


DIGESTS = "file_sha256"  # the state.json key: {file name: sha256 hex digest} of the folder's other files
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
KEY_ENV = "GOLF_CHECKPOINT_KEY"  # the HMAC key's environment variable (its value is never logged or written)
HMAC = "state_hmac_sha256"  # the state.json key: HMAC-SHA256 of state.json's other keys under that key


def checkpoint_key() -> bytes | None:
    """The HMAC key GOLF_CHECKPOINT_KEY holds (None when unset or empty)."""
    key = os.environ.get(KEY_ENV, "")
    return key.encode() if key else None


def state_hmac(state: dict[str, Any], key: bytes) -> str:
    """HMAC-SHA256 of `state` without its HMAC field, over its canonical JSON (sorted keys, no spaces)."""
    body = json.dumps({k: v for k, v in state.items() if k != HMAC}, sort_keys=True, separators=(",", ":"))
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


def check_hmac(path: Path, state: dict[str, Any], key: bytes, allow_unverified: bool) -> None:
    """DataError naming state.json unless it carries a valid HMAC under `key`; a missing one passes with a
    warning under `allow_unverified` (train.resume_unverified), a wrong one never."""
    file = Path(path) / "state.json"
    recorded = state.get(HMAC)
    if recorded is None:
        if allow_unverified:
            warnings.warn(
                f"checkpoint {path}: {file} carries no {HMAC} although {KEY_ENV} is set: loaded "
                "unverified (train.resume_unverified=true)",
                stacklevel=3,
            )
            return
        raise UnsignedCheckpointError(
            f"checkpoint file {file} carries no {HMAC} although {KEY_ENV} is set: not signed with the key, so "
            "not trusted (written without the key, or its HMAC removed); train.resume_unverified=true loads it"
        )
    if not isinstance(recorded, str) or not hmac.compare_digest(recorded, state_hmac(state, key)):
        raise DataError(
            f"checkpoint file {file}: its {HMAC} does not match (altered after it was written, or signed with "
            f"another {KEY_ENV})"
        )


def recorded_digests(path: Path, state: dict[str, Any]) -> dict[str, str] | None:
    """The {file name: sha256} that checkpoint `path`'s state.json records; None for a checkpoint written
    before digests were recorded; a DataError naming state.json when the record is malformed."""
    digests = state.get(DIGESTS)
    if digests is None:
        return None
    if (
        not isinstance(digests, dict)
        or not digests
        or not all(
            isinstance(name, str)
            and name not in ("", ".", "..", "state.json")
            and "/" not in name
            and "\\" not in name
            and isinstance(value, str)
            and _HEX64.match(value)
            for name, value in digests.items()
        )
    ):
        raise DataError(
            f"checkpoint {path}: state.json's {DIGESTS} is not a map of the folder's file names to sha256 "
            "hex digests (damaged or altered)"
        )
    return digests


def verify_file(path: Path, name: str, digests: dict[str, str] | None) -> Path:
    """`path/name` after checking it against its recorded sha256 (no check when `digests` is None: an
    older checkpoint). Missing, unlisted or different: a DataError naming the file. A safetensors file
    that differs because it is torn says so in the words load_weights uses (its header is read, never
    its data); a differing `.pt` file is not opened at all."""
    file = Path(path) / name
    if digests is None:
        return file
    if name not in digests:
        raise DataError(
            f"checkpoint file {file} is not listed in {Path(path) / 'state.json'} {DIGESTS} (added or "
            "renamed after the checkpoint was written): not trusted"
        )
    expected = digests[name]
    if not file.is_file():
        raise DataError(f"checkpoint file {file} is missing (state.json records it with sha256 {expected})")
    try:
        found = sha256_file(file)
    except OSError as err:
        raise DataError(f"checkpoint file {file} is unreadable: {err}") from None
    if found != expected:
        if name.endswith(".safetensors"):
            check_weights(file)  # a torn file: the same message as without digests
        raise DataError(
            f"checkpoint file {file} does not match the sha256 its state.json records (expected {expected}, "
            f"found {found}): damaged or altered after it was written"
        )
    return file


def check_digests_present(
    path: Path, digests: dict[str, str] | None, require_digests: bool, allow_unverified: bool
) -> None:
    """A checkpoint fetched from elsewhere (`require_digests`) without digests: a DataError naming its
    state.json, unless `allow_unverified` (train.resume_unverified)."""
    if digests is None and require_digests and not allow_unverified:
        raise DataError(
            f"checkpoint file {Path(path) / 'state.json'} records no {DIGESTS}: its files cannot be checked, and "
            "whoever can write the store could have replaced them; train.resume_unverified=true loads it anyway"
        )


def check_weights(path: Path) -> None:
    """DataError naming `path` unless it is a whole safetensors file (its header and size; no data read)."""
    if not path.is_file():
        raise DataError(f"weights file {path} does not exist")
    try:
        with safe_open(str(path), "pt") as fh:
            fh.keys()
    except (SafetensorError, OSError, ValueError) as err:
        raise DataError(f"weights file {path} is not a readable safetensors file: {err}") from None
