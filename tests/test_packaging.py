"""Packaging: the core installs with JAX and NumPy alone; a part whose extra is missing says
which extra to install."""

from __future__ import annotations

import configparser
import subprocess
import sys
import textwrap

from tests._subprocess import REPO_ROOT

CORE_CHECK = textwrap.dedent("""
    import importlib.util, sys
    import jax, jax.numpy as jnp, numpy as np
    import dml_jax
    from dml_jax import distances, evaluation, losses, parallel, synthesis
    assert "site-packages" in dml_jax.__file__, dml_jax.__file__
    for heavy in ("flax", "optax", "orbax", "sklearn", "tensorflow_datasets", "grain", "torch",
                  "matplotlib", "ml_collections"):
        assert importlib.util.find_spec(heavy) is None, heavy + " is installed"
    rng = np.random.default_rng(0)
    e = rng.normal(size=(16, 8)).astype(np.float32)
    y = np.repeat(np.arange(4), 4)
    value, grad = jax.jit(jax.value_and_grad(losses.triplet_loss))(e, y)
    assert np.isfinite(float(value)) and float(value) > 0 and np.all(np.isfinite(grad))
    assert np.isfinite(float(synthesis.symmetric_contrastive_loss(e, y)))
    metrics = evaluation.retrieval_metrics(e, y)
    assert 0.0 <= metrics["map@r"] <= 1.0
    for part, extra in (("dml_jax.train", "train"), ("dml_jax.models", "models")):
        try:
            __import__(part)
        except ImportError as err:
            assert f"dml_jax[{extra}]" in str(err), str(err)
        else:
            raise AssertionError(part + " imported without its extra")
    print("CORE OK")
""")


def test_install_requires_is_the_core():
    config = configparser.ConfigParser()
    config.read(REPO_ROOT / "setup.cfg")
    requires = [r.split(">")[0].split("=")[0].strip()
                for r in config["options"]["install_requires"].splitlines() if r.strip()]
    assert sorted(requires) == ["jax", "numpy"]
    extras = config["options.extras_require"]
    for extra in ("models", "train", "data", "eval", "audio", "all"):
        assert extra in extras, extra


def test_the_core_installs_alone_in_a_fresh_venv_and_runs(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", str(REPO_ROOT)],
                             capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-3000:]
    env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    run = subprocess.run([str(python), "-c", CORE_CHECK], capture_output=True, text=True,
                         cwd=tmp_path, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "CORE OK" in run.stdout
