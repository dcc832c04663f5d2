"""Executes the notebooks at full size, in place, and exports their plots.

  python notebooks/run_notebooks.py                 # every notebook
  python notebooks/run_notebooks.py 02 04           # those whose names start so
  python notebooks/run_notebooks.py --images-only   # re-export the plots, run nothing

Each notebook runs top to bottom in a fresh kernel whose working directory is
notebooks/ and whose PYTHONPATH starts with this checkout, so it imports this
checkout's asam_jax. The executed notebook is written back with its outputs;
its plots (every image/png output, in order) are written to
notebooks/images/<notebook>_<k>.png, and where, when and how long it ran to
notebooks/execution.json. tests/test_notebooks.py checks that the images
are the committed notebooks' outputs.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from asam_jax import _provenance

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
IMAGES = HERE / "images"
EXECUTION = HERE / "execution.json"


def plots(notebook) -> list[bytes]:
  """The notebook's image/png outputs, in order, as PNG bytes."""
  return [
    base64.b64decode(output["data"]["image/png"])
    for cell in notebook.cells
    if cell.cell_type == "code"
    for output in cell.outputs
    if "image/png" in output.get("data", {})
  ]


def image_paths(path: Path, count: int) -> list[Path]:
  return [IMAGES / f"{path.stem}_{k}.png" for k in range(1, count + 1)]


def export_images(path: Path) -> list[Path]:
  """Writes the plots of the notebook at ``path`` under notebooks/images/."""
  IMAGES.mkdir(exist_ok=True)
  for stale in IMAGES.glob(f"{path.stem}_*.png"):
    stale.unlink()
  images = plots(nbformat.read(path, as_version=4))
  targets = image_paths(path, len(images))
  for target, png in zip(targets, images):
    target.write_bytes(png)
  return targets


def execute(path: Path) -> dict:
  """Runs the notebook in place; returns where, when and how long it ran."""
  notebook = nbformat.read(path, as_version=4)
  os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
  )
  os.environ.pop("ASAM_JAX_QUICK", None)
  load_before, start, date = _provenance.load_average(), time.perf_counter(), _provenance.now()
  client = NotebookClient(
    notebook, timeout=None, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}
  )
  client.execute()
  wall = time.perf_counter() - start
  nbformat.write(notebook, path)
  return {
    "date": date,
    "wall_s": round(wall, 1),
    "load_before": load_before,
    "load_after": _provenance.load_average(),
    "cpu": _provenance.cpu_model(),
    "cores": os.cpu_count(),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("prefixes", nargs="*", help="run only notebooks whose names start so")
  parser.add_argument("--images-only", action="store_true")
  args = parser.parse_args()
  paths = [
    p
    for p in sorted(HERE.glob("*.ipynb"))
    if not args.prefixes or any(p.name.startswith(x) for x in args.prefixes)
  ]
  record = json.loads(EXECUTION.read_text()) if EXECUTION.exists() else {}
  for path in paths:
    if not args.images_only:
      print(f"executing {path.name} ...", flush=True)
      record[path.name] = execute(path)
      print(f"  {record[path.name]}", flush=True)
      EXECUTION.write_text(json.dumps(dict(sorted(record.items())), indent=1) + "\n")
    for image in export_images(path):
      print(f"  wrote {image.relative_to(ROOT)}")


if __name__ == "__main__":
  main()
