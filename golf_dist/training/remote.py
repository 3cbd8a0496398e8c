"""Resume from a checkpoint that lives elsewhere: a local folder, or an MLflow artifact URI.

`train.resume_from` accepts
    /path/to/DIR/f/checkpoints/step-00000300     a checkpoint folder
    /path/to/DIR/f/checkpoints                   a checkpoints folder (its newest loadable checkpoint)
    runs:/<run_id>/checkpoints/step-00000300     a run's artifact (tracking.uri / MLFLOW_TRACKING_URI says where)
    mlflow-artifacts:/<...>/artifacts/checkpoints/step-00000300   (through the tracking server's proxy)
    s3://bucket/prefix/.../checkpoints/step-00000300              (needs S3 credentials, MLFLOW_S3_ENDPOINT_URL
                                                                    for an S3-compatible store)
A folder of checkpoints means its newest one, exactly: one that is damaged or altered is an error, not
passed over for an older one. An artifact URI is listed first, and only the checkpoint to load is
downloaded (MLflow's own downloader) into a temporary folder `.resume-*` under the stage's directory,
verified and loaded with `checkpoints.load_checkpoint` (every file checked against the sha256 its
state.json records, then read; a damaged or altered one is an error naming it, before any training),
then the download is removed: the resumed run writes its own checkpoints. A remote checkpoint whose
state.json records no digests is refused unless train.resume_unverified (`allow_unverified`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from golf_dist.checkpoints import RESUME, is_checkpoint_name, list_checkpoints, load_checkpoint
from golf_dist.errors import DataError
from golf_dist.tracking import bound_http_retries, redact, resolve_uri

_FILES = ("state.json", "model.safetensors", "optimizer.pt", "rng.pt")


def is_remote(uri: str) -> bool:
    """An artifact URI (scheme://, runs:/, mlflow-artifacts:/, models:/) rather than a local path."""
    return ":/" in uri and not uri.startswith("file:")


def _load_local(path: Path, shown: str, *, remote: bool = False, allow_unverified: bool = False) -> dict[str, Any]:
    if not path.exists():
        raise DataError(f"train.resume_from={shown}: {path} does not exist")
    if not (path / "state.json").is_file():
        found = list_checkpoints(path)
        if not found:
            raise DataError(
                f"train.resume_from={shown}: {path} is neither a checkpoint folder (step-XXXXXXXX with state.json) "
                "nor a folder of checkpoints"
            )
        path = found[-1]  # an explicit resume point: the newest, or an error (never an older one instead)
    missing = [name for name in _FILES if not (path / name).is_file()]
    if missing:
        raise DataError(f"train.resume_from={shown}: checkpoint {path} lacks {', '.join(missing)}")
    try:
        ckpt = load_checkpoint(path, require_digests=remote, allow_unverified=allow_unverified)
    except DataError as err:
        raise DataError(f"train.resume_from={shown}: {err}") from None
    ckpt["path"] = ckpt["source"] = path
    return ckpt


def load_resume_checkpoint(
    uri: str, scratch_dir: Path, tracking_uri: str | None, *, allow_unverified: bool = False
) -> dict[str, Any]:
    """Load the checkpoint `uri` names (see the module doc); errors name the URI. ckpt["source"] is the
    checkpoint itself (a folder of checkpoints: its newest), to load again; ckpt["path"] the same, redacted."""
    shown = redact(uri)
    if not is_remote(uri):
        local = Path(uri[len("file://") :] if uri.startswith("file://") else uri).expanduser()
        ckpt = _load_local(local, shown, allow_unverified=allow_unverified)
        ckpt["path"] = ckpt["source"] = str(ckpt["source"])
        return ckpt

    import mlflow

    bound_http_retries()  # a dead server fails in seconds, not minutes
    tracking = resolve_uri(tracking_uri)
    exact = _remote_checkpoint(uri, shown, tracking)
    scratch_dir = Path(scratch_dir)
    scratch_dir.mkdir(parents=True, exist_ok=True)
    # named with this pid, so that clean_stale_temporaries removes it once this process is gone (killed mid-download)
    tmp = Path(tempfile.mkdtemp(prefix=RESUME, suffix=f"-{os.getpid()}", dir=scratch_dir))
    try:
        local = Path(
            _mlflow_call(
                shown,
                "download",
                mlflow.artifacts.download_artifacts,
                artifact_uri=exact,
                dst_path=str(tmp),
                tracking_uri=tracking,
            )
        )
        if not local.is_dir():
            raise DataError(f"train.resume_from={shown} is a single file, not a checkpoint folder")
        try:
            ckpt = _load_local(local, shown, remote=True, allow_unverified=allow_unverified)
        except DataError as err:  # name the file by its place in the store, not by the temporary download
            raise DataError(str(err).replace(str(local), redact(exact))) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ckpt["path"], ckpt["source"] = redact(exact), exact
    return ckpt


def _remote_checkpoint(uri: str, shown: str, tracking: str) -> str:
    """The checkpoint artifact URI `uri` names: itself when it holds a state.json, else its newest
    step-XXXXXXXX (listed, not downloaded)."""
    import mlflow

    entries = _mlflow_call(shown, "list", mlflow.artifacts.list_artifacts, artifact_uri=uri, tracking_uri=tracking)
    names = {Path(entry.path).name: entry.is_dir for entry in entries or []}
    if not names:
        raise DataError(f"train.resume_from={shown}: nothing there (no such checkpoint, or an empty folder)")
    if names.get("state.json") is False:
        return uri
    steps = sorted(name for name, is_dir in names.items() if is_dir and is_checkpoint_name(name))
    if not steps:
        raise DataError(
            f"train.resume_from={shown} is neither a checkpoint (step-XXXXXXXX with state.json) "
            "nor a folder of checkpoints"
        )
    return f"{uri.rstrip('/')}/{steps[-1]}"


def _mlflow_call(shown: str, what: str, fn, **kwargs):
    """fn(**kwargs); any failure a DataError naming the URI (credentials removed)."""
    from mlflow.exceptions import MlflowException

    try:
        return fn(**kwargs)
    except (MlflowException, OSError, ValueError) as err:
        raise DataError(f"train.resume_from={shown}: cannot {what} it: {redact(str(err))[:400]}") from None
    except Exception as err:  # boto3/botocore and requests raise their own types
        raise DataError(
            f"train.resume_from={shown}: cannot {what} it ({type(err).__name__}: {redact(str(err))[:400]})"
        ) from None
