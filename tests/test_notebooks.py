"""Every notebook in notebooks/ runs top to bottom without error (and, where a check is listed
in ``CHECKS``, prints what it should)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def _outputs(nb, output_type):
    return [out for cell in nb.cells if cell.cell_type == "code"
            for out in cell.get("outputs", []) if out.get("output_type") == output_type]


def _stdout(nb) -> str:
    return "".join(out.get("text", "") for out in _outputs(nb, "stream")
                   if out.get("name") == "stdout")


def _check_bring_your_own_data(nb) -> None:
    text = _stdout(nb)
    # The table "test split / raw pixels / trained" on the generated folder's held-out classes.
    for metric in ("map@r", "r_precision"):
        found = re.search(rf"^{re.escape(metric)}\s+([0-9.]+)\s+([0-9.]+)\s*$", text, re.M)
        assert found, f"no {metric} row in the notebook's output:\n{text}"
        raw, trained = float(found.group(1)), float(found.group(2))
        assert trained > raw + 0.05, f"{metric}: trained {trained} vs raw pixels {raw}"
    # The nearest-neighbour grid is drawn, and the second call resumes and trains on.
    assert any("image/png" in out.get("data", {}) for out in _outputs(nb, "display_data"))
    assert "Resumed from the checkpoint of step 50" in text
    assert re.search(r"map@r after 70 steps: [0-9.]+", text), text


CHECKS = {"bring_your_own_data.ipynb": _check_bring_your_own_data}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, monkeypatch):
    # The kernel is another process: let it import this checkout however it is installed.
    root = str(path.parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()
    errors = _outputs(nb, "error")
    assert not errors
    if path.name in CHECKS:
        CHECKS[path.name](nb)


def test_there_is_a_notebook():
    assert NOTEBOOKS, "notebooks/ holds no notebook"


def test_every_check_names_a_notebook():
    assert set(CHECKS) <= {p.name for p in NOTEBOOKS}
