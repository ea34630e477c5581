"""Run a snippet in a fresh Python process with simulated CPU devices.

Multi-device tests must not share a process with single-device ones: the device count is fixed
when JAX initialises its backend.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# The files of JAX's compile-and-cache path (tests/conftest.py turns the persistent cache on):
# a process has segfaulted with its innermost Python frame in either, compiling
# (`backend_compile_and_load`) or serialising an executable for the cache
# (`put_executable_and_time`), the crash tests/_worker_crash.py retries in the xdist workers.
_COMPILATION_FILES = ("jax/_src/compiler.py", "jax/_src/compilation_cache.py")


def crashed_in_jax_compilation(returncode: int, stderr: str) -> bool:
    """Whether a process died of a segfault inside JAX's compilation: killed by SIGSEGV, with
    the first frame of faulthandler's current-thread traceback (``stderr``) in one of
    :data:`_COMPILATION_FILES`."""
    if returncode != -signal.SIGSEGV:
        return False
    _, found, trace = stderr.partition("Current thread")
    frames = [line for line in trace.splitlines() if line.strip().startswith("File ")]
    if not (found and frames):
        return False
    innermost = frames[0].replace("\\", "/")
    return any(f'{name}"' in innermost for name in _COMPILATION_FILES)


def run_with_devices(code: str, num_devices: int = 8, timeout: float = 600.0) -> str:
    """Runs ``code`` with ``num_devices`` CPU devices and returns its stdout.

    A run that segfaults inside JAX's compilation (:func:`crashed_in_jax_compilation`) is run
    once more, with a warning that names the crash; any other failure, or a second such crash,
    raises ``AssertionError`` with the process's stderr.
    """
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env["PYTHONFAULTHANDLER"] = "1"  # a segfault prints the Python stack
    for attempt in range(2):
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO_ROOT,
            timeout=timeout,
        )
        if attempt or not crashed_in_jax_compilation(proc.returncode, proc.stderr):
            break
        warnings.warn(
            "the subprocess segfaulted inside JAX's compilation; running it again:\n"
            f"{proc.stderr[-2000:]}",
            stacklevel=2,
        )
    if proc.returncode != 0:
        raise AssertionError(
            f"subprocess failed ({proc.returncode}):\nstdout:\n{proc.stdout[-4000:]}\n"
            f"stderr:\n{proc.stderr[-8000:]}"
        )
    return proc.stdout
