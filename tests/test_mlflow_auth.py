"""The team MLflow with authentication, for real on loopback (issue 9, item 7): infra/mlflow/serve.py
--auth basic starts MLflow's basic-auth app (SQLite backend and a local artifact folder here, so no
PostgreSQL or S3 is needed). Unauthenticated requests are refused; a trainer with
MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD logs its run there; no password is printed, written
or logged; a checkpoint altered in the server's artifact store is refused on resume by its sha256."""

from __future__ import annotations

import base64
import json
import os
import shutil
import struct
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from conftest import ROOT, mlflow_template, run_cli, write_config
from mlflow_servers import MlflowServer

ADMIN_PW = "adm-9f4c1e7a2b-pw"  # stand for credentials: they must never reach output, files or params
TRAINER, TRAINER_PW = "trainer", "trn-5d8e0b3c6a-pw"


def _request(url: str, user: str | None = None, password: str | None = None, data: dict | None = None) -> int:
    req = urllib.request.Request(
        url, data=None if data is None else json.dumps(data).encode(), headers={"Content-Type": "application/json"}
    )
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("flask_wtf", reason="MLflow's basic-auth app needs Flask-WTF (pip install '.[test]')")
    base = tmp_path_factory.mktemp("auth")
    shutil.copyfile(mlflow_template(), base / "mlflow.db")  # the schema in place: the server skips its migrations
    srv = MlflowServer(
        [
            "--backend-store-uri",
            f"sqlite:///{base / 'mlflow.db'}",
            "--artifacts",
            str(base / "artifacts"),
            "--auth",
            "basic",
            "--auth-dir",
            str(base / "auth"),
            "--auth-cache-seconds",
            "60",
        ],
        log=base / "server.log",
        via_script=True,
        env={"MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PW, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # no job workers
    )
    try:
        yield {"server": srv, "base": base}
    finally:
        srv.stop()


def _serve(tmp_path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "infra/mlflow/serve.py"),
            "--backend-store-uri",
            f"sqlite:///{tmp_path}/m.db",
            "--artifacts",
            str(tmp_path / "art"),
            "--dry-run",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_AUTH", "MLFLOW_HOST"))},
            **(env or {}),
        },
    )


def test_a_non_loopback_bind_without_auth_is_refused(tmp_path):
    proc = _serve(tmp_path, "--host", "0.0.0.0")
    assert proc.returncode == 2 and "--host 0.0.0.0 with no authentication" in proc.stderr, proc.stderr
    assert "--auth basic" in proc.stderr and "Traceback" not in proc.stderr
    # a misspelt MLFLOW_AUTH is refused, not taken as "no authentication" (argparse checks only flags)
    proc = _serve(tmp_path, "--host", "0.0.0.0", env={"MLFLOW_AUTH": "Basic"})
    assert proc.returncode == 2 and "MLFLOW_AUTH must be basic or none, got 'Basic'" in proc.stderr, proc.stderr
    proc = _serve(tmp_path, "--host", "0.0.0.0", "--auth", "none")  # asked for explicitly: served, with a warning
    assert proc.returncode == 0 and "without authentication (--auth none)" in proc.stderr, proc.stderr
    assert _serve(tmp_path).returncode == 0  # loopback, the default: no authentication needed


@pytest.mark.slow
def test_unauthenticated_requests_get_401_and_a_trainer_logs_with_its_credentials(server, shards, monkeypatch):
    url, base = server["server"].url, server["base"]
    api = f"{url}/api/2.0/mlflow"
    assert _request(f"{api}/experiments/search?max_results=5") == 401
    assert _request(f"{api}/experiments/search?max_results=5", "admin", "wrong-password-123") == 401
    assert _request(f"{url}/api/2.0/mlflow-artifacts/artifacts") == 401
    # the admin adds a team member (MLflow's users API); the trainer signs in as that member
    assert _request(f"{api}/users/create", "admin", ADMIN_PW, {"username": TRAINER, "password": TRAINER_PW}) == 200

    creds = {"MLFLOW_TRACKING_USERNAME": TRAINER, "MLFLOW_TRACKING_PASSWORD": TRAINER_PW}
    cfg = write_config(
        base / "a.yaml",
        shards,
        base / "a",
        tracking={"uri": url, "experiment": "golf-auth", "log_checkpoints": True},
        train={"steps": 3, "log_every": 1, "val_every": 3, "checkpoint_every": 3},
    )
    proc = run_cli("launch/train.py", "--config", cfg, "--stage", "f", env=creds, check=True)
    run_id = json.loads((base / "a" / "f_run.json").read_text())["mlflow_run_id"]

    from mlflow.tracking import MlflowClient

    for name, value in creds.items():
        monkeypatch.setenv(name, value)
    client = MlflowClient(tracking_uri=url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3]
    assert [m.step for m in client.get_metric_history(run_id, "val_psnr")] == [3]
    assert run.data.params["tracking.uri"] == url

    # no password anywhere: output, params, tags, the run's files, the server's log and config
    seen = [
        proc.stdout,
        proc.stderr,
        json.dumps(run.data.params),
        json.dumps(run.data.tags),
        server["server"].log.read_text(),
    ]
    seen += [
        p.read_text(errors="replace")
        for p in (base / "a").rglob("*")
        if p.is_file() and p.suffix in (".json", ".yaml", ".jsonl", ".txt", ".log")
    ]
    seen += [p.read_text(errors="replace") for p in (base / "auth").glob("*.ini")]
    for text in seen:
        assert ADMIN_PW not in text and TRAINER_PW not in text, text[:300]

    # the checkpoint as the server stores it, then altered there (one byte of tensor data: it still
    # parses): a resume from runs:/ downloads it with the trainer's credentials and refuses it by its sha256
    [stored] = (base / "artifacts").rglob(f"{run_id}/artifacts/checkpoints/step-00000003/model.safetensors")
    data = bytearray(stored.read_bytes())
    data[8 + struct.unpack("<Q", data[:8])[0] + 1] ^= 0x40
    stored.write_bytes(bytes(data))
    uri = f"runs:/{run_id}/checkpoints/step-00000003"
    cfg = write_config(base / "b.yaml", shards, base / "b", tracking={"uri": url, "experiment": "golf-auth"})
    proc = run_cli("launch/train.py", "--config", cfg, "--stage", "f", f"train.resume_from={uri}", env=creds)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    print("\n" + last)
    assert last.startswith(f"error: train.resume_from={uri}: checkpoint file ") and "Traceback" not in proc.stderr
    assert "model.safetensors does not match the sha256" in last
    assert not (base / "b" / "f.safetensors").exists() and not list((base / "b").glob("f/.resume-*"))
    assert TRAINER_PW not in proc.stdout + proc.stderr
