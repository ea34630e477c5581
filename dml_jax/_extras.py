"""Optional dependencies: the core (losses, synthesis, distances, parallel, evaluation) needs
only JAX and NumPy; a part that needs more says which extra to install."""

from __future__ import annotations

import importlib.util


def require(part: str, extra: str, *modules: str) -> None:
    """Raises ``ImportError`` naming ``pip install 'dml_jax[extra]'`` if a module is missing.

    Args:
      part: the dml_jax module that needs them (for the message), e.g. ``"dml_jax.train"``.
      extra: the extra of ``setup.cfg`` that installs them, e.g. ``"train"``.
      modules: top-level import names, e.g. ``"flax"``, ``"optax"``.
    """
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"{part} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
            f"not installed: pip install 'dml_jax[{extra}]' (or 'dml_jax[all]'). The core "
            "(dml_jax.losses, synthesis, distances, parallel, evaluation) needs only jax and "
            "numpy."
        )
