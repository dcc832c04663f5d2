"""The notebooks run top to bottom at reduced size, and are committed with their plots."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_the_five_notebooks_are_there():
  assert [p.name[:3] for p in NOTEBOOKS] == ["01_", "02_", "03_", "04_", "05_"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_with_outputs_and_plots(path):
  cells = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
  outputs = [o for c in cells for o in c.outputs]
  assert all(c.execution_count is not None for c in cells), "commit the notebook executed"
  assert not [o for o in outputs if o.output_type == "error"]
  assert any("image/png" in o.get("data", {}) for o in outputs), "no plot in the outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_executes_at_reduced_size(path, tmp_path, monkeypatch):
  # The notebook is executed in memory and never written back: the committed
  # outputs stay those of the full-size run.
  monkeypatch.setenv("ASAM_JAX_QUICK", "1")
  notebook = nbformat.read(path, as_version=4)
  client = NotebookClient(
    notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
  )
  client.execute()  # raises CellExecutionError, with the traceback, if a cell fails
  outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
  assert any("image/png" in o.get("data", {}) for o in outputs)
