"""The records: what a run writes, the markdown and plots rendered from it, and where it ran.

Every mode of the harness writes one JSON record (its configuration, its
per-seed results and where, when and how fast it ran) and the markdown
rendered from that record alone, so ``--report DIR`` re-renders the markdown
(and plots) of committed records without training, and a test checks that the
two agree. Where it ran is ``asam_jax._provenance``'s, plus this checkout's
git commit.
"""

from __future__ import annotations

import json
import shlex
import statistics
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from asam_jax import _provenance, demo

from .experiments import CONVENTIONS

# Each kind of record, and the plot drawn from it.
KINDS: dict[str, str | None] = {
  "results": "test_accuracy.png",
  "sweep": "sweep.png",
  "conventions": None,
}
ROOT = Path(__file__).resolve().parents[2]


def git_commit() -> str | None:
  """The checkout's commit, with ``-dirty`` if asam_jax/ has uncommitted changes."""
  try:
    run = lambda *a: subprocess.run(
      ["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()
    commit = run("rev-parse", "--short=12", "HEAD")
    return commit + ("-dirty" if run("status", "--porcelain", "--", "asam_jax") else "")
  except (OSError, subprocess.SubprocessError):
    return None


def compact_json(value: Any, indent: int = 0) -> str:
  """JSON with one line per record field and per curve, instead of one per number."""
  flat = lambda v: (
    not isinstance(v, (dict, list))
    or (isinstance(v, list) and all(not isinstance(x, (dict, list)) for x in v))
  )
  pad, inner = " " * indent, " " * (indent + 1)
  if isinstance(value, dict) and value:
    items = [f"{inner}{json.dumps(k)}: {compact_json(v, indent + 1)}" for k, v in value.items()]
    return "{\n" + ",\n".join(items) + f"\n{pad}}}"
  if isinstance(value, list) and not flat(value):
    return "[\n" + ",\n".join(inner + compact_json(v, indent + 1) for v in value) + f"\n{pad}]"
  return json.dumps(value, ensure_ascii=False)


# --- markdown -----------------------------------------------------------------


def _results_table(
  runs: list[dict[str, Any]], accuracy_name: str, *, gap_name: str = "train−test", convention=False
) -> str:
  header = ["model", "method", "ρ", "η", f"{accuracy_name} (%)", f"{gap_name} gap (pp)", "ms/step"]
  rows = [demo.table_row(run) for run in runs]
  if convention:
    header.insert(2, "ASAM scales")
    for row, run in zip(rows, runs):
      row.insert(2, run["convention"] + (f" (= {run['same_as']})" if run.get("same_as") else ""))
  return demo.markdown_table(header, rows)


def _config_text(config: dict[str, Any]) -> str:
  text = demo.setup_text(config["seeds"], config["epochs"], config["batch_size"], config["lr"])
  return text + (
    "" if config.get("conventions") else f", ASAM convention '{config['asam_convention']}'"
  )


def _render_results(record: dict[str, Any]) -> str:
  summary = f"MNIST-1D, {_config_text(record['config'])}. {demo.CAPTION}"
  return f"{summary}\n\n{_results_table(record['runs'], 'test accuracy')}\n"


def _render_sweep(record: dict[str, Any]) -> str:
  runs = record["runs"]
  summary = (
    f"ρ sweep on MNIST-1D, {_config_text(record['config'])}: trained on the first 3000 "
    "training signals, validated on the last 1000 (the test set is not used). Validation "
    "accuracy (%) after the last epoch, mean over seeds; the best ρ per model and method "
    "in bold."
  )
  rows = []
  models = list(dict.fromkeys(r["model"] for r in runs))
  for model in models:
    for method in dict.fromkeys(r["method"] for r in runs if r["model"] == model):
      group = [r for r in runs if r["model"] == model and r["method"] == method]
      means = [statistics.fmean(demo.final_accuracies(r)) for r in group]
      if method == "sgd":
        rows.append([model, "SGD", f"{means[0]:.1f}"])
        continue
      best = max(range(len(group)), key=lambda i: means[i])
      cells = [
        (f"**{r['rho']:g}: {m:.1f}**" if i == best else f"{r['rho']:g}: {m:.1f}")
        for i, (r, m) in enumerate(zip(group, means))
      ]
      rows.append([model, method.upper(), ", ".join(cells)])
  compact = demo.markdown_table(["model", "method", "ρ: validation accuracy (%)"], rows)
  full = _results_table(runs, "validation accuracy", gap_name="train−validation")
  return f"{summary}\n\n{compact}\n\nEvery configuration, mean ± std over seeds:\n\n{full}\n"


def _render_conventions(record: dict[str, Any]) -> str:
  runs = record["runs"]
  eta = record["config"]["eta"]
  summary = (
    f"ASAM's conventions on MNIST-1D, {_config_text(record['config'])}, η = {eta:g}: ASAM "
    "scales every leaf by |w| + η (`all`, the paper's T_w, the default), the leaves PyTorch "
    "names `weight` (`weights`: `asam_jax.weight_mask`, the official code: kernels and "
    "normalization scales) or the leaves with two or more dimensions (`kernels`: "
    "`asam_jax.kernel_mask`); the others get T = 1. Each model runs at its tuned ASAM ρ "
    "(tuned with `all`). Test accuracy (%) after the last epoch, mean ± std over seeds."
  )
  models = list(dict.fromkeys(r["model"] for r in runs))
  by = {(r["model"], r["convention"]): r for r in runs}
  conventions = [c for c in CONVENTIONS if any(r["convention"] == c for r in runs)]
  rows = [
    [model, f"{by[model, conventions[0]]['rho']:g}"]
    + [demo.accuracy_text(by[model, c]) if (model, c) in by else "–" for c in conventions]
    for model in models
  ]
  table = demo.markdown_table(["model", "ρ", *conventions], rows)
  scaled_rows = []
  for model in models:
    cells = []
    for c in conventions:
      r = by.get((model, c))
      cells.append(
        "–"
        if r is None
        else f"{r['scaled_leaves']}/{r['total_leaves']} leaves, "
        f"{r['scaled_params']:,}/{r['total_params']:,} parameters"
      )
    scaled_rows.append([model, *cells])
  scaled = demo.markdown_table(["model", *conventions], scaled_rows)
  same = [f"{r['model']} `{r['convention']}`" for r in runs if r.get("same_as")]
  note = (
    (
      f"\n\nWhere two conventions select the same leaves ({', '.join(same)}: the same "
      "as the convention named in the full table), the run is not repeated: the "
      "computation would be identical."
    )
    if same
    else ""
  )
  full = _results_table(runs, "test accuracy", convention=True)
  return (
    f"{summary}\n\n{table}\n\nThe leaves each convention scales:\n\n{scaled}{note}\n\n"
    f"Every run, with the train−test gap and the time per step:\n\n{full}\n"
  )


def render_markdown(record: dict[str, Any]) -> str:
  """The markdown of a record, from the record alone."""
  render = {
    "results": _render_results,
    "sweep": _render_sweep,
    "conventions": _render_conventions,
  }[record["kind"]]
  return f"{render(record)}\n{_provenance.describe(record['meta'])}\n"


# --- plots --------------------------------------------------------------------


def _plot_sweep(runs: list[dict[str, Any]], path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  models = list(dict.fromkeys(r["model"] for r in runs))
  fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.4), squeeze=False)
  for ax, model in zip(axes[0], models):
    for method in dict.fromkeys(r["method"] for r in runs if r["model"] == model):
      group = [r for r in runs if r["model"] == model and r["method"] == method]
      finals = np.array([demo.final_accuracies(r) for r in group])
      if method == "sgd":
        ax.axhline(finals.mean(), color="gray", linestyle=":", label="SGD")
        continue
      rhos = [r["rho"] for r in group]
      ax.errorbar(
        rhos, finals.mean(1), yerr=finals.std(1), marker="o", capsize=3, label=method.upper()
      )
    ax.set(title=f"MNIST-1D, {model}", xscale="log", xlabel="ρ", ylabel="validation accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120, metadata={"Software": None})
  plt.close(fig)


# --- files --------------------------------------------------------------------


def write_record(directory: Path, record: dict[str, Any], *, plots: bool = True) -> list[Path]:
  """Writes ``<kind>.json``, the markdown rendered from it, and its plot, under ``directory``."""
  kind = record["kind"]
  paths = [directory / f"{kind}.json", directory / f"{kind}.md"]
  paths[0].write_text(compact_json(record) + "\n")
  paths[1].write_text(render_markdown(record))
  if plots and (plot := KINDS[kind]) is not None:
    paths.append(directory / plot)
    (demo.plot if kind == "results" else _plot_sweep)(record["runs"], paths[-1])
  return paths


def report(directory: Path, *, plots: bool = True) -> list[Path]:
  """Re-renders the markdown (and plots) of every record under ``directory``, without training.

  Args:
    directory: searched recursively for ``results.json``, ``sweep.json`` and
      ``conventions.json``.
    plots: also redraw the plots.

  Returns:
    The paths written.
  """
  written: list[Path] = []
  for path in sorted(directory.rglob("*.json")):
    if path.stem not in KINDS:
      continue
    record = json.loads(path.read_text())
    written += write_record(path.parent, record, plots=plots)[1:]
  return written


def meta(run: _provenance.Run, argv: Sequence[str]) -> dict[str, Any]:
  """Where, when and how the run ran, with the command that started it and the checkout's commit."""
  command = " ".join(["python -m notebooks.demo", *map(shlex.quote, argv)])
  return run.meta(command, git_commit=git_commit())
