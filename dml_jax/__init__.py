"""dml_jax: deep metric learning in JAX.

Submodules:
  * :mod:`dml_jax.distances` -- pairwise distances, similarities and label masks.
  * :mod:`dml_jax.parallel` -- what the ``axis_name`` contract of the losses needs.
  * :mod:`dml_jax.losses` -- pure, jit-able metric-learning losses.
  * :mod:`dml_jax.synthesis` -- symmetrical synthesis of hard samples (Gu & Ko, AAAI 2020).
  * :mod:`dml_jax.evaluation` -- retrieval, clustering, re-ID and classification metrics.
  * :mod:`dml_jax.models` -- Flax NNX model zoo and pretrained-weight import.
  * :mod:`dml_jax.audio` -- speech front end, spoken-word sources, word recognition.
  * :mod:`dml_jax.host_memory` -- keeping freed host memory, so XLA:CPU's buffers stop faulting.
"""

__version__ = "0.1.0"
