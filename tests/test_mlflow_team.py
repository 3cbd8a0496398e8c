"""The team MLflow for real, on loopback: PostgreSQL (Debian's package) as the backend store, moto_server
as the S3 artifact store, `mlflow server` started through infra/mlflow/serve.py (artifacts proxied, so
trainers hold no S3 credentials). A short training run logs there and uploads its checkpoints; a new
run in a fresh folder resumes from a checkpoint given as an MLflow artifact URI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import torch
from conftest import ROOT, make_bucket, run_cli, write_config
from mlflow_servers import MlflowServer, Postgres
from safetensors.torch import load_file

BUCKET, PREFIX = "golf-mlflow", "team"
TOKEN = "tok-9c27e1"  # stands for a credential in the tracking URI: it must never reach params or logs


@pytest.fixture(scope="module")
def team(s3_server, tmp_path_factory):
    why = Postgres.why_not()
    if why is not None:
        print(f"\nSKIP team MLflow: {why}")
        pytest.skip(why)
    try:
        pg = Postgres()
    except RuntimeError as err:
        print(f"\nSKIP team MLflow: PostgreSQL could not be started: {err}")
        pytest.skip(f"PostgreSQL could not be started: {str(err)[:300]}")
    base = tmp_path_factory.mktemp("team")
    server = None
    try:
        make_bucket(s3_server, BUCKET)
        # the database password in the URI's query (libpq's form), not in PGPASSWORD: the hardest case for
        # serve.py, which must pass it on without showing it (test_..._never_on_a_command_line_nor_printed)
        server = MlflowServer(
            ["--backend-store-uri", f"{pg.uri}?password={pg.password}", "--artifacts", f"s3://{BUCKET}/{PREFIX}"],
            log=base / "server.log",
            env=s3_server,
            via_script=True,
        )
        yield {"pg": pg, "server": server, "s3": s3_server, "base": base}
    finally:
        if server is not None:
            server.stop()
        pg.stop()


def _trainer_env() -> dict[str, str]:
    """What a trainer sets against a proxying team server: nothing but the tracking URI (in the config
    here); explicitly no S3 credentials or endpoint."""
    return {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_ENDPOINT_URL": "", "MLFLOW_S3_ENDPOINT_URL": ""}


def _s3(env):
    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )


@pytest.fixture(scope="module")
def first_run(team, shards):
    """Six steps of stage f, checkpoints at 3 and 6 uploaded, logged to the team server."""
    base = team["base"]
    port = team["server"].port
    cfg = write_config(
        base / "a.yaml",
        shards,
        base / "a",
        tracking={"uri": f"http://golf:{TOKEN}@127.0.0.1:{port}", "experiment": "golf-team", "log_checkpoints": True},
    )
    proc = run_cli("launch/train.py", "--config", cfg, "--stage", "f", env=_trainer_env(), check=True)
    run_id = json.loads((base / "a" / "f_run.json").read_text())["mlflow_run_id"]
    assert run_id, proc.stderr[-2000:]
    return {"cfg": cfg, "run_id": run_id, "proc": proc, "out": base / "a"}


@pytest.mark.slow
def test_metrics_and_params_land_in_the_team_server_without_credentials(team, first_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=team["server"].url)
    run = client.get_run(first_run["run_id"])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2, 4, 6]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_psnr")] == [3, 6]
    params = run.data.params
    assert (
        params["global_batch"] == "4" and params["train.steps"] == "6" and params["tracking.log_checkpoints"] == "True"
    )
    assert params["tracking.uri"] == f"http://***@127.0.0.1:{team['server'].port}"
    secrets = (TOKEN, team["pg"].password, team["s3"]["AWS_SECRET_ACCESS_KEY"])
    for key, value in params.items():
        assert not any(s in value for s in secrets), key
    everything = first_run["proc"].stdout + first_run["proc"].stderr + (first_run["out"] / "f_run.json").read_text()
    everything += team["server"].log.read_text()
    assert not any(s in everything for s in secrets), "a credential was printed or written"
    # the run is in PostgreSQL itself, not in some local fallback store
    import psycopg2

    with psycopg2.connect(team["pg"].uri, password=team["pg"].password) as conn, conn.cursor() as cur:
        cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (first_run["run_id"],))
        assert cur.fetchone() == ("FINISHED",)
        cur.execute("SELECT count(*) FROM metrics WHERE run_uuid = %s AND key = 'loss'", (first_run["run_id"],))
        assert cur.fetchone() == (3,)


@pytest.mark.slow
def test_checkpoints_land_in_the_bucket(team, first_run):
    s3 = _s3(team["s3"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/")["Contents"]]
    run_keys = [k for k in keys if f"/{first_run['run_id']}/artifacts/" in k]
    for step in ("step-00000003", "step-00000006"):
        got = sorted(k.rsplit("/", 1)[1] for k in run_keys if f"/artifacts/checkpoints/{step}/" in k)
        assert got == ["model.safetensors", "optimizer.pt", "rng.pt", "state.json"], (step, run_keys)
    # the bytes in the bucket are the checkpoint's bytes
    key = next(k for k in run_keys if k.endswith("checkpoints/step-00000006/model.safetensors"))
    body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    assert body == (first_run["out"] / "f" / "checkpoints" / "step-00000006" / "model.safetensors").read_bytes()
    assert any(k.endswith("/weights/f.safetensors") for k in run_keys)


@pytest.mark.slow
def test_resume_from_an_artifact_uri_matches_the_uninterrupted_run(team, first_run, shards):
    from mlflow.tracking import MlflowClient

    base = team["base"]
    uri = f"runs:/{first_run['run_id']}/checkpoints/step-00000003"
    cfg = write_config(
        base / "b.yaml", shards, base / "b", tracking={"uri": team["server"].url, "experiment": "golf-team"}
    )
    proc = run_cli(
        "launch/train.py", "--config", cfg, "--stage", "f", f"train.resume_from={uri}", env=_trainer_env(), check=True
    )
    assert f"resuming stage f from {uri} (step 3 of 6)" in proc.stdout, proc.stdout[-2000:]
    assert not list((base / "b" / "f").glob(".resume-*")), "the download was not cleaned up"
    ref, resumed = load_file(str(first_run["out"] / "f.safetensors")), load_file(str(base / "b" / "f.safetensors"))
    assert ref.keys() == resumed.keys()
    for key in ref:
        assert torch.equal(ref[key], resumed[key]), key
    # a new MLflow run, with its params and the steps after the resume, tagged with where it came from
    client = MlflowClient(tracking_uri=team["server"].url)
    run = client.get_run(json.loads((base / "b" / "f_run.json").read_text())["mlflow_run_id"])
    assert run.info.run_id != first_run["run_id"]
    assert run.data.tags["golf.resumed_from"] == uri and run.data.params["train.resume_from"] == uri
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [4, 6]


@pytest.mark.slow
def test_resume_from_a_missing_or_corrupt_artifact_names_the_uri(team, first_run, shards):
    base = team["base"]
    cfg = write_config(base / "c.yaml", shards, base / "c", tracking={"uri": team["server"].url})
    missing = f"runs:/{first_run['run_id']}/checkpoints/step-00000099"
    proc = run_cli(
        "launch/train.py", "--config", cfg, "--stage", "f", f"train.resume_from={missing}", env=_trainer_env()
    )
    assert proc.returncode == 1 and f"train.resume_from={missing}" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    print("\n" + proc.stderr.strip().splitlines()[-1])
    gone = base / "nowhere" / "step-00000003"  # a local folder that does not exist
    proc = run_cli("launch/train.py", "--config", cfg, "--stage", "f", f"train.resume_from={gone}")
    assert proc.returncode == 1 and f"train.resume_from={gone}: {gone} does not exist" in proc.stderr, proc.stderr[
        -2000:
    ]

    # a checkpoint whose weights are damaged, read straight from the bucket (s3://, trainer with S3 access)
    s3 = _s3(team["s3"])
    src = first_run["out"] / "f" / "checkpoints" / "step-00000003"
    for f in src.iterdir():
        body = f.read_bytes()[:100] if f.name == "model.safetensors" else f.read_bytes()
        s3.put_object(Bucket=BUCKET, Key=f"damaged/step-00000003/{f.name}", Body=body)
    bad = f"s3://{BUCKET}/damaged/step-00000003"
    proc = run_cli("launch/train.py", "--config", cfg, "--stage", "f", f"train.resume_from={bad}", env=team["s3"])
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"train.resume_from={bad}" in proc.stderr and "model.safetensors" in proc.stderr, proc.stderr[-2000:]
    print(proc.stderr.strip().splitlines()[-1])
    assert not (base / "c" / "f.safetensors").exists()


def _group_cmdlines(pgid: int) -> list[str]:
    """The command lines of the live processes of process group `pgid` (what `ps` shows every user)."""
    lines = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.getpgid(int(proc.name)) == pgid:
                lines.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except (OSError, ProcessLookupError):
            continue  # ended meanwhile
    return lines


@pytest.mark.slow
def test_a_password_in_the_backend_uris_query_is_never_on_a_command_line_nor_printed(team):
    """The team server was started by serve.py from postgresql://user@host/db?password=... (libpq's query form)
    and no PGPASSWORD: it answers from PostgreSQL (the password arrived), passed in the environment, so no
    process of the server has it on its command line (`ps`), and serve.py printed it masked."""
    from mlflow.tracking import MlflowClient

    server, password = team["server"], team["pg"].password
    assert MlflowClient(tracking_uri=server.url).search_experiments()  # read from PostgreSQL
    cmdlines = _group_cmdlines(server.proc.pid)
    assert any(" server " in line for line in cmdlines), cmdlines
    assert not [line for line in cmdlines if password in line], "the database password is on a command line"
    log = server.log.read_text()
    assert password not in log and "password=***" in log, log[-2000:]


@pytest.mark.slow
def test_an_auth_db_uri_with_a_password_in_its_query_is_refused_unwritten(tmp_path):
    """--auth-db-uri is written to the basic-auth app's ini file, which holds no secret: a password in its query
    is refused like one in its userinfo, and not printed."""
    secret = "auth-db-secret-81c2"
    refused = subprocess.run(
        [
            sys.executable,
            str(ROOT / "infra/mlflow/serve.py"),
            "--backend-store-uri",
            f"sqlite:///{tmp_path}/m.db",
            "--artifacts",
            str(tmp_path / "art"),
            "--auth",
            "basic",
            "--auth-dir",
            str(tmp_path / "auth"),
            "--auth-db-uri",
            f"postgresql://mlflow@db.internal/auth?sslmode=require&password={secret}",
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "--auth-db-uri" in refused.stderr and "holds a password" in refused.stderr, refused.stderr
    assert secret not in refused.stdout + refused.stderr
    assert not (tmp_path / "auth" / "basic_auth.ini").exists()
