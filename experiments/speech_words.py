"""Spoken-word recognition: ``python experiments/speech_words.py --config CONFIG.py[:row]``.

Flags only; the work is in :func:`dml_jax.audio.train_speech.run_speech_experiment`. Override
any config entry with ``--config.key=value``. The last line printed is the summary
``speech: unseen speakers DML ... (classifier ...), target speaker DML ... (classifier ...)``.
"""

import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dml_jax import host_memory

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a get_config() file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Optional directory for results.json.")
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    host_memory.retain_freed_memory()  # before JAX starts its threads; see dml_jax/host_memory.py
    from dml_jax.audio import train_speech

    results = train_speech.run_speech_experiment(FLAGS.config, FLAGS.workdir)
    print()
    print(train_speech.format_table(results))
    print(train_speech.summary_line(results))


if __name__ == "__main__":
    app.run(main)
