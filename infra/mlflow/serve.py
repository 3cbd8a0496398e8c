#!/usr/bin/env python3
"""Run the team's MLflow tracking server: PostgreSQL backend store, artifacts on S3 (or S3-compatible).

    export PGPASSWORD=...                       # or a ~/.pgpass line; never in the URI
    python infra/mlflow/serve.py \\
        --backend-store-uri postgresql://mlflow@db.internal:5432/mlflow \\
        --artifacts s3://golf-mlflow/artifacts --host 0.0.0.0 --port 5000

Every option also reads an environment variable (see --help), so the same script serves from a
systemd unit or a container with only environment set (infra/mlflow/server.env.example).

Artifact modes (--artifact-mode):
  proxy (default)  `mlflow server --serve-artifacts --artifacts-destination S3`: the server moves the
                   bytes; trainers need only MLFLOW_TRACKING_URI, no S3 credentials. The server
                   needs S3 credentials (AWS_* or an instance role) and, for an S3-compatible store
                   (MinIO, Ceph, moto), MLFLOW_S3_ENDPOINT_URL.
  direct           `mlflow server --no-serve-artifacts --default-artifact-root S3`: trainers write to
                   S3 themselves (faster for big checkpoints, no server in the data path) and each
                   needs S3 credentials and MLFLOW_S3_ENDPOINT_URL.

Before starting, the script checks that the PostgreSQL driver (psycopg2) is installed and that the
database answers, so a wrong host or password is one clear line, not a gunicorn traceback. The
password is taken by libpq from PGPASSWORD or ~/.pgpass (or PGPASSFILE); it is never printed.
MLflow creates or upgrades its tables in the database on first start.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from urllib.parse import urlsplit, urlunsplit


def _masked(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def check_backend(uri: str) -> None:
    """Connect once to the backend database; a clear message (no password) when it does not answer."""
    scheme = urlsplit(uri).scheme
    if scheme.startswith("sqlite"):
        return  # allowed for a trial server; a team uses PostgreSQL
    if not scheme.startswith("postgresql"):
        _fail(f"--backend-store-uri must be postgresql://user@host:port/db (or sqlite:/// for a trial), got {scheme}://")
    try:
        import psycopg2
    except ImportError:
        _fail("the PostgreSQL driver is missing: pip install psycopg2-binary")
    dsn = uri.replace("postgresql+psycopg2://", "postgresql://", 1)
    try:
        psycopg2.connect(dsn, connect_timeout=10).close()
    except psycopg2.OperationalError as err:
        # libpq's message names host, port, user and database, never the password
        detail = " ".join(str(err).split())
        _fail(f"cannot connect to the backend store {_masked(uri)}: {detail} "
              "(password from PGPASSWORD or ~/.pgpass; the database must exist: createdb)", 1)


def main(argv: list[str] | None = None) -> int:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend-store-uri", default=env("MLFLOW_BACKEND_STORE_URI"),
                        help="postgresql://USER@HOST:PORT/DB (env MLFLOW_BACKEND_STORE_URI); password via PGPASSWORD/.pgpass")
    parser.add_argument("--artifacts", default=env("MLFLOW_ARTIFACTS_DESTINATION"),
                        help="s3://BUCKET/PREFIX where artifacts go (env MLFLOW_ARTIFACTS_DESTINATION)")
    parser.add_argument("--artifact-mode", choices=["proxy", "direct"], default=env("MLFLOW_ARTIFACT_MODE", "proxy"),
                        help="proxy: through the server (trainers need no S3 credentials); direct: trainers "
                        "write to S3 (env MLFLOW_ARTIFACT_MODE, default %(default)s)")
    parser.add_argument("--host", default=env("MLFLOW_HOST", "127.0.0.1"),
                        help="interface to bind (env MLFLOW_HOST, default %(default)s; 0.0.0.0 for the team)")
    parser.add_argument("--port", type=int, default=int(env("MLFLOW_PORT", "5000")), help="(env MLFLOW_PORT, default %(default)s)")
    parser.add_argument("--workers", type=int, default=int(env("MLFLOW_WORKERS", "4")),
                        help="server worker processes (env MLFLOW_WORKERS, default %(default)s)")
    parser.add_argument("--allowed-hosts", default=env("MLFLOW_ALLOWED_HOSTS"),
                        help="Host headers accepted, e.g. 'mlflow.lab.example,10.0.0.5:5000' (env MLFLOW_ALLOWED_HOSTS; "
                        "MLflow's default: localhost and private IPs)")
    parser.add_argument("--dry-run", action="store_true", help="check the database, print the command (masked), do not start")
    args = parser.parse_args(argv)

    if not args.backend_store_uri:
        _fail("no backend store: pass --backend-store-uri postgresql://USER@HOST:PORT/DB or set MLFLOW_BACKEND_STORE_URI")
    if not args.artifacts:
        _fail("no artifact store: pass --artifacts s3://BUCKET/PREFIX or set MLFLOW_ARTIFACTS_DESTINATION")
    if urlsplit(args.backend_store_uri).password is not None:
        print("warning: the backend store URI holds a password (visible in `ps`); prefer PGPASSWORD or ~/.pgpass",
              file=sys.stderr, flush=True)
    if args.artifacts.startswith("s3://") and not os.environ.get("MLFLOW_S3_ENDPOINT_URL"):
        print("note: MLFLOW_S3_ENDPOINT_URL is not set: artifacts go to AWS S3 itself "
              "(set it for MinIO, Ceph or another S3-compatible store)", file=sys.stderr, flush=True)
    check_backend(args.backend_store_uri)
    backend = args.backend_store_uri
    if urlsplit(backend).scheme == "postgresql":
        # SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3; name the driver this setup installs
        backend = "postgresql+psycopg2://" + backend[len("postgresql://"):]

    exe = shutil.which("mlflow")
    cmd = [exe or "mlflow", "server", "--backend-store-uri", backend,
           "--host", args.host, "--port", str(args.port), "--workers", str(args.workers)]
    if args.artifact_mode == "proxy":
        cmd += ["--serve-artifacts", "--artifacts-destination", args.artifacts]
    else:
        cmd += ["--no-serve-artifacts", "--default-artifact-root", args.artifacts]
    if args.allowed_hosts:
        cmd += ["--allowed-hosts", args.allowed_hosts]
    shown = " ".join(_masked(c) for c in cmd)
    print(f"mlflow team server: {shown}", flush=True)
    if args.dry_run:
        return 0
    if exe is None:
        _fail("the `mlflow` command is not on PATH: pip install mlflow psycopg2-binary", 1)
    os.execv(exe, cmd)  # the server replaces this process: signals reach it directly
    return 0


if __name__ == "__main__":
    sys.exit(main())
