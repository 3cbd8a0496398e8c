"""Resume from a checkpoint that lives elsewhere: a local folder, or an MLflow artifact URI.

`train.resume_from` accepts
    /path/to/DIR/f/checkpoints/step-00000300     a checkpoint folder
    /path/to/DIR/f/checkpoints                   a checkpoints folder (its newest loadable checkpoint)
    runs:/<run_id>/checkpoints/step-00000300     a run's artifact (tracking.uri / MLFLOW_TRACKING_URI says where)
    mlflow-artifacts:/<...>/artifacts/checkpoints/step-00000300   (through the tracking server's proxy)
    s3://bucket/prefix/.../checkpoints/step-00000300              (needs S3 credentials, MLFLOW_S3_ENDPOINT_URL
                                                                    for an S3-compatible store)
An artifact URI is downloaded (MLflow's own downloader) into a temporary folder under the stage's
directory, verified and loaded with `checkpoints.load_checkpoint` (every file checked against the sha256
its state.json records, then read; a damaged or altered one is an error naming it, before any training),
then the download is removed: the resumed run writes its own checkpoints.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from golf_dist.checkpoints import list_checkpoints, load_checkpoint, load_latest
from golf_dist.errors import DataError
from golf_dist.tracking import bound_http_retries, redact, resolve_uri

_FILES = ("state.json", "model.safetensors", "optimizer.pt", "rng.pt")


def is_remote(uri: str) -> bool:
    """An artifact URI (scheme://, runs:/, mlflow-artifacts:/, models:/) rather than a local path."""
    return ":/" in uri and not uri.startswith("file:")


def _load_local(path: Path, shown: str) -> dict[str, Any]:
    if not path.exists():
        raise DataError(f"train.resume_from={shown}: {path} does not exist")
    if (path / "state.json").is_file():
        missing = [name for name in _FILES if not (path / name).is_file()]
        if missing:
            raise DataError(f"train.resume_from={shown}: checkpoint {path} lacks {', '.join(missing)}")
        try:
            ckpt = load_checkpoint(path)
        except DataError as err:
            raise DataError(f"train.resume_from={shown}: {err}") from None
        ckpt["path"] = path
        return ckpt
    if list_checkpoints(path):
        ckpt = load_latest(path)
        if ckpt is not None:
            return ckpt
        raise DataError(f"train.resume_from={shown}: no checkpoint under {path} loads (all damaged)")
    raise DataError(
        f"train.resume_from={shown}: {path} is neither a checkpoint folder (step-XXXXXXXX with state.json) "
        "nor a folder of checkpoints"
    )


def load_resume_checkpoint(uri: str, scratch_dir: Path, tracking_uri: str | None) -> dict[str, Any]:
    """Load the checkpoint `uri` names (see the module doc); errors name the URI. ckpt["path"] is `uri`."""
    shown = redact(uri)
    if not is_remote(uri):
        local = Path(uri[len("file://"):] if uri.startswith("file://") else uri).expanduser()
        return _load_local(local, shown)

    import mlflow
    from mlflow.exceptions import MlflowException

    bound_http_retries()  # a dead server fails in seconds, not minutes
    scratch_dir = Path(scratch_dir)
    scratch_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".resume-", dir=scratch_dir))
    try:
        try:
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=uri, dst_path=str(tmp), tracking_uri=resolve_uri(tracking_uri)
                )
            )
        except (MlflowException, OSError, ValueError) as err:
            raise DataError(f"train.resume_from={shown}: cannot download it: {redact(str(err))[:400]}") from None
        except Exception as err:  # boto3/botocore and requests raise their own types
            raise DataError(
                f"train.resume_from={shown}: cannot download it ({type(err).__name__}: {redact(str(err))[:400]})"
            ) from None
        if not local.is_dir():
            raise DataError(f"train.resume_from={shown} is a single file, not a checkpoint folder")
        ckpt = _load_local(local, shown)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ckpt["path"] = shown
    return ckpt
