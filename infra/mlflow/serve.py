#!/usr/bin/env python3
"""Run the team's MLflow tracking server: PostgreSQL backend store, artifacts on S3 (or S3-compatible).

    export PGPASSWORD=...                       # or a ~/.pgpass line; never in the URI
    export MLFLOW_AUTH_ADMIN_PASSWORD=...       # the admin's password, on the first start (never a flag)
    python infra/mlflow/serve.py \\
        --backend-store-uri postgresql://mlflow@db.internal:5432/mlflow \\
        --artifacts s3://golf-mlflow/artifacts --auth basic --host 0.0.0.0 --port 5000

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

Authentication (--auth):
  basic            MLflow's basic-auth app (`mlflow server --app-name basic-auth`): every request needs
                   a user name and password (HTTP basic auth); trainers set MLFLOW_TRACKING_USERNAME and
                   MLFLOW_TRACKING_PASSWORD. The users live in --auth-db-uri (default: SQLite in
                   --auth-dir). On the first start the admin user (MLFLOW_AUTH_ADMIN_USERNAME, default
                   admin) is created with the password in MLFLOW_AUTH_ADMIN_PASSWORD, which MLflow reads
                   from the environment itself: it is never a flag, never written to a file, never
                   printed, and is ignored once the admin exists (then unset it). The admin adds the
                   team's users (MLflow's /api/2.0/mlflow/users/create or the UI's signup page).
                   Needs Flask-WTF (pip install '.[server]'). MLFLOW_FLASK_SERVER_SECRET_KEY (CSRF of the
                   UI's forms) is made up for this start when unset; set it to one value for servers
                   behind one load balancer.
  none             no authentication: anyone who reaches the port reads and changes every run and
                   artifact. The default on loopback (127.0.0.1, the default --host), for a server
                   behind an authenticating reverse proxy on the same host (infra/mlflow/README.md).
                   Any other --host needs --auth given: basic, or none to serve a trusted network openly.

Before starting, the script checks that the PostgreSQL driver (psycopg2) is installed and that the
database answers, so a wrong host or password is one clear line, not a gunicorn traceback. The
password is taken by libpq from PGPASSWORD or ~/.pgpass (or PGPASSFILE); it is never printed. The backend
store URI reaches `mlflow server` in its environment (MLFLOW_BACKEND_STORE_URI), never on its command
line, so a password left in it (user:pw@ or ?password=) is not visible in `ps` either.
MLflow creates or upgrades its tables in the database on first start.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import secrets
import shutil
import sys
import warnings
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

# A query parameter naming a credential (libpq's password and sslpassword, tokens, keys): the rule of
# golf_dist.tracking._SECRET_PARAM, repeated because this script runs where golf_dist may not be installed.
_SECRET_PARAM = re.compile(r"pass|pwd|secret|token|key|sig|credential|session", re.IGNORECASE)


def _secret_params(uri: str) -> list[str]:
    """The names of the query parameters of `uri` that hold a credential (postgresql://u@h/db?password=...)."""
    query = uri.partition("?")[2]  # with what urlsplit would call a fragment: see _masked
    return [name for name, _ in parse_qsl(query, keep_blank_values=True) if _SECRET_PARAM.search(name)]


def _holds_password(uri: str) -> bool:
    return urlsplit(uri).password is not None or bool(_secret_params(uri))


def _masked(uri: str) -> str:
    """`uri` for printing: the password of its userinfo and every credential query parameter as ***."""
    parts = urlsplit(uri)
    if parts.password is not None:
        host = parts.hostname or ""
        uri = urlunsplit(
            parts._replace(netloc=f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else ""))
        )
    if not _secret_params(uri):
        return uri
    # not urlunsplit: it would drop the '//' of sqlite:////path?...; no fragment split off: libpq reads
    # ?password=a#b as the password a#b
    head, _, query = uri.partition("?")
    fields = [
        (name, "***" if _SECRET_PARAM.search(name) else value)
        for name, value in parse_qsl(query, keep_blank_values=True)
    ]
    return f"{head}?{urlencode(fields, safe='*')}"


def _fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def check_backend(uri: str) -> None:
    """Connect once to the backend database; a clear message (no password) when it does not answer."""
    scheme = urlsplit(uri).scheme
    if scheme.startswith("sqlite"):
        return  # allowed for a trial server; a team uses PostgreSQL
    if not scheme.startswith("postgresql"):
        _fail(
            f"--backend-store-uri must be postgresql://user@host:port/db (or sqlite:/// for a trial), got {scheme}://"
        )
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
        _fail(
            f"cannot connect to the backend store {_masked(uri)}: {detail} "
            "(password from PGPASSWORD or ~/.pgpass; the database must exist: createdb)",
            1,
        )


_PERMISSIONS = ("READ", "EDIT", "MANAGE", "NO_PERMISSIONS")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def _auth_config(auth_dir: str, db_uri: str | None, permission: str, cache_seconds: int) -> tuple[str, str]:
    """Write the basic-auth app's config (no secret in it) to AUTH_DIR/basic_auth.ini, atomically and
    private; return its path and the user store's URI."""
    folder = os.path.abspath(os.path.expanduser(auth_dir))
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    except OSError as err:
        _fail(f"--auth-dir {folder}: cannot create it: {err.strerror}", 1)
    db_uri = db_uri or f"sqlite:///{os.path.join(folder, 'users.db')}"
    if _holds_password(db_uri):  # it is written to the ini file below, which is to hold no secret
        _fail(
            f"--auth-db-uri {_masked(db_uri)} holds a password (it would be written to "
            f"{os.path.join(folder, 'basic_auth.ini')}): "
            "take it out (PGPASSWORD or ~/.pgpass)"
        )
    username = os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME") or "admin"
    for what, value in (("--auth-db-uri", db_uri), ("MLFLOW_AUTH_ADMIN_USERNAME", username)):
        if re.search(r"[\x00-\x1f]", value):
            _fail(f"{what} holds a control character (a line break?)")
    text = (
        "# written by infra/mlflow/serve.py at each start: edit its flags, not this file. No secrets here:\n"
        "# the admin password comes from MLFLOW_AUTH_ADMIN_PASSWORD in the server's environment.\n"
        "[mlflow]\n"
        f"default_permission = {permission}\n"
        f"database_uri = {db_uri.replace('%', '%%')}\n"
        f"admin_username = {username.replace('%', '%%')}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        f"auth_cache_ttl_seconds = {cache_seconds}\n"
    )
    path = os.path.join(folder, "basic_auth.ini")
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        _fail(f"cannot write {path}: {err.strerror}", 1)
    return path, db_uri


def check_basic_auth(dry_run: bool) -> None:
    """The basic-auth app can run here: Flask-WTF installed, an MLflow that takes the admin password from
    the environment (older ones shipped a default admin password), and, unless a dry run, the user store
    opened and the admin created (MLflow's own bootstrap, so a missing or too weak password or a wrong
    --auth-db-uri is one line here, not a traceback from the server). The password is never printed."""
    try:
        import flask_wtf  # noqa: F401
    except ImportError:
        _fail(
            "--auth basic needs Flask-WTF for MLflow's basic-auth app: pip install 'Flask-WTF<2' "
            "(or pip install '.[server]')",
            1,
        )
    import mlflow.environment_variables as mlflow_env

    if not hasattr(mlflow_env, "MLFLOW_AUTH_ADMIN_PASSWORD"):
        import mlflow

        _fail(
            f"--auth basic: MLflow {mlflow.__version__} cannot take the admin password from "
            "MLFLOW_AUTH_ADMIN_PASSWORD (its basic-auth app ships a default admin password): upgrade mlflow",
            1,
        )
    if dry_run:
        return
    password = os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD") or ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from mlflow.server import auth

            auth.bootstrap_admin_user()
    except Exception as err:  # MlflowException, SQLAlchemy's errors for a wrong --auth-db-uri
        detail = " ".join(str(getattr(err, "message", err)).split())
        if password:
            detail = detail.replace(password, "***")
        _fail(f"--auth basic: the user store would not start: {detail[:600]}", 1)


def main(argv: list[str] | None = None) -> int:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--backend-store-uri",
        default=env("MLFLOW_BACKEND_STORE_URI"),
        help="postgresql://USER@HOST:PORT/DB (env MLFLOW_BACKEND_STORE_URI); password via PGPASSWORD/.pgpass",
    )
    parser.add_argument(
        "--artifacts",
        default=env("MLFLOW_ARTIFACTS_DESTINATION"),
        help="s3://BUCKET/PREFIX where artifacts go (env MLFLOW_ARTIFACTS_DESTINATION)",
    )
    parser.add_argument(
        "--artifact-mode",
        choices=["proxy", "direct"],
        default=env("MLFLOW_ARTIFACT_MODE", "proxy"),
        help="proxy: through the server (trainers need no S3 credentials); direct: trainers "
        "write to S3 (env MLFLOW_ARTIFACT_MODE, default %(default)s)",
    )
    parser.add_argument(
        "--host",
        default=env("MLFLOW_HOST", "127.0.0.1"),
        help="interface to bind (env MLFLOW_HOST, default %(default)s; 0.0.0.0 for the team)",
    )
    parser.add_argument(
        "--port", type=int, default=int(env("MLFLOW_PORT", "5000")), help="(env MLFLOW_PORT, default %(default)s)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=int(env("MLFLOW_WORKERS", "4")),
        help="server worker processes (env MLFLOW_WORKERS, default %(default)s)",
    )
    parser.add_argument(
        "--allowed-hosts",
        default=env("MLFLOW_ALLOWED_HOSTS"),
        help="Host headers accepted, e.g. 'mlflow.lab.example,10.0.0.5:5000' (env MLFLOW_ALLOWED_HOSTS; "
        "MLflow's default: localhost and private IPs)",
    )
    parser.add_argument(
        "--auth",
        choices=["basic", "none"],
        default=env("MLFLOW_AUTH") or None,
        help="basic: MLflow's basic-auth app; none: no authentication (env MLFLOW_AUTH; default "
        "none on loopback, and required for any other --host)",
    )
    parser.add_argument(
        "--auth-dir",
        default=env("MLFLOW_AUTH_DIR", "mlflow-auth"),
        help="--auth basic: folder of the app's config and, by default, its SQLite user store "
        "(env MLFLOW_AUTH_DIR, default %(default)s)",
    )
    parser.add_argument(
        "--auth-db-uri",
        default=env("MLFLOW_AUTH_DB_URI"),
        help="--auth basic: the user store, e.g. postgresql://USER@HOST:PORT/mlflow_auth "
        "(env MLFLOW_AUTH_DB_URI; password via PGPASSWORD/.pgpass; default SQLite in --auth-dir)",
    )
    parser.add_argument(
        "--auth-default-permission",
        choices=_PERMISSIONS,
        default=env("MLFLOW_AUTH_DEFAULT_PERMISSION", "EDIT"),
        help="--auth basic: what every signed-in user may do with experiments others made "
        "(env MLFLOW_AUTH_DEFAULT_PERMISSION, default %(default)s: log runs to shared experiments)",
    )
    parser.add_argument(
        "--auth-cache-seconds",
        default=env("MLFLOW_AUTH_CACHE_SECONDS", "0"),
        help="--auth basic: each worker remembers a good password this long instead of hashing it "
        "again (PBKDF2, costly per request); a changed or deleted user may then pass until it "
        "runs out (env MLFLOW_AUTH_CACHE_SECONDS, default %(default)s: off, MLflow's default)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="check the database, print the command (masked), do not start"
    )
    args = parser.parse_args(argv)

    if not args.backend_store_uri:
        _fail(
            "no backend store: pass --backend-store-uri postgresql://USER@HOST:PORT/DB or set MLFLOW_BACKEND_STORE_URI"
        )
    if not args.artifacts:
        _fail("no artifact store: pass --artifacts s3://BUCKET/PREFIX or set MLFLOW_ARTIFACTS_DESTINATION")
    if _holds_password(args.backend_store_uri):
        print(
            "warning: the backend store URI holds a password (it is passed to `mlflow server` in its environment, "
            "not on its command line, and printed masked); prefer PGPASSWORD or ~/.pgpass",
            file=sys.stderr,
            flush=True,
        )
    if args.artifacts.startswith("s3://") and not os.environ.get("MLFLOW_S3_ENDPOINT_URL"):
        print(
            "note: MLFLOW_S3_ENDPOINT_URL is not set: artifacts go to AWS S3 itself "
            "(set it for MinIO, Ceph or another S3-compatible store)",
            file=sys.stderr,
            flush=True,
        )
    # argparse checks `choices` on the command line only: what the environment gave is checked here
    if args.auth not in (None, "basic", "none"):
        _fail(f"--auth / MLFLOW_AUTH must be basic or none, got {args.auth!r}")
    if args.auth_default_permission not in _PERMISSIONS:
        _fail(
            f"--auth-default-permission / MLFLOW_AUTH_DEFAULT_PERMISSION must be one of {', '.join(_PERMISSIONS)}, "
            f"got {args.auth_default_permission!r}"
        )
    try:
        args.auth_cache_seconds = int(args.auth_cache_seconds)
        if args.auth_cache_seconds < 0:
            raise ValueError
    except ValueError:
        _fail(
            f"--auth-cache-seconds / MLFLOW_AUTH_CACHE_SECONDS must be 0 (off) or a number of seconds, "
            f"got {args.auth_cache_seconds!r}"
        )
    if args.auth is None:
        if not _is_loopback(args.host):
            _fail(
                f"--host {args.host} with no authentication: anyone who reaches port {args.port} could read and "
                "change every run and artifact. Pass --auth basic (MLflow's basic-auth app; admin password in "
                "MLFLOW_AUTH_ADMIN_PASSWORD), or bind 127.0.0.1 behind an authenticating reverse proxy "
                "(infra/mlflow/README.md), or --auth none to serve a trusted network openly"
            )
        args.auth = "none"
    if args.auth == "none" and not _is_loopback(args.host):
        print(
            f"warning: serving {args.host}:{args.port} without authentication (--auth none)",
            file=sys.stderr,
            flush=True,
        )
    check_backend(args.backend_store_uri)
    backend = args.backend_store_uri
    if urlsplit(backend).scheme == "postgresql":
        # SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3; name the driver this setup installs
        backend = "postgresql+psycopg2://" + backend[len("postgresql://") :]

    # The backend store URI goes to `mlflow server` through MLFLOW_BACKEND_STORE_URI (its --backend-store-uri
    # reads it), never as a flag: a command line is visible to every user in `ps`, an environment is not.
    os.environ["MLFLOW_BACKEND_STORE_URI"] = backend
    exe = shutil.which("mlflow")
    cmd = [exe or "mlflow", "server", "--host", args.host, "--port", str(args.port), "--workers", str(args.workers)]
    if args.artifact_mode == "proxy":
        cmd += ["--serve-artifacts", "--artifacts-destination", args.artifacts]
    else:
        cmd += ["--no-serve-artifacts", "--default-artifact-root", args.artifacts]
    if args.allowed_hosts:
        cmd += ["--allowed-hosts", args.allowed_hosts]
    if args.auth == "basic":
        ini, user_store = _auth_config(
            args.auth_dir, args.auth_db_uri, args.auth_default_permission, args.auth_cache_seconds
        )
        os.environ["MLFLOW_AUTH_CONFIG_PATH"] = ini  # the server and its workers inherit it
        if not os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY"):
            os.environ["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secrets.token_hex(32)
        cmd += ["--app-name", "basic-auth"]
        print(
            f"authentication: MLflow basic auth, users in {_masked(user_store)}, admin user "
            f"{os.environ.get('MLFLOW_AUTH_ADMIN_USERNAME') or 'admin'}, default permission "
            f"{args.auth_default_permission} (config {ini})",
            flush=True,
        )
        check_basic_auth(args.dry_run)
    shown = " ".join(_masked(c) for c in cmd)
    print(f"mlflow team server: MLFLOW_BACKEND_STORE_URI={_masked(backend)} {shown}", flush=True)
    if args.dry_run:
        return 0
    if exe is None:
        _fail("the `mlflow` command is not on PATH: pip install mlflow psycopg2-binary", 1)
    os.execv(exe, cmd)  # the server replaces this process: signals reach it directly
    return 0


if __name__ == "__main__":
    sys.exit(main())
