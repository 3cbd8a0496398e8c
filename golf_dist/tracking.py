"""MLflow tracking, from the main process only, and never the reason a run stops.

With no server, runs go to a local SQLite store (default `sqlite:///mlflow.db` in the working
directory, artifacts in `mlartifacts/` beside it) that `mlflow ui --backend-store-uri ...` opens.
`MLFLOW_TRACKING_URI` wins over the config's `tracking.uri`.

Outages: if the tracking server cannot be reached mid-run, training goes on. The first failure warns
once (one line); then MLflow calls pause for a cool-down (60 s, doubling after each failed retry up
to 30 min) instead of stalling every step on a dead server; calls made or skipped while it is down
are counted by kind and reported at the end (`summary()`). Every metric also goes to a local JSONL
file (`metrics_file`), written whatever MLflow does, so no metric is lost to an outage. MLflow's
HTTP client retries a failed request for about four minutes by default; the Tracker bounds that
(`HTTP_DEFAULTS`) unless the user has set those variables.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus, urlsplit

import numpy as np

from golf_dist.log import get_logger

log = get_logger(__name__)

_MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
# The experiment's kind: "custom_model_development" is MLflow's model-training kind (runs, metrics, charts).
# MLflow 3.17's UI no longer picks its view from this tag but from its GenAI / Model training switch
# (remembered per browser, or ?workflowType=machine_learning in the URL): docs/tracking.md.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

# MLflow defaults: 7 retries, backoff factor 2, 120 s timeout (about 4 min per call on a dead server).
# These bound one failed call to ~3 s when the server refuses connections, ~95 s when it black-holes
# them; the cool-down below keeps that from repeating every step.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
COOLDOWN_S = 60.0
MAX_COOLDOWN_S = 1800.0

_URI = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://\S*")


# A query parameter whose name holds one of these is a credential: libpq's password and sslpassword
# (postgresql://user@host/db?password=...), passwd, pwd, token, secret, api keys, access keys, presigned
# URLs' signatures and session tokens (X-Amz-Signature, X-Amz-Security-Token, Azure's sig). Its value goes.
_SECRET_PARAM = re.compile(r"pass|pwd|secret|token|key|sig|credential|session", re.IGNORECASE)


def _redact_query(uri: str) -> str:
    """`uri` with the value of every credential parameter of its query (see _SECRET_PARAM) replaced by ***;
    a name is matched after percent-decoding (libpq decodes `pass%77ord` to password). No fragment is split
    off: libpq reads `?password=a#b` as the password `a#b`, so a value runs to the next '&' or ';'."""
    head, question, query = uri.partition("?")
    if not question:
        return uri
    fields = re.split(r"([&;])", query)
    for i, field in enumerate(fields):
        name, equals, _ = field.partition("=")
        if equals and _SECRET_PARAM.search(unquote_plus(name)):
            fields[i] = f"{name}=***"
    return f"{head}?{''.join(fields)}"


def _redact_uri(uri: str) -> str:
    """The userinfo (`user:password@`) and the credential query parameters of one URI, hidden."""
    return _redact_query(_redact_userinfo(uri))  # userinfo first: a password may hold '?'


def _redact_userinfo(uri: str) -> str:
    scheme, _, rest = uri.partition("://")
    if "@" not in rest or rest.startswith("/"):  # no '@', or no authority at all (file:///, sqlite:////)
        return uri
    try:
        netloc = urlsplit(uri).netloc
    except ValueError:  # e.g. an unbalanced '[' in the host
        netloc = ""
    if "@" in netloc and "@" not in rest[len(netloc) :]:
        return f"{scheme}://***@{netloc.rpartition('@')[2]}{rest[len(netloc) :]}"
    if "@" not in netloc and ":" not in rest.rpartition("@")[0]:
        return uri  # an '@' in a path or query, and no ':' before it: no password anywhere
    # An '@' after what urlsplit calls the host: in a path or query, or in a password holding '/', '?' or
    # '#' that urlsplit cut short (https://user:p@ss/word@host/path). The two cannot be told apart, so
    # everything up to the last '@' goes: hiding part of a URL is harmless, showing a password is not.
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


def redact(text: str) -> str:
    """Replace the userinfo (`user:password@`) of every URI in `text` (tracking URIs, error messages,
    params) with `***@`, through urllib.parse.urlsplit (a password holding '/', '@', '?' or '#' goes too),
    and the value of every credential parameter of its query (`?password=...`, `&token=...`) with `***`."""
    return _URI.sub(lambda m: _redact_uri(m.group(0)), text)


def redact_config_dict(tree: Any) -> Any:
    """A copy of a nested config (dicts, lists, tuples) with every string redacted (see `redact`): for
    dumping config.yaml or logging params without the passwords in tracking.uri, data.shards, ..."""
    if isinstance(tree, dict):
        return {key: redact_config_dict(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(redact_config_dict(value) for value in tree)
    return redact(tree) if isinstance(tree, str) else tree


def _say(line: str) -> None:
    """One dated warning line on stderr, on its own line even while a tqdm progress bar is drawn there."""
    log.warning(line)


def bound_http_retries() -> None:
    """Set MLflow's HTTP retry/timeout variables to bounded values unless the user set them."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def resolve_uri(config_uri: str | None) -> str:
    """MLFLOW_TRACKING_URI, else the config's, else ./mlflow.db; relative SQLite paths made absolute."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or config_uri or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    elif "://" not in uri and not uri.startswith("databricks"):
        uri = Path(uri).resolve().as_uri()  # a plain folder: a file store
    return uri


@contextlib.contextmanager
def fluent_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API (mlflow.start_run, register_model, pyfunc.load_model) pointed at `uri` for the
    block only. mlflow.set_tracking_uri also writes MLFLOW_TRACKING_URI into os.environ (MLflow 3, for
    subprocesses), and resolve_uri lets that variable win: left set, it would send every later run in
    this process to this store whatever its config says. So the variable is put back as it was."""
    import mlflow

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)  # clears MLflow's own setting and the variable it wrote
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def local_artifact_root(uri: str) -> str | None:
    """Artifacts beside a local SQLite store, so the whole store is one movable folder."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
    return None


class Tracker:
    """A thin MLflow run. On non-main ranks (`enabled=False`) every call does nothing.

    `metrics_file`: a JSONL file that receives every `log_metrics` call ({"step": .., "time": .., name:
    value, ...}, one line each, appended and flushed), whether or not MLflow is reachable. After a
    resume, steps between the last checkpoint and the interruption appear twice: later lines win.
    """

    def __init__(self, enabled: bool, uri: str | None, experiment: str, metrics_file: str | Path | None = None):
        self.enabled = enabled
        self.failed: Counter[str] = Counter()  # calls not logged, by kind (failed or skipped in a cool-down)
        self.stalled_s = 0.0  # time spent inside MLflow calls that failed
        self._warned = False
        self.run_id: str | None = None
        self.new_run = False  # start() created a run (rather than continuing a resumed one)
        self.uri = resolve_uri(uri) if enabled else None
        self.experiment = experiment
        self.metrics_file = Path(metrics_file) if (enabled and metrics_file) else None
        self._client = None
        self._artifact_repo = None  # the run's artifact repository, for delete_artifacts
        self._paused_until = 0.0
        self._cooldown = COOLDOWN_S
        if enabled:
            bound_http_retries()
            if redact(self.uri) != self.uri:  # MLflow prints run URLs as they are: not with a password in them
                os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

    @property
    def failures(self) -> int:
        return sum(self.failed.values())

    @property
    def display_uri(self) -> str | None:
        return redact(self.uri) if self.uri else None

    # -- guarded calls --------------------------------------------------------------------
    def _call(self, what: str, fn, *args, **kwargs) -> Any:
        if not self.enabled:
            return None
        if self._client is None:  # the run never started (server down at start): nothing reaches MLflow
            self.failed[what] += 1
            return None
        if time.monotonic() < self._paused_until:
            self.failed[what] += 1  # skipped: the server failed recently
            return None
        start = time.monotonic()
        try:
            result = fn(*args, **kwargs)
        except Exception as err:  # any tracking failure: count it, warn once, keep training
            now = time.monotonic()
            self.stalled_s += now - start
            self.failed[what] += 1
            if self._paused_until:  # a retry after a cool-down failed again: wait longer next time
                self._cooldown = min(self._cooldown * 2, MAX_COOLDOWN_S)
            self._paused_until = now + self._cooldown
            if not self._warned:
                self._warned = True
                kept = f"metrics still go to {self.metrics_file}, " if self.metrics_file else ""
                _say(
                    f"warning: MLflow call '{what}' to {self.display_uri} failed after {now - start:.1f} s "
                    f"({type(err).__name__}: {redact(str(err))[:200]}); training goes on, {kept}local "
                    f"checkpoints are kept; MLflow calls pause for {self._cooldown:.0f} s, then retry; "
                    "what cannot be logged is counted and reported at the end"
                )
            return None
        if self._paused_until:  # the server is back
            self._paused_until, self._cooldown = 0.0, COOLDOWN_S
        return result

    def start(self, run_name: str, resume_run_id: str | None = None, tags: dict[str, str] | None = None) -> None:
        """Start (or continue, after a resume) the MLflow run."""
        if not self.enabled:
            return
        import mlflow
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self.uri)

        def _start() -> str:
            exp = self._client.get_experiment_by_name(self.experiment)
            if exp is None:
                exp_id = self._client.create_experiment(
                    self.experiment,
                    artifact_location=local_artifact_root(self.uri),
                    tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
                )
            else:
                exp_id = exp.experiment_id
                if EXPERIMENT_KIND_TAG not in exp.tags:  # an older experiment; a kind a user chose is kept
                    try:
                        self._client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
                    except mlflow.exceptions.MlflowException:
                        pass  # e.g. a team server where this user may run but not edit the experiment
            if resume_run_id:
                try:
                    self._client.update_run(resume_run_id, status="RUNNING")
                    return resume_run_id
                except mlflow.exceptions.MlflowException:
                    pass  # run gone (another store): start a new one
            run = self._client.create_run(exp_id, run_name=run_name, tags=tags or {})
            self.new_run = True
            return run.info.run_id

        self.run_id = self._call("start run", _start)
        if self.run_id is None:
            self._client = None  # no run to log to: later calls are counted, not attempted

    def log_params(self, params: dict[str, Any]) -> None:
        """Params as strings (MLflow's length limit); any `user:password@` in a URI is removed."""
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(k, redact(str(v))[:_MAX_PARAM_LEN]) for k, v in params.items()]
        for i in range(0, len(items), 90):  # log_batch takes at most 100 params
            self._call("log params", self._client_call, "log_batch", params=items[i : i + 90])

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self._call("set tag", self._client_call, "set_tag", key=key, value=redact(str(value)))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        if self.metrics_file is not None:
            self._append_jsonl({"step": step, "time": now / 1000, **{k: float(v) for k, v in metrics.items()}})
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._call("log metrics", self._client_call, "log_batch", metrics=items)

    def _append_jsonl(self, record: dict[str, Any]) -> None:
        # One line or nothing: a disk that fills mid-line would leave a partial line that the next record
        # is glued onto (both lost, and the file unreadable as JSON lines); cut the file back on failure.
        line = (json.dumps(record) + "\n").encode()
        try:
            self.metrics_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.metrics_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                start = os.lseek(fd, 0, os.SEEK_END)
                try:
                    written = 0
                    while written < len(line):
                        written += os.write(fd, line[written:])
                except OSError:
                    os.ftruncate(fd, start)
                    raise
            finally:
                os.close(fd)
        except OSError as err:  # a full disk must not stop training either, but say so
            self.failed["metrics file"] += 1
            if self.failed["metrics file"] == 1:
                _say(f"warning: cannot append to {self.metrics_file}: {err}")

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call("log artifact", self._client_call, "log_artifact", local_path=str(path), artifact_path=artifact_path)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        """Upload a folder (e.g. a checkpoint) under `artifact_path` of the run's artifacts."""
        self._call(
            "log artifacts", self._client_call, "log_artifacts", local_dir=str(local_dir), artifact_path=artifact_path
        )

    def delete_artifacts(self, artifact_paths: list[str]) -> None:
        """Delete these folders or files of the run's artifacts (pruned checkpoints), through MLflow's artifact
        repository of the run: local stores, mlflow-artifacts:/ (the server deletes), S3 and the other stores
        whose repository implements deletion; on the others MLflow's delete does nothing and the copies stay."""
        if not artifact_paths:
            return
        self._call("delete artifacts", self._delete_artifacts, artifact_paths)

    def _delete_artifacts(self, artifact_paths: list[str]) -> None:
        if self._artifact_repo is None:
            from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

            artifact_uri = self._client.get_run(self.run_id).info.artifact_uri
            self._artifact_repo = get_artifact_repository(artifact_uri, tracking_uri=self.uri)
        for path in artifact_paths:
            self._artifact_repo.delete_artifacts(path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call("log text", self._client_call, "log_text", text=text, artifact_file=artifact_file)

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        """HxWx3 uint8 written as PNG."""
        if not self.enabled:
            return
        if self._client is None or time.monotonic() < self._paused_until:
            self.failed["log artifact"] += 1  # counted like the upload it replaces; no PNG encoded
            return
        from PIL import Image

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            Image.fromarray(image).save(path)
            self.log_artifact(path, str(Path(artifact_file).parent) if "/" in artifact_file else None)

    def summary(self) -> str | None:
        """One line on what could not be logged (None when everything was)."""
        if not self.enabled or not self.failures:
            return None
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(self.failed.items()))
        kept = f"; every metric is in {self.metrics_file}" if self.metrics_file else ""
        return (
            f"tracking: {self.failures} MLflow call(s) could not be logged to {self.display_uri} ({kinds}); "
            f"{self.stalled_s:.1f} s spent waiting on the server{kept}"
        )

    def end(self, status: str = "FINISHED") -> None:
        self._call("end run", self._client_call, "set_terminated", status=status)
        line = self.summary()
        if line:
            _say(line)

    def _client_call(self, method: str, **kwargs) -> Any:
        return getattr(self._client, method)(self.run_id, **kwargs)
