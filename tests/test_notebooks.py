"""The notebooks run top to bottom at reduced size, and are committed with their plots."""

import importlib.util
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import asam_jax

pytestmark = pytest.mark.slow

NOTEBOOK_DIR = Path(__file__).parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))

_spec = importlib.util.spec_from_file_location("run_notebooks", NOTEBOOK_DIR / "run_notebooks.py")
run_notebooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_notebooks)


def test_the_notebooks_are_numbered_and_each_is_in_the_readme():
  # Whatever notebooks exist: numbered 01, 02, ... without gaps, so that the
  # parametrized tests below cannot silently run on none or miss one, and each
  # one described in notebooks/README.md.
  assert NOTEBOOKS, "no notebooks found"
  assert [p.name[:3] for p in NOTEBOOKS] == [f"{i:02d}_" for i in range(1, len(NOTEBOOKS) + 1)]
  readme = (NOTEBOOK_DIR / "README.md").read_text()
  for path in NOTEBOOKS:
    assert f"({path.name})" in readme, f"notebooks/README.md does not link {path.name}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_with_outputs_and_plots(path):
  cells = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
  outputs = [o for c in cells for o in c.outputs]
  assert all(c.execution_count is not None for c in cells), "commit the notebook executed"
  assert not [o for o in outputs if o.output_type == "error"]
  assert any("image/png" in o.get("data", {}) for o in outputs), "no plot in the outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_exported_images_are_the_committed_plots(path):
  plots = run_notebooks.plots(nbformat.read(path, as_version=4))
  expected = run_notebooks.image_paths(path, len(plots))
  assert sorted(NOTEBOOK_DIR.joinpath("images").glob(f"{path.stem}_*.png")) == sorted(expected), (
    "run python notebooks/run_notebooks.py --images-only"
  )
  for image, png in zip(expected, plots):
    assert image.read_bytes() == png, f"{image} is not the notebook's plot: re-export it"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_executes_at_reduced_size(path, tmp_path, monkeypatch):
  # The notebook is executed in memory and never written back: the committed
  # outputs stay those of the full-size run.
  monkeypatch.setenv("ASAM_JAX_QUICK", "1")
  # The kernel imports the asam_jax these tests import: the installed package (CI tests
  # the wheel), or the checkout's (an editable install, or PYTHONPATH).
  package_root = str(Path(asam_jax.__file__).resolve().parent.parent)
  monkeypatch.setenv(
    "PYTHONPATH", os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
  )
  notebook = nbformat.read(path, as_version=4)
  client = NotebookClient(
    notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
  )
  client.execute()  # raises CellExecutionError, with the traceback, if a cell fails
  outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
  assert any("image/png" in o.get("data", {}) for o in outputs)
