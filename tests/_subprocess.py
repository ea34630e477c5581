"""Run a snippet in a fresh Python process with simulated CPU devices.

Multi-device tests must not share a process with single-device ones: the device count is fixed
when JAX initialises its backend.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_with_devices(code: str, num_devices: int = 8, timeout: float = 600.0) -> str:
    """Runs ``code`` with ``num_devices`` CPU devices and returns its stdout.

    Raises ``AssertionError`` with the process's stderr if it exits non-zero.
    """
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"subprocess failed ({proc.returncode}):\nstdout:\n{proc.stdout[-4000:]}\n"
            f"stderr:\n{proc.stderr[-8000:]}"
        )
    return proc.stdout
