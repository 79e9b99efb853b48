"""The notebooks run headless, top to bottom, at their tiny setting (EDARNN_NOTEBOOK_TINY=1), and are stored
without outputs."""

from pathlib import Path

import nbformat
import pytest
from conftest import FAST_COMPILE_ENV
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_the_notebooks_are_there():
    assert {p.stem for p in NOTEBOOKS} >= {"compare_rules", "memory_probes", "kernels"}


# kernels (the forms agree, Pallas in interpret mode) and memory_probes run in the slow suite (`pytest -m slow`),
# about a minute each on two cores: the default suite keeps compare_rules, the notebook researchers start from
SLOW_NOTEBOOKS = {"kernels", "memory_probes"}


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, marks=pytest.mark.slow) if p.stem in SLOW_NOTEBOOKS else p for p in NOTEBOOKS],
    ids=lambda p: p.stem,
)
def test_notebook_runs(path, monkeypatch):
    notebook = nbformat.read(path, as_version=4)
    assert not any(cell.get("outputs") for cell in notebook.cells), f"{path.name}: stored with outputs"
    # the kernel inherits the environment: the tiny setting, the CPU, fast compiles, a headless plot backend
    for name, value in {**FAST_COMPILE_ENV, "EDARNN_NOTEBOOK_TINY": "1", "MPLBACKEND": "Agg"}.items():
        monkeypatch.setenv(name, value)
    client = NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": path.parent}})
    client.execute()  # raises CellExecutionError with the cell and its traceback if a cell fails
