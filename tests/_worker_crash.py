"""A pytest plugin for ``pytest -n`` (xdist): a test whose worker process died runs once more.

JAX has on rare occasions segfaulted a worker while compiling a program
(``jax/_src/compiler.py``, ``backend_compile_and_load``) or serialising it for the persistent
compilation cache that ``tests/conftest.py`` enables (``jax/_src/compilation_cache.py``,
``put_executable_and_time``): in about one full run in five on the project's 2-core VMs, in
tests of every kind, and never reproduced by the test alone. The crash is outside the test's
code, and a fresh worker runs the test to completion; so the test that was running when its
worker died is scheduled again, once, on the replacement worker. (xdist's controller, where
this hook runs, does not see why a worker died, so any crash is retried once;
``tests/_subprocess.py``, which has the process's stderr, retries only a segfault inside JAX's
compilation.) A test that takes its worker down a second time fails, with xdist's "worker
crashed while running" report, as it would without this plugin. Each retried test is counted as
``rerun`` in the summary line and named in its own section of the terminal summary, so a retry
is never silent.

The retry needs xdist's ``load`` scheduler (``make test`` runs ``--dist load``): the
``loadscope`` / ``loadgroup`` schedulers cannot put a test back in the queue, and in
pytest-xdist 3.8 they hang the session when a crashed worker is replaced (pytest-xdist issues
1323 and 1327, fixed after that release) or stop it with an internal error (issue 1189).
Under them the crashed test fails as before.
"""

from __future__ import annotations

import pytest

_RETRIES = 1
_CRASHES = pytest.StashKey[dict]()


@pytest.hookimpl(optionalhook=True)
def pytest_handlecrashitem(crashitem: str, report: pytest.TestReport, sched) -> None:
    """xdist's hook for a test whose worker died: reschedules ``crashitem`` (its node id) the
    first time, marking ``report`` (the crash's failure report) as a ``rerun``."""
    crashes = sched.config.stash.setdefault(_CRASHES, {})
    crashes[crashitem] = crashes.get(crashitem, 0) + 1
    if crashes[crashitem] > _RETRIES:
        return
    try:
        sched.mark_test_pending(crashitem)
    except NotImplementedError:  # loadscope / loadgroup: the crash stays a failure
        return
    report.outcome = "rerun"


def pytest_report_teststatus(report: pytest.TestReport) -> tuple | None:
    """The summary's category, letter and word of a crashed test that is run again."""
    if report.outcome == "rerun":
        return "rerun", "R", ("RERUN", {"yellow": True})
    return None


def pytest_terminal_summary(terminalreporter) -> None:
    """Names each test run again after its worker crashed, with the crash's report."""
    reruns = terminalreporter.stats.get("rerun", [])
    if not reruns:
        return
    terminalreporter.write_sep("=", "tests run again after their worker crashed", yellow=True)
    for report in reruns:
        terminalreporter.write_line(f"RERUN {report.nodeid}: {report.longrepr}")
