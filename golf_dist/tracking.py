"""MLflow tracking, from the main process only, and never the reason a run stops.

With no server, runs go to a local SQLite store (default `sqlite:///mlflow.db` in the working
directory, artifacts in `mlartifacts/` beside it) that `mlflow ui --backend-store-uri ...` opens.
`MLFLOW_TRACKING_URI` wins over the config's `tracking.uri`. If the tracking server cannot be reached
mid-run, training goes on: the first failure warns once, failures are counted and reported at the end.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

_MAX_PARAM_LEN = 6000  # MLflow's limit on a param value


def resolve_uri(config_uri: str | None) -> str:
    """MLFLOW_TRACKING_URI, else the config's, else ./mlflow.db; relative SQLite paths made absolute."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or config_uri or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    elif "://" not in uri and not uri.startswith("databricks"):
        uri = Path(uri).resolve().as_uri()  # a plain folder: a file store
    return uri


def local_artifact_root(uri: str) -> str | None:
    """Artifacts beside a local SQLite store, so the whole store is one movable folder."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
    return None


class Tracker:
    """A thin MLflow run. On non-main ranks (`enabled=False`) every call does nothing."""

    def __init__(self, enabled: bool, uri: str | None, experiment: str):
        self.enabled = enabled
        self.failures = 0
        self._warned = False
        self.run_id: str | None = None
        self.uri = resolve_uri(uri) if enabled else None
        self.experiment = experiment
        self._client = None

    # -- guarded calls --------------------------------------------------------------------
    def _call(self, what: str, fn, *args, **kwargs) -> Any:
        if not self.enabled or self._client is None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # any tracking failure: count it, warn once, keep training
            self.failures += 1
            if not self._warned:
                self._warned = True
                print(
                    f"warning: MLflow call '{what}' failed ({type(err).__name__}: {str(err)[:200]}); "
                    "training goes on, local checkpoints are kept; further failures are counted",
                    file=sys.stderr,
                    flush=True,
                )
            return None

    def start(self, run_name: str, resume_run_id: str | None = None, tags: dict[str, str] | None = None) -> None:
        """Start (or continue, after a resume) the MLflow run."""
        if not self.enabled:
            return
        import mlflow
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self.uri)

        def _start() -> str:
            exp = self._client.get_experiment_by_name(self.experiment)
            exp_id = (
                exp.experiment_id
                if exp is not None
                else self._client.create_experiment(self.experiment, artifact_location=local_artifact_root(self.uri))
            )
            if resume_run_id:
                try:
                    self._client.update_run(resume_run_id, status="RUNNING")
                    return resume_run_id
                except mlflow.exceptions.MlflowException:
                    pass  # run gone (another store): start a new one
            run = self._client.create_run(exp_id, run_name=run_name, tags=tags or {})
            return run.info.run_id

        self.run_id = self._call("start run", _start)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in params.items()]
        for i in range(0, len(items), 90):  # log_batch takes at most 100 params
            self._call("log params", self._client_call, "log_batch", params=items[i : i + 90])

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self._call("set tag", self._client_call, "set_tag", key=key, value=str(value))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._call("log metrics", self._client_call, "log_batch", metrics=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call("log artifact", self._client_call, "log_artifact", local_path=str(path), artifact_path=artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call("log text", self._client_call, "log_text", text=text, artifact_file=artifact_file)

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        """HxWx3 uint8 written as PNG."""
        if not self.enabled:
            return
        from PIL import Image

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            Image.fromarray(image).save(path)
            self.log_artifact(path, str(Path(artifact_file).parent) if "/" in artifact_file else None)

    def end(self, status: str = "FINISHED") -> None:
        self._call("end run", self._client_call, "set_terminated", status=status)
        if self.enabled and self.failures:
            print(f"warning: {self.failures} MLflow call(s) could not be logged to {self.uri}", file=sys.stderr)

    def _client_call(self, method: str, **kwargs) -> Any:
        return getattr(self._client, method)(self.run_id, **kwargs)
