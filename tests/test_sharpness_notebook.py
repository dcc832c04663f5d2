"""notebooks/05_sharpness_correlation.ipynb runs end to end at its reduced (CI) size."""

import pathlib

import nbformat
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).parent.parent / "notebooks" / "05_sharpness_correlation.ipynb"


def test_sharpness_correlation_notebook_runs_quick(monkeypatch):
  monkeypatch.setenv("ASAM_JAX_QUICK", "1")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(nb, timeout=300, kernel_name="python3").execute()
  text = "".join(output.get("text", "") for cell in nb.cells for output in cell.get("outputs", []))
  assert "quick mode" in text
  for name in ["sharpness", "adaptive sharpness", "average adaptive sharpness"]:
    assert f"Kendall tau({name:>26}, generalization gap) = " in text
  assert "nan" not in text.lower()
