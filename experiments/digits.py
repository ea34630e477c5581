"""The demo (`make demo`): train on scikit-learn's digits, then compare the held-out retrieval
of the trained embedding with that of the raw pixels.

    python experiments/digits.py --workdir workdirs/digits [--config.num_steps=300 ...]

Flags as ``experiments/main.py``; the config is ``experiments/configs/digits.py``.
"""

import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dml_jax import host_memory

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", str(Path(__file__).resolve().parent / "configs" / "digits.py"),
    "Path to a get_config() file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
flags.mark_flags_as_required(["workdir"])

KEYS = ("recall@1", "map@r", "r_precision")


def summary_table(baseline, trained, keys=KEYS) -> str:
    """A plain-text table of raw-pixel vs trained retrieval metrics."""
    lines = [f"{'held-out digits':<18}{'raw pixels':>12}{'trained':>12}"]
    lines += [f"{k:<18}{baseline[k]:>12.4f}{trained[k]:>12.4f}" for k in keys]
    return "\n".join(lines)


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    host_memory.retain_freed_memory()  # before JAX starts its threads; see dml_jax/host_memory.py
    from dml_jax import data, evaluation, train

    try:
        result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except FloatingPointError as e:
        sys.exit(f"error: {e}")
    if result["preempted"]:
        return
    test = data.get_source(train.source_options(FLAGS.config), "test")
    pixels = test.images.reshape(len(test), -1).astype("float32") / 255.0
    baseline = evaluation.retrieval_metrics(pixels, test.labels, ks=tuple(FLAGS.config.eval_ks))
    print()
    print(summary_table(baseline, result["final"]))
    print(f"\nworkdir: {FLAGS.workdir} (metrics.jsonl, training_curves.png, embeddings_2d.png, "
          "checkpoints/)")


if __name__ == "__main__":
    app.run(main)
