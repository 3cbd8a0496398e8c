"""Real servers on loopback for the MLflow tests (owned by tests/test_mlflow_team.py and
tests/test_tracking_outage.py): an `mlflow server` process group and a throwaway PostgreSQL cluster."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from conftest import ROOT, free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def wait_http(url: str, proc: subprocess.Popen, log: Path, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_group(proc)
                raise RuntimeError(f"{what} did not answer on {url}; log:\n{log.read_text()[-3000:]}") from None
            time.sleep(0.3)


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Signal the process group this test started (the server and its workers), then reap it."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)


class MlflowServer:
    """`mlflow server` (or infra/mlflow/serve.py) in its own process group on a free loopback port."""

    def __init__(
        self,
        args: list[str],
        log: Path,
        env: dict[str, str] | None = None,
        port: int | None = None,
        via_script: bool = False,
    ):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        full_env.update(env or {})
        if via_script:
            cmd = [
                sys.executable,
                str(ROOT / "infra/mlflow/serve.py"),
                *args,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ]
        else:
            cmd = [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                *args,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ]
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=log.parent, start_new_session=True
            )
        wait_http(f"{self.url}/health", self.proc, log, "mlflow server")

    def kill(self) -> None:
        """An outage: SIGKILL to the whole server (no graceful shutdown)."""
        stop_group(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        stop_group(self.proc)


class Postgres:
    """A throwaway PostgreSQL 15 cluster: initdb in a temporary folder, TCP on 127.0.0.1, password auth.

    PostgreSQL refuses to run as root, so as root the cluster belongs to the `postgres` OS user
    (runuser); otherwise to the current user. `why_not()` says why it cannot start, or None.
    """

    user, password, database = "golf", "pg-secret-4d1f9", "mlflow"

    @staticmethod
    def why_not() -> str | None:
        if not (PG_BIN / "initdb").is_file():
            return f"PostgreSQL is not installed ({PG_BIN}/initdb missing; apt-get install postgresql)"
        if os.geteuid() == 0 and (
            shutil.which("runuser") is None
            or subprocess.run(["id", "-u", "postgres"], capture_output=True).returncode != 0
        ):
            return "running as root without a `postgres` OS user (or runuser) to own the cluster"
        return None

    def __init__(self):
        self.base = Path(tempfile.mkdtemp(prefix="golf-pg-"))  # not under pytest's root-only tmp folder
        self.port = free_port()
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as:
            shutil.chown(self.base, "postgres", "postgres")
        (self.base / "pw").write_text(self.password)
        if self._as:
            shutil.chown(self.base / "pw", "postgres", "postgres")
        self._run(
            PG_BIN / "initdb",
            "-D",
            self.base / "data",
            "-U",
            self.user,
            "--pwfile",
            self.base / "pw",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--no-sync",
        )
        self.log = self.base / "postgres.log"
        self.proc = subprocess.Popen(
            [
                *self._as,
                str(PG_BIN / "postgres"),
                "-D",
                str(self.base / "data"),
                "-k",
                str(self.base),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-c",
                "fsync=off",
            ],
            stdout=open(self.log, "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while (
            subprocess.run(
                [PG_BIN / "pg_isready", "-h", "127.0.0.1", "-p", str(self.port)], capture_output=True
            ).returncode
            != 0
        ):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"PostgreSQL did not start; log:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)
        self._run(PG_BIN / "createdb", "-h", self.base, "-p", str(self.port), "-U", self.user, self.database)

    def _run(self, *cmd) -> None:
        proc = subprocess.run([*self._as, *map(str, cmd)], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, cmd))} failed: {proc.stdout}{proc.stderr}")

    @property
    def uri(self) -> str:
        """The backend store URI, without the password (that goes through PGPASSWORD)."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.database}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # the group this class started: PostgreSQL's fast shutdown
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        shutil.rmtree(self.base, ignore_errors=True)
