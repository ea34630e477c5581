"""Two processes on 127.0.0.1 joined by jax.distributed train like one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from dml_jax import train
from tests._subprocess import REPO_ROOT

CONFIG = REPO_ROOT / "experiments" / "configs" / "digits.py"
ARGS = [
    "--config.num_steps=5", "--config.log_every=1", "--config.eval_every=5",
    "--config.checkpoint_every=100", "--config.progress_bar=False", "--config.plots=False",
    "--config.loss.name=contrastive", "--config.loss.kwargs={}",
    "--config.loss.classifier_weight=0.0", "--config.classes_per_batch=8",
    "--config.samples_per_class=4", "--config.model.backbone_kwargs.widths=(8, 16)",
    "--config.model.embedding_dim=16",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir, devices, extra=()):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    cmd = [sys.executable, str(REPO_ROOT / "experiments" / "main.py"), f"--config={CONFIG}",
           f"--workdir={workdir}", *ARGS, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=REPO_ROOT)


@pytest.mark.multidevice
def test_two_processes_train_like_one(tmp_path):
    single = _launch(tmp_path / "single", devices=8)
    out, _ = single.communicate(timeout=600)
    assert single.returncode == 0, out

    port = _free_port()
    procs = [
        _launch(tmp_path / "multi", devices=4, extra=(
            f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
            f"--process_id={i}"))
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    assert "map@r" in outs[0]  # process 0 reports and writes the metrics

    def losses(name):
        return [r["loss"] for r in train.read_metrics(str(tmp_path / name)) if "loss" in r]

    # Same global batch on 8 devices, split over 2 hosts or not: same arithmetic up to the
    # order of float32 reductions.
    assert len(losses("multi")) == 5
    np.testing.assert_allclose(losses("multi"), losses("single"), rtol=1e-5)
    evals = [r for r in train.read_metrics(str(tmp_path / "multi")) if "map@r" in r]
    single_evals = [r for r in train.read_metrics(str(tmp_path / "single")) if "map@r" in r]
    assert json.dumps(sorted(evals[-1])) == json.dumps(sorted(single_evals[-1]))
    np.testing.assert_allclose(evals[-1]["map@r"], single_evals[-1]["map@r"], rtol=1e-4)
