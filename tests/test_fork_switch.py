"""GOLF_TESTS_FORKSERVER=0 (tests/plain_runs.py): the suite's command lines as plain subprocesses, with the fork
server's interface, so the suite can be timed with and without it (docs/development.md)."""

import os
import signal
import time

from plain_runs import PlainServer, start_plain


def test_a_plain_run_reports_like_a_forked_one(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(
        "import os, sys\nprint('out', os.environ['GOLF_X'], sys.argv[1:], os.getcwd())\n"
        "print('err', file=sys.stderr)\nsys.exit(3)\n"
    )
    run = PlainServer({**os.environ, "GOLF_X": "1"}).run([script, "a"], tmp_path / "run", cwd=tmp_path)
    assert run.wait(60) == 3 and run.rc == 3
    assert run.stdout == f"out 1 ['a'] {tmp_path}\n" and run.stderr == "err\n"
    assert run.completed(1).returncode == 3


def test_a_killed_plain_run_leaves_no_exit_status_and_leads_its_group(tmp_path):
    script = tmp_path / "sleeper.py"
    script.write_text(
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print('up', flush=True)\ntime.sleep(60)\n"
    )
    run = start_plain(str(script), [], dict(os.environ))  # an absolute script path stays as it is
    deadline = time.monotonic() + 60
    while "up" not in run.stdout:
        assert run.running() and time.monotonic() < deadline, run.stderr
        time.sleep(0.01)
    assert os.getpgid(run.pid) == run.pid  # a kill of its group reaches what it started
    run.kill()
    assert run.status == -signal.SIGKILL and run.rc is None and not run.running()
