"""TF-free builders of the papers' data sets, and where their prepared copies live.

Each builder reads the data set's original archives from a manual directory and writes the
same data set TFDS's own builder of that name and version would (same features, splits,
example keys, hence the same record order), as ``array_record`` files, with neither
TensorFlow nor Apache Beam installed::

    python -m dml_jax.data.prepare cub --manual_dir ~/archives     # or prepare(...) below

A prepared data set lives in ``<data_dir>/<name>/<version>/`` and is read with
``tfds.data_source(name, split=..., data_dir=data_dir)`` or
``open_prepared(name, data_dir).as_data_source(split)``; the default ``data_dir`` is TFDS's:
``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``. Archives, layouts and features:
``docs/data.md``.
"""

from __future__ import annotations

import os
from pathlib import Path

import tensorflow_datasets as tfds

from dml_jax.data.builders._base import ManualBuilder, MissingArchiveError
from dml_jax.data.builders.cars196 import Cars196
from dml_jax.data.builders.cub import CaltechBirds2011
from dml_jax.data.builders.sop import StanfordOnlineProducts
from dml_jax.data.builders.uc_merced import UcMerced

BUILDERS: dict[str, type[ManualBuilder]] = {
    cls.name: cls for cls in (CaltechBirds2011, Cars196, StanfordOnlineProducts, UcMerced)
}
ALIASES = {"cub": "caltech_birds2011", "cars196": "cars196", "cars": "cars196",
           "sop": "stanford_online_products", "uc_merced": "uc_merced"}


def canonical_name(name: str) -> str:
    """The TFDS name of a data set given its TFDS name or an alias (``cub``, ``sop``, ...).

    Raises:
      ValueError: naming ``name`` and the accepted names.
    """
    name = ALIASES.get(name, name)
    if name not in BUILDERS:
        raise ValueError(f"Unknown data set {name!r}; expected one of "
                         f"{sorted(set(ALIASES) | set(BUILDERS))}.")
    return name


def default_data_dir() -> Path:
    """TFDS's default data directory: ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``."""
    return Path(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser()


def prepared_dir(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """``<data_dir>/<name>/<version>``: where :func:`prepare` writes ``name`` (an alias works).

    ``data_dir=None`` means :func:`default_data_dir`. The directory may not exist yet.
    """
    name = canonical_name(name)
    root = default_data_dir() if data_dir is None else Path(data_dir).expanduser()
    return root / name / str(BUILDERS[name].VERSION)


def open_prepared(name: str, data_dir: str | os.PathLike | None = None) -> tfds.core.DatasetBuilder:
    """A read-only TFDS builder of the prepared ``name`` (from its stored metadata only).

    ``builder.as_data_source(split)`` gives the random-access source (no TensorFlow needed);
    ``builder.info`` the features and split sizes. Holds only metadata in memory.

    Raises:
      FileNotFoundError: naming the directory and the command that prepares it.
    """
    path = prepared_dir(name, data_dir)
    if not (path / "dataset_info.json").is_file():
        raise FileNotFoundError(
            f"{canonical_name(name)} is not prepared in {path}. Prepare it with "
            f"`python -m dml_jax.data.prepare {name} --manual_dir DIR "
            f"--data_dir {path.parent.parent}` (see docs/data.md)."
        )
    return tfds.builder_from_directory(os.fspath(path))


def prepare(name: str, manual_dir: str | os.PathLike,
            data_dir: str | os.PathLike | None = None) -> tfds.core.DatasetBuilder:
    """Prepares ``name`` from the archives in ``manual_dir``; returns the builder.

    Writes ``<data_dir>/<name>/<version>/`` (``array_record`` shards, ``dataset_info.json``,
    ``features.json``); does nothing when that directory is already complete. Streams the
    archives: holds one image (and the data set's metadata) in memory at a time.

    Raises:
      MissingArchiveError: naming each missing archive, ``manual_dir`` and where to get it.
    """
    builder_cls = BUILDERS[canonical_name(name)]
    builder_cls.archive_paths(manual_dir)
    root = prepared_dir(name, data_dir).parent.parent
    builder = builder_cls(data_dir=os.fspath(root))
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(
            manual_dir=os.fspath(Path(manual_dir).expanduser())),
    )
    return builder


__all__ = [
    "ALIASES",
    "BUILDERS",
    "CaltechBirds2011",
    "Cars196",
    "ManualBuilder",
    "MissingArchiveError",
    "StanfordOnlineProducts",
    "UcMerced",
    "canonical_name",
    "default_data_dir",
    "open_prepared",
    "prepare",
    "prepared_dir",
]
