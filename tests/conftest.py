"""Shared pytest set-up: CPU only; one persistent compilation cache for the test session.

The suite's time is mostly XLA compilation, and many programs are compiled more than once: a
training run and its resume, the same step in several tests, a program in each of the
processes a test starts (two-process training, 8-device subprocesses, notebooks). A
persistent compilation cache in a fresh directory, shared by the xdist workers and every
process they start (they inherit the environment) and removed when the session ends, serves
the repeats: the same executables, so the same results, in about four fifths of the time for
the training and experiment tests. A ``JAX_COMPILATION_CACHE_DIR`` set by the caller is used
as is and kept.
"""

import os
import shutil
import tempfile

# A test whose xdist worker crashed runs once more on the replacement worker (the cache's rare
# segfault, below): the plugin's hooks, loaded with this file.
from tests._worker_crash import (  # noqa: F401
    pytest_handlecrashitem,
    pytest_report_teststatus,
    pytest_terminal_summary,
)

os.environ.setdefault("JAX_PLATFORMS", "cpu")

_CACHE_ENV = "DML_JAX_TEST_COMPILATION_CACHE"
# The first process to load this file (pytest's controller) makes the directory; the xdist
# workers and subprocesses inherit the variable and share it.
_OWNS_CACHE = _CACHE_ENV not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWNS_CACHE:
    os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="dml_jax_test_jit_cache_")
if _CACHE_ENV in os.environ:
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ[_CACHE_ENV])
    # Only programs that take a second or more to compile (training steps, the larger losses):
    # JAX has, rarely, segfaulted an xdist worker while serialising an executable for the cache
    # (and while compiling; tests/_worker_crash.py runs that worker's test again), so the small
    # programs, most of the suite's compilations, are not written (the suite: 815 s at 1 s,
    # 781-837 s at 0.3).
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1.0")


def pytest_unconfigure(config):
    """Removes the session's compilation cache (only in the process that made it)."""
    del config
    if _OWNS_CACHE:
        shutil.rmtree(os.environ[_CACHE_ENV], ignore_errors=True)
