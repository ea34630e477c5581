"""The test session's retries after a segfault: a crashed xdist worker's test
(``tests/_worker_crash.py``), in pytest sessions of their own (a test whose worker dies once
passes on the replacement, one that dies every time fails, and neither hangs), and a
subprocess that died inside JAX's compilation (``tests/_subprocess.py``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests._subprocess import REPO_ROOT, crashed_in_jax_compilation, run_with_devices

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


@pytest.mark.parametrize(
    "always, options, returncode, shown, hidden",
    [
        # crashing once: run again on the replacement worker, passed, the rerun named
        (False, ("--dist", "load"), 0,
         ("3 passed, 1 rerun", "tests run again after their worker crashed",
          "RERUN test_crashing.py::test_crashes: worker 'gw0' crashed"), ()),
        # crashing every time: one rerun, then xdist's failure
        (True, ("--dist", "load"), 1,
         ("1 failed, 2 passed, 1 rerun",
          "crashed while running 'test_crashing.py::test_crashes'"), ()),
        # loadscope cannot requeue a test: a failure, as without the plugin (no worker restart,
        # where xdist 3.8 would hang or stop on this schedule)
        (False, ("--dist", "loadscope", "--max-worker-restart", "0"), 1, ("1 failed",),
         ("rerun",)),
    ],
    ids=["crashes once", "crashes every time", "loadscope"],
)
def test_a_crashed_workers_test_runs_once_more(tmp_path, always, options, returncode, shown,
                                               hidden):
    proc = _session(tmp_path, always, *options)
    out = proc.stdout
    assert proc.returncode == returncode, out + proc.stderr
    for text in shown:
        assert text in out, (text, out)
    for text in hidden:
        assert text not in out, (text, out)


# faulthandler's reports of the crash as xdist workers printed them (paths shortened): in the
# cache's serialisation, and in XLA's compile.
_CACHE_CRASH = """Fatal Python error: Segmentation fault

Thread 0x00007f65977fe6c0 (most recent call first):
  File "/usr/lib/python3.11/threading.py", line 331 in wait

Current thread 0x00007f664cbdbb80 (most recent call first):
  File "/venv/site-packages/jax/_src/compilation_cache.py", line 368 in put_executable_and_time
  File "/venv/site-packages/jax/_src/compiler.py", line 828 in _cache_write
"""
_COMPILE_CRASH = """Fatal Python error: Segmentation fault

Current thread 0x00007ff3965edb80 (most recent call first):
  File "/venv/site-packages/jax/_src/compiler.py", line 353 in backend_compile_and_load
  File "/venv/site-packages/jax/_src/profiler.py", line 420 in wrapper
"""


def test_only_a_segfault_inside_jax_compilation_counts_as_that_crash():
    sigsegv = -11
    assert crashed_in_jax_compilation(sigsegv, _CACHE_CRASH)
    assert crashed_in_jax_compilation(sigsegv, _COMPILE_CRASH)
    assert not crashed_in_jax_compilation(1, _CACHE_CRASH)  # not a segfault
    assert not crashed_in_jax_compilation(-6, _COMPILE_CRASH)  # an abort
    assert not crashed_in_jax_compilation(sigsegv, "")  # no traceback
    elsewhere = _CACHE_CRASH.replace(
        "Current thread 0x00007f664cbdbb80 (most recent call first):\n",
        "Current thread 0x00007f664cbdbb80 (most recent call first):\n"
        '  File "/repo/dml_jax/losses/triplet.py", line 10 in _count_below\n',
    )
    assert not crashed_in_jax_compilation(sigsegv, elsewhere)  # the crash is in another frame
    other_thread = _CACHE_CRASH.replace("Current thread", "Thread")
    assert not crashed_in_jax_compilation(sigsegv, other_thread)
    lookalike = _COMPILE_CRASH.replace("jax/_src/compiler.py", "jax/_src/compiler.pyx")
    assert not crashed_in_jax_compilation(sigsegv, lookalike)


# A snippet that segfaults (SIGSEGV, with faulthandler's report) inside `function` of a module
# at `path` under its directory (a fake of JAX's file there), and counts its runs.
_SEGFAULTING = """
import importlib.util, os, signal
from pathlib import Path

runs = Path({runs!r})
runs.write_text(runs.read_text() + "x" if runs.exists() else "x")
spec = importlib.util.spec_from_file_location("fake", {module!r})
fake = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fake)
if {always!r} or len(runs.read_text()) == 1:
    fake.{function}()
print("done after", len(runs.read_text()), "runs")
"""


def _segfaulting(tmp_path, always: bool, path: str = "jax/_src/compilation_cache.py",
                 function: str = "put_executable_and_time") -> str:
    module = tmp_path / path
    module.parent.mkdir(parents=True)
    module.write_text(
        f"import os, signal\n\n\ndef {function}():\n    os.kill(os.getpid(), signal.SIGSEGV)\n"
    )
    return _SEGFAULTING.format(runs=str(tmp_path / "runs"), module=str(module), always=always,
                               function=function)


@pytest.mark.parametrize("path, function", [
    ("jax/_src/compilation_cache.py", "put_executable_and_time"),
    ("jax/_src/compiler.py", "backend_compile_and_load"),
])
def test_a_subprocess_that_crashed_inside_jax_compilation_runs_again(tmp_path, path, function):
    with pytest.warns(UserWarning, match="segfaulted inside JAX's compilation"):
        out = run_with_devices(_segfaulting(tmp_path, False, path, function), num_devices=1)
    assert out.strip() == "done after 2 runs"


def test_a_second_compilation_crash_or_another_segfault_fails(tmp_path):
    with pytest.warns(UserWarning), pytest.raises(AssertionError, match="subprocess failed"):
        run_with_devices(_segfaulting(tmp_path / "twice", always=True), num_devices=1)
    assert (tmp_path / "twice" / "runs").read_text() == "xx"
    with pytest.raises(AssertionError, match="subprocess failed"):
        run_with_devices(_segfaulting(tmp_path / "other", False, "dml_jax/losses/triplet.py",
                                      "put_executable_and_time"), num_devices=1)
    assert (tmp_path / "other" / "runs").read_text() == "x"  # not run again
