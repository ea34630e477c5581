"""Reading members of the original ``.tgz`` / ``.zip`` archives without extracting them.

Member names are normalised the way TFDS's own archive iterator does (``os.path.normpath``,
forward slashes; hidden files, ``~`` backups and absolute or ``..`` paths are skipped), so the
names used as example keys are the ones TFDS's official builders would use.
"""

from __future__ import annotations

import os
import posixpath
import tarfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path


def normalise_member(name: str) -> str | None:
    """The member's path as TFDS's archive iterator names it, or None for skipped members."""
    path = posixpath.normpath(name.replace("\\", "/"))
    base = posixpath.basename(path)
    if path.startswith(".") or path.startswith("/") or path.endswith("~") or base.startswith("."):
        return None
    return path


def _is_zip(path: Path) -> bool:
    return path.suffix.lower() == ".zip"


def iter_members(
    archive: Path, wanted: Callable[[str], bool] = lambda name: True
) -> Iterator[tuple[str, bytes]]:
    """Yields ``(normalised name, bytes)`` of the archive's regular files, in archive order.

    Only members for which ``wanted(name)`` is true are read; one member's bytes are held in
    memory at a time. ``.zip`` archives are read with :mod:`zipfile`, anything else as a
    (possibly compressed) tar file, streamed once from the start.

    Raises:
      ValueError: naming ``archive`` when it is not a readable tar/zip archive.
    """
    archive = Path(archive)
    try:
        if _is_zip(archive):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    if info.is_dir():
                        continue
                    name = normalise_member(info.filename)
                    if name is not None and wanted(name):
                        yield name, zf.read(info)
        else:
            with tarfile.open(archive, mode="r|*") as tf:
                for member in tf:
                    if not member.isfile():
                        continue
                    name = normalise_member(member.name)
                    if name is None or not wanted(name):
                        continue
                    fobj = tf.extractfile(member)
                    if fobj is not None:
                        yield name, fobj.read()
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as err:
        raise ValueError(f"Cannot read archive {os.fspath(archive)}: {err}") from err


def read_members(archive: Path, names: Iterable[str]) -> dict[str, bytes]:
    """Reads the given members (normalised names) in one pass; returns ``{name: bytes}``.

    Holds the bytes of every requested member in memory (use it for metadata files).

    Raises:
      FileNotFoundError: naming the archive and the members it does not contain.
    """
    wanted = set(names)
    found = dict(iter_members(archive, lambda name: name in wanted))
    missing = sorted(wanted - found.keys())
    if missing:
        raise FileNotFoundError(
            f"Archive {os.fspath(archive)} has no member(s) {missing}: is it the original "
            "(unmodified) archive of this data set?"
        )
    return found
