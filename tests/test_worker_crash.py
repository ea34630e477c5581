"""The test session's worker-crash retry (``tests/_worker_crash.py``), in pytest sessions of
their own: a test whose worker dies once passes on the replacement, one that dies every time
fails, and neither hangs."""

from __future__ import annotations

import os
import subprocess
import sys

from tests._subprocess import REPO_ROOT

# A test that kills its worker (as a segfault would): on its first run only (it leaves a flag
# behind), or on every run with `always`; a test before and after it.
_CRASHING = """
import os
from pathlib import Path

FLAG = Path({flag!r})


def test_before():
    pass


def test_crashes():
    if {always!r} or not FLAG.exists():
        FLAG.touch()
        os._exit(139)


def test_after():
    pass
"""


def _session(tmp_path, always: bool, *options: str) -> subprocess.CompletedProcess:
    """A one-worker pytest session over ``_CRASHING`` with the plugin and ``options``."""
    test_file = tmp_path / "test_crashing.py"
    test_file.write_text(_CRASHING.format(flag=str(tmp_path / "crashed"), always=always))
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "1", "-p", "tests._worker_crash",
         "-p", "no:cacheprovider", "-q", "--rootdir", str(tmp_path), *options, str(test_file)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )


def test_a_test_whose_worker_crashes_once_runs_again_and_passes(tmp_path):
    proc = _session(tmp_path, False, "--dist", "load")
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "3 passed, 1 rerun" in out, out
    assert "tests run again after their worker crashed" in out, out
    assert "test_crashing.py::test_crashes" in out.split("worker crashed")[-1], out


def test_a_test_whose_worker_crashes_every_time_fails(tmp_path):
    proc = _session(tmp_path, True, "--dist", "load")
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    assert "1 failed, 2 passed, 1 rerun" in out, out
    assert "crashed while running 'test_crashing.py::test_crashes'" in out, out


def test_the_crash_stays_a_failure_where_the_scheduler_cannot_retry(tmp_path):
    # loadscope cannot requeue a test: the crash is reported as a failure, as without the
    # plugin (no worker restart, where xdist 3.8 would hang or stop on this schedule).
    proc = _session(tmp_path, False, "--dist", "loadscope", "--max-worker-restart", "0")
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    assert "1 failed" in out and "rerun" not in out, out
