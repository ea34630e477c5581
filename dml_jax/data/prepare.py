"""Prepare one of the papers' data sets from its original archives, without TensorFlow.

    python -m dml_jax.data.prepare {cub,cars196,sop,uc_merced} --manual_dir DIR [--data_dir DIR]

``--manual_dir`` holds the archives exactly as downloaded (which ones, and from where:
``docs/data.md``); ``--data_dir`` defaults to ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``.
Prints the directory written, its split sizes and files. A missing archive ends the command
with one message naming the file, the directory searched and where to download it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from dml_jax.data import builders


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line: ``name``, ``--manual_dir``, ``--data_dir``."""
    parser = argparse.ArgumentParser(
        prog="python -m dml_jax.data.prepare",
        description="Prepare a data set from its original archives as TFDS array_record "
        "files, without TensorFlow (see docs/data.md).",
    )
    parser.add_argument("name", choices=sorted(set(builders.ALIASES) | set(builders.BUILDERS)),
                        help="data set (cub, cars196, sop, uc_merced, or its TFDS name)")
    parser.add_argument("--manual_dir", required=True,
                        help="directory holding the downloaded archives")
    parser.add_argument("--data_dir", default=None,
                        help="output root (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    return parser.parse_args(argv)


def summary(builder: builders.ManualBuilder) -> str:
    """What was written: directory, split sizes and files (reads only metadata)."""
    lines = [f"{builder.name} {builder.version} prepared in {builder.data_dir}"]
    for split, info in sorted(builder.info.splits.items()):
        lines.append(f"  {split}: {info.num_examples} examples")
    for key, value in sorted(builder.info.metadata.items()) if builder.info.metadata else ():
        lines.append(f"  {key}: {value}")
    for name in sorted(os.listdir(builder.data_dir)):
        size = os.path.getsize(os.path.join(builder.data_dir, name))
        lines.append(f"  {name}  {size:,} bytes")
    lines.append(f"Read it with tfds.data_source({builder.name!r}, split=..., "
                 f"data_dir={os.path.dirname(os.path.dirname(builder.data_dir))!r}).")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command; returns the exit status (2 for a missing archive)."""
    args = parse_args(argv)
    try:
        builder = builders.prepare(args.name, args.manual_dir, args.data_dir)
    except builders.MissingArchiveError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary(builder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
