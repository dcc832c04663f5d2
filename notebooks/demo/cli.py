"""The command line: ``python -m notebooks.demo``, run from the checkout's root.

Four modes: the comparison (the default; ``--methods`` adds the variants), the
rho sweep (``--sweep``), ASAM's conventions (``--conventions``), and
``--report DIR``, which re-renders the records under DIR without training.
Each training mode writes its record (JSON, markdown and plot) under
``--out``; ``notebooks/README.md`` lists the commands behind the committed
records.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from asam_jax import _provenance, demo

from . import experiments, records
from .experiments import CONVENTIONS, METHODS, SWEEP_RHO, Config


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="python -m notebooks.demo",
    description="The demo's research harness: SGD, SAM, ASAM and the variants on MNIST-1D, "
    "recorded (generated locally, nothing is downloaded).",
  )
  parser.add_argument(
    "--models",
    nargs="+",
    choices=tuple(demo.MODELS),
    default=list(demo.DEFAULT_MODELS),
    help="cnn_ln is the CNN with a LayerNorm after each convolution",
  )
  parser.add_argument(
    "--methods",
    nargs="+",
    choices=METHODS,
    default=list(demo.METHODS),
    help="the variants gsam, looksam, msam and random_sam use SAM's rho; with --sweep, the "
    "methods swept (sgd: the baseline)",
  )
  parser.add_argument("--sam-rho", type=float, help="SAM's rho for every model (default: tuned)")
  parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
  parser.add_argument("--epochs", type=int, default=60)
  parser.add_argument("--batch-size", type=int, default=100)
  parser.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate")
  parser.add_argument("--asam-rho", type=float, help="ASAM's rho for every model (default: tuned)")
  parser.add_argument("--eta", type=float, default=demo.ETA, help="ASAM's eta")
  parser.add_argument(
    "--asam-convention",
    choices=CONVENTIONS,
    default="all",
    help="leaves ASAM scales by |w|+eta: all (the paper), weights (the official code: "
    "asam_jax.weight_mask) or kernels (asam_jax.kernel_mask)",
  )
  parser.add_argument(
    "--sam-rhos",
    nargs="+",
    type=float,
    metavar="RHO",
    help=f"--sweep: SAM's grid (default {' '.join(map(str, SWEEP_RHO['sam']))})",
  )
  parser.add_argument(
    "--asam-rhos",
    nargs="+",
    type=float,
    metavar="RHO",
    help=f"--sweep: ASAM's grid (default {' '.join(map(str, SWEEP_RHO['asam']))})",
  )
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument(
    "--sweep",
    action="store_true",
    help="instead of the comparison, sweep SAM's and ASAM's rho, validating on the last "
    "1000 training examples (the test set is not used)",
  )
  mode.add_argument(
    "--conventions",
    action="store_true",
    help="instead of the comparison, train ASAM with each convention (all, weights, kernels) "
    "at each model's tuned rho, and write conventions.md/.json",
  )
  mode.add_argument(
    "--report",
    type=Path,
    metavar="DIR",
    help="train nothing: re-render the markdown and plots of every results/sweep/conventions "
    "JSON under DIR",
  )
  parser.add_argument("--out", type=Path, default=Path("demo_out"))
  return parser


def _rho_for(args: argparse.Namespace, model: str, method: str) -> float:
  if method == "sgd":
    return 0.0
  kind = "asam" if method == "asam" else "sam"
  override = {"sam": args.sam_rho, "asam": args.asam_rho}[kind]
  return demo.TUNED_RHO[model][kind] if override is None else override


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """Runs the comparison (or the sweep, or the conventions) and writes its record under ``--out``.

  Args:
    argv: the command-line arguments; ``None`` reads ``sys.argv``.

  Returns:
    One dict per (model, method, rho, convention): the per-seed curves and
    timings (with ``--report``, an empty list).
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = _parser()
  args = parser.parse_args(argv)
  if args.report is not None:
    for path in records.report(args.report):
      print(f"Wrote {path}")
    return []
  if args.seeds < 1 or args.epochs < 1 or args.batch_size < 1:
    parser.error("--seeds, --epochs and --batch-size must be at least 1.")
  if args.sweep and not set(args.methods) <= {"sgd", "sam", "asam"}:
    parser.error("--sweep tunes SGD's baseline and SAM's and ASAM's rho: --methods sgd sam asam.")
  if (args.sam_rhos or args.asam_rhos) and not args.sweep:
    parser.error("--sam-rhos and --asam-rhos set the grid of --sweep.")
  untuned = [m for m in args.models if m not in demo.TUNED_RHO]
  if untuned and not args.sweep and (args.sam_rho is None or args.asam_rho is None):
    parser.error(f"no tuned rho for {', '.join(untuned)}: pass --sam-rho and --asam-rho.")
  args.out.mkdir(parents=True, exist_ok=True)
  run = _provenance.Run()
  data = demo.load_mnist1d()
  grid = {"seeds": args.seeds, "epochs": args.epochs, "eta": args.eta}
  grid |= {"batch_size": args.batch_size, "learning_rate": args.lr}

  if args.sweep:
    # Tune on a validation split so that the test set stays unseen.
    configs: list[Config] = [(m, "sgd", 0.0, None) for m in args.models if "sgd" in args.methods]
    rhos = {"sam": args.sam_rhos or SWEEP_RHO["sam"], "asam": args.asam_rhos or SWEEP_RHO["asam"]}
    configs += [
      (m, method, r, args.asam_convention)
      for m in args.models
      for method in rhos
      if method in args.methods
      for r in rhos[method]
    ]
    data = experiments.validation_split(data)
    runs = experiments.run_grid(configs, data, **grid, description="sweep")
    kind = "sweep"
  elif args.conventions:
    rho = lambda model: _rho_for(args, model, "asam")
    runs = experiments.conventions(args.models, rho, data, **grid, description="conventions")
    kind = "conventions"
  else:
    configs = [
      (m, method, _rho_for(args, m, method), args.asam_convention)
      for m in args.models
      for method in args.methods
    ]
    runs, kind = experiments.run_grid(configs, data, **grid, description="demo"), "results"

  config = {k: v for k, v in vars(args).items() if k not in ("out", "report")}
  record = {"kind": kind, "config": config, "meta": records.meta(run, argv), "runs": runs}
  paths = records.write_record(args.out, record)
  markdown = records.render_markdown(record)
  print(f"\n{markdown}\nWrote {', '.join(p.name for p in paths)} under {args.out}/")
  return runs
