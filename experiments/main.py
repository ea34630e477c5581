"""Runs an experiment: ``python experiments/main.py --config CONFIG.py --workdir DIR``.

Flags only; the work is in :func:`dml_jax.train.train_and_evaluate`. Override any config entry
with ``--config.key=value`` (e.g. ``--config.num_steps=100``). For several hosts, pass
``--coordinator_address``, ``--num_processes`` and ``--process_id`` (jax.distributed).
"""

import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dml_jax import host_memory

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a get_config() file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:  # libraries' INFO logs only on request (-v 0)
        logging.set_verbosity(logging.WARNING)
    host_memory.retain_freed_memory()  # before JAX starts its threads; see dml_jax/host_memory.py
    import jax

    if FLAGS.coordinator_address:
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                                   FLAGS.process_id)
    from dml_jax import train

    try:
        result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except FloatingPointError as e:  # diverged: the message names the step and checkpoint
        sys.exit(f"error: {e}")
    if jax.process_index() == 0 and not result["preempted"]:
        print()
        print(", ".join(f"{k}={v:.4f}" for k, v in result["final"].items()))
        print(f"\nworkdir: {FLAGS.workdir} (metrics.jsonl, training_curves.png, "
              "embeddings_2d.png, checkpoints/)")


if __name__ == "__main__":
    app.run(main)
