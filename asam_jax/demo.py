"""SGD vs SAM vs ASAM on MNIST-1D: ``python -m asam_jax.demo``.

Trains an MLP and a small 1-D CNN (Flax Linen) with SGD, SAM and ASAM over
several seeds, prints a results table and writes a plot of the test-accuracy
curves and the table (markdown and JSON) under ``--out``. The data, models and
training loop here are also what the notebooks use.

MNIST-1D (Greydanus, 2020) is generated locally by the ``mnist1d`` package:
4000 training and 1000 test signals of length 40, ten classes. Nothing is
downloaded.

References:
  Foret et al., Sharpness-Aware Minimization for Efficiently Improving
  Generalization, ICLR 2021. Kwon et al., ASAM: Adaptive Sharpness-Aware
  Minimization for Scale-Invariant Learning of Deep Neural Networks, ICML 2021.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if _missing := [
  m for m in ("flax", "mnist1d", "tqdm", "matplotlib") if not importlib.util.find_spec(m)
]:
  _message = (
    f"The demo needs the demo extra, which is not installed (missing: {', '.join(_missing)}). "
    "Install it with pip install 'asam_jax[demo]' (from a checkout: pip install -e '.[demo]')."
  )
  # A clean message for `python -m asam_jax.demo`, an ImportError for an import.
  raise SystemExit(_message) if __name__ == "__main__" else ImportError(_message)

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import asam_jax

METHODS = ("sgd", "sam", "asam", "gsam", "looksam", "msam", "random_sam")
# The default comparison; the variants run with --methods.
DEFAULT_METHODS = ("sgd", "sam", "asam")
# The variants use SAM's tuned rho, and their papers' other hyperparameters.
GSAM_ALPHA = 0.01
LOOKSAM_K = 5
CONVENTIONS = ("all", "kernels")

# Chosen by `python -m asam_jax.demo --sweep` on a validation split of the
# training set; the README records the sweep.
TUNED_RHO = {
  "mlp": {"sam": 0.5, "asam": 2.0},
  "cnn": {"sam": 0.1, "asam": 0.1},
}
ETA = 0.01
SWEEP_RHO = {
  "sam": (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
  "asam": (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
}


# --- data ---------------------------------------------------------------------


@functools.cache
def load_mnist1d() -> dict[str, np.ndarray]:
  """MNIST-1D, generated in memory by ``mnist1d.data.make_dataset``.

  ``make_dataset`` with its default arguments (5000 signals, seed 42, an
  80/20 split) builds the data from templates; unlike ``get_dataset`` it never
  downloads or writes a file. The result is cached for the process.

  Returns:
    A dict with ``x`` (4000, 40) and ``x_test`` (1000, 40) float32 signals and
    ``y``, ``y_test`` int32 labels in 0..9.
  """
  from mnist1d.data import make_dataset

  # make_dataset seeds NumPy's global generator; leave the caller's untouched.
  rng_state = np.random.get_state()  # noqa: NPY002
  try:
    data = make_dataset()
  finally:
    np.random.set_state(rng_state)  # noqa: NPY002
  return {
    "x": data["x"].astype(np.float32),
    "y": data["y"].astype(np.int32),
    "x_test": data["x_test"].astype(np.float32),
    "y_test": data["y_test"].astype(np.int32),
  }


def flip_labels(y: np.ndarray, fraction: float, *, num_classes: int = 10, seed: int = 0):
  """Replaces ``fraction`` of the labels by a different class, uniformly.

  The symmetric label noise of the SAM paper's noisy-label experiment: exactly
  ``round(fraction * len(y))`` labels are wrong afterwards.

  Args:
    y: integer labels.
    fraction: the share of labels to corrupt, in [0, 1].
    num_classes: the number of classes.
    seed: seed of the NumPy generator that picks labels and new classes.

  Returns:
    A new label array of the same dtype.

  Example:
    >>> import numpy as np
    >>> y = np.zeros(10, np.int32)
    >>> int((flip_labels(y, 0.4) != y).sum())
    4
  """
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"fraction must be in [0, 1], got {fraction}.")
  rng = np.random.default_rng(seed)
  y = np.array(y)
  idx = rng.choice(len(y), size=round(fraction * len(y)), replace=False)
  # A shift in 1..num_classes-1 always lands on another class.
  y[idx] = (y[idx] + rng.integers(1, num_classes, size=len(idx))) % num_classes
  return y


# --- models -------------------------------------------------------------------


class MLP(nn.Module):
  """Two hidden ReLU layers of 100 units, as in the MNIST-1D paper."""

  width: int = 100
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.width)(x))
    x = nn.relu(nn.Dense(self.width)(x))
    return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
  """Three strided 1-D convolutions and a linear read-out."""

  features: int = 16
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = x[..., None]  # (batch, length) -> (batch, length, channels)
    x = nn.relu(nn.Conv(self.features, (5,), strides=2)(x))
    x = nn.relu(nn.Conv(self.features, (3,), strides=2)(x))
    x = nn.relu(nn.Conv(self.features, (3,), strides=2)(x))
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


MODELS: dict[str, Callable[[], nn.Module]] = {"mlp": MLP, "cnn": CNN}


# --- training -----------------------------------------------------------------


def make_optimizer(
  method: str,
  *,
  rho: float = 0.0,
  eta: float = ETA,
  convention: str = "all",
  learning_rate: float = 0.1,
  total_steps: int = 1000,
  momentum: float = 0.9,
  weight_decay: float = 5e-4,
  seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  """SGD with momentum, weight decay and a cosine schedule, behind SAM or ASAM.

  SAM/ASAM come first in the chain so that weight decay and momentum see the
  gradient at ``w + eps``. They are wrapped in ``optax.inject_hyperparams``,
  so ``rho`` and ``eta`` live in the state and one compiled step serves every
  value (the ``--sweep`` relies on it).

  Args:
    method: one of ``METHODS``: ``"sgd"``, ``"sam"``, ``"asam"``, or the
      variants ``"gsam"``, ``"looksam"`` (k = 5), ``"random_sam"`` (chained in
      front of the same SGD) and ``"msam"`` (Momentum-SAM, which replaces SGD).
    rho: the method's radius (ignored by SGD).
    eta: ASAM's offset.
    convention: which leaves ASAM scales by ``|w| + eta``: ``"all"`` (the
      paper) or ``"kernels"`` (the official code, ``asam_jax.kernel_mask``).
    learning_rate: the peak learning rate of the cosine schedule.
    total_steps: the schedule's length.
    momentum: SGD's momentum.
    weight_decay: the decoupled L2 coefficient added to the gradient.
    seed: seeds random SAM's perturbations.

  Returns:
    An optax transformation whose ``update`` takes ``loss_fn=``.
  """
  schedule = optax.cosine_decay_schedule(learning_rate, total_steps)
  decay = optax.add_decayed_weights(weight_decay)
  base = optax.chain(decay, optax.sgd(schedule, momentum=momentum))
  if method == "sgd":
    return base
  if method == "msam":
    # Momentum-SAM replaces SGD: it perturbs along the momentum it keeps.
    return optax.chain(
      decay,
      optax.inject_hyperparams(asam_jax.momentum_sam, static_args=("momentum",))(
        learning_rate=schedule, rho=rho, momentum=momentum
      ),
    )
  if method == "sam":
    first = optax.inject_hyperparams(asam_jax.sam, static_args=("p", "ascent_steps"))(rho=rho)
  elif method == "asam":
    if convention not in CONVENTIONS:
      raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}.")
    mask = asam_jax.kernel_mask if convention == "kernels" else None
    first = optax.inject_hyperparams(
      asam_jax.asam, static_args=("p", "ascent_steps", "adaptive_mask")
    )(rho=rho, eta=eta, adaptive_mask=mask)
  elif method == "gsam":
    first = optax.inject_hyperparams(asam_jax.gsam)(rho=rho, alpha=GSAM_ALPHA)
  elif method == "looksam":
    first = optax.inject_hyperparams(asam_jax.looksam, static_args=("k",))(rho=rho, k=LOOKSAM_K)
  elif method == "random_sam":
    key = jax.random.key(seed)
    first = optax.inject_hyperparams(lambda rho: asam_jax.random_sam(key, rho))(rho=rho)
  else:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
  return optax.chain(first, base)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@functools.cache
def _accuracy_fn(model_name: str):
  model = MODELS[model_name]()

  @jax.jit
  def accuracy(params, x, y):
    return jnp.mean(jnp.argmax(model.apply({"params": params}, x), -1) == y)

  return accuracy


@functools.cache
def _epoch_fn(model_name, method, convention, x_shape, batch_size, epochs, learning_rate):
  """One compiled epoch per configuration; seeds, data and rho are arguments.

  Compiled ahead of time from abstract shapes, so that :func:`train` times
  pure execution and every seed and rho reuses the same executable.
  """
  model = MODELS[model_name]()
  n_train = x_shape[0]
  steps = n_train // batch_size
  tx = make_optimizer(
    method, convention=convention, learning_rate=learning_rate, total_steps=epochs * steps
  )

  def step(carry, idx):
    params, opt_state, x, y = carry
    loss_fn = lambda p: cross_entropy(model.apply({"params": p}, x[idx]), y[idx])
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params, loss_fn=loss_fn)
    return (optax.apply_updates(params, updates), opt_state, x, y), loss

  def epoch(params, opt_state, x, y, key):
    order = jax.random.permutation(key, n_train)[: steps * batch_size]
    (params, opt_state, _, _), losses = jax.lax.scan(
      step, (params, opt_state, x, y), order.reshape(steps, batch_size)
    )
    return params, opt_state, losses.mean()

  key = jax.random.key(0)
  x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
  params = jax.eval_shape(lambda k, x: model.init(k, x)["params"], key, x)
  opt_state = jax.eval_shape(tx.init, params)
  y = jax.ShapeDtypeStruct((n_train,), jnp.int32)
  return jax.jit(epoch).lower(params, opt_state, x, y, key).compile()


def train(
  model_name: str,
  method: str,
  seed: int,
  data: dict[str, np.ndarray],
  *,
  epochs: int = 60,
  rho: float = 0.0,
  eta: float = ETA,
  convention: str = "all",
  batch_size: int = 100,
  learning_rate: float = 0.1,
  on_epoch: Callable[[float], Any] | None = None,
) -> dict[str, Any]:
  """Trains one model with one method and seed; returns its curves and timing.

  Args:
    model_name: a key of ``MODELS``.
    method: one of ``METHODS``.
    seed: seeds the initialization, the batch order and random SAM.
    data: ``x``, ``y`` to train on and ``x_test``, ``y_test`` to evaluate on
      after every epoch.
    epochs: passes over the training set.
    rho: SAM/ASAM's radius.
    eta: ASAM's offset.
    convention: ASAM's ``"all"`` or ``"kernels"`` (see :func:`make_optimizer`).
    batch_size: examples per step; the remainder of an epoch is dropped.
    learning_rate: SGD's peak learning rate.
    on_epoch: called after every epoch with the test accuracy (e.g. to
      advance a progress bar).

  Returns:
    ``test_acc`` (one value per epoch), ``train_acc`` (on ``data["y"]`` at the
    end), ``loss`` (mean training loss per epoch) and ``ms_per_step`` (the
    median epoch time over steps, compilation excluded).
  """
  x, y = jnp.asarray(data["x"]), jnp.asarray(data["y"])
  x_test, y_test = jnp.asarray(data["x_test"]), jnp.asarray(data["y_test"])
  steps = x.shape[0] // batch_size
  if steps == 0:
    raise ValueError(f"batch_size {batch_size} exceeds the {x.shape[0]} training examples.")
  epoch_fn = _epoch_fn(model_name, method, convention, x.shape, batch_size, epochs, learning_rate)
  accuracy = _accuracy_fn(model_name)

  init_key, order_key = jax.random.split(jax.random.key(seed))
  params = MODELS[model_name]().init(init_key, x[:1])["params"]
  # inject_hyperparams keeps rho and eta in the state, where the shared compiled epoch reads them.
  tx = make_optimizer(
    method,
    rho=rho,
    eta=eta,
    convention=convention,
    learning_rate=learning_rate,
    total_steps=epochs * steps,
    seed=seed,
  )
  opt_state = tx.init(params)
  # Momentum-SAM holds perturbed weights; it is evaluated at the unperturbed ones.
  weights = (
    (lambda p, s: asam_jax.momentum_sam_weights(p, s)) if method == "msam" else (lambda p, s: p)
  )

  test_acc, losses, seconds = [], [], []
  for e in range(epochs):
    start = time.perf_counter()
    params, opt_state, loss = epoch_fn(params, opt_state, x, y, jax.random.fold_in(order_key, e))
    loss.block_until_ready()
    seconds.append(time.perf_counter() - start)
    losses.append(float(loss))
    test_acc.append(float(accuracy(weights(params, opt_state), x_test, y_test)))
    if on_epoch is not None:
      on_epoch(test_acc[-1])
  return {
    "test_acc": test_acc,
    "train_acc": float(accuracy(weights(params, opt_state), x, y)),
    "loss": losses,
    "ms_per_step": 1e3 * statistics.median(seconds) / steps,
  }


# --- the command line ---------------------------------------------------------


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
  return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _rho_for(args: argparse.Namespace, model: str, method: str) -> float:
  if method == "sgd":
    return 0.0
  kind = "asam" if method == "asam" else "sam"
  override = {"sam": args.sam_rho, "asam": args.asam_rho}[kind]
  return TUNED_RHO[model][kind] if override is None else override


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)


def _plot(runs: list[dict[str, Any]], models: Sequence[str], path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.6), squeeze=False)
  for ax, model in zip(axes[0], models):
    for run in (r for r in runs if r["model"] == model):
      curves = 100 * np.asarray(run["test_acc"])
      mean, std = curves.mean(0), curves.std(0)
      epochs = np.arange(1, len(mean) + 1)
      label = run["method"].upper() + (f" (ρ={run['rho']:g})" if run["method"] != "sgd" else "")
      ax.plot(epochs, mean, label=label)
      ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
    ax.set(title=f"MNIST-1D, {model.upper()}", xlabel="epoch", ylabel="test accuracy (%)")
    low = min(100 * np.mean(np.asarray(r["test_acc"])[:, -1]) for r in runs if r["model"] == model)
    ax.set_ylim(low - 15, None)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _run_grid(configs, data, args, description: str) -> list[dict[str, Any]]:
  """Trains every (model, method, rho) over the seeds under one progress bar."""
  from tqdm.auto import tqdm

  runs = []
  with tqdm(total=len(configs) * args.seeds * args.epochs, unit="epoch", desc=description) as bar:
    for model, method, rho in configs:
      results = []
      for seed in range(args.seeds):
        bar.set_postfix_str(f"{model} {method} ρ={rho:g} seed {seed}")
        results.append(
          train(
            model,
            method,
            seed,
            data,
            epochs=args.epochs,
            rho=rho,
            eta=args.eta,
            convention=args.asam_convention,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            on_epoch=lambda _: bar.update(),
          )
        )
      runs.append(
        {
          "model": model,
          "method": method,
          "rho": rho,
          "eta": args.eta if method == "asam" else None,
          "test_acc": [r["test_acc"] for r in results],
          "train_acc": [r["train_acc"] for r in results],
          "ms_per_step": [r["ms_per_step"] for r in results],
        }
      )
  return runs


def _results_table(runs: list[dict[str, Any]], accuracy_name: str) -> str:
  header = ["model", "method", "ρ", "η", f"{accuracy_name} (%)", "train−test gap (pp)", "ms/step"]
  rows = []
  for run in runs:
    final = [100 * curve[-1] for curve in run["test_acc"]]
    gap = [100 * tr - f for tr, f in zip(run["train_acc"], final)]
    acc_mean, acc_std = _mean_std(final)
    rows.append(
      [
        run["model"],
        run["method"].upper(),
        "–" if run["method"] == "sgd" else f"{run['rho']:g}",
        "–" if run["eta"] is None else f"{run['eta']:g}",
        f"{acc_mean:.1f} ± {acc_std:.1f}",
        f"{statistics.fmean(gap):.1f}",
        f"{statistics.median(run['ms_per_step']):.2f}",
      ]
    )
  return _markdown(header, rows)


def _config_text(args: argparse.Namespace) -> str:
  return (
    f"{args.seeds} seeds, {args.epochs} epochs, batch {args.batch_size}, SGD momentum 0.9, "
    f"peak lr {args.lr:g} (cosine), weight decay 5e-4, ASAM convention '{args.asam_convention}'"
  )


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="python -m asam_jax.demo",
    description="SGD vs SAM vs ASAM on MNIST-1D (generated locally, nothing is downloaded).",
  )
  parser.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
  parser.add_argument(
    "--methods",
    nargs="+",
    choices=METHODS,
    default=list(DEFAULT_METHODS),
    help="the variants gsam, looksam, msam and random_sam use SAM's rho",
  )
  parser.add_argument("--sam-rho", type=float, help="SAM's rho for every model (default: tuned)")
  parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
  parser.add_argument("--epochs", type=int, default=60)
  parser.add_argument("--batch-size", type=int, default=100)
  parser.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate")
  parser.add_argument("--asam-rho", type=float, help="ASAM's rho for every model (default: tuned)")
  parser.add_argument("--eta", type=float, default=ETA, help="ASAM's eta")
  parser.add_argument(
    "--asam-convention",
    choices=CONVENTIONS,
    default="all",
    help="leaves ASAM scales by |w|+eta: all (the paper) or kernels (the official code)",
  )
  parser.add_argument(
    "--sweep",
    action="store_true",
    help="instead of the comparison, sweep SAM's and ASAM's rho, validating on the last "
    "1000 training examples (the test set is not used)",
  )
  parser.add_argument("--out", type=Path, default=Path("demo_out"))
  return parser


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """Runs the demo (or the rho sweep) and writes its outputs under ``--out``.

  Args:
    argv: the command-line arguments; ``None`` reads ``sys.argv``.

  Returns:
    One dict per (model, method, rho): the per-seed curves and timings.
  """
  parser = _parser()
  args = parser.parse_args(argv)
  if args.seeds < 1 or args.epochs < 1 or args.batch_size < 1:
    parser.error("--seeds, --epochs and --batch-size must be at least 1.")
  args.out.mkdir(parents=True, exist_ok=True)
  data = load_mnist1d()

  if args.sweep:
    # Tune on a validation split so that the test set stays unseen.
    data = {
      "x": data["x"][:-1000],
      "y": data["y"][:-1000],
      "x_test": data["x"][-1000:],
      "y_test": data["y"][-1000:],
    }
    configs = [(model, "sgd", 0.0) for model in args.models]
    configs += [
      (m, method, r) for m in args.models for method in SWEEP_RHO for r in SWEEP_RHO[method]
    ]
    runs = _run_grid(configs, data, args, "sweep")
    table = _results_table(runs, "validation accuracy")
    name = "sweep"
  else:
    configs = [
      (m, method, _rho_for(args, m, method)) for m in args.models for method in args.methods
    ]
    runs = _run_grid(configs, data, args, "demo")
    table = _results_table(runs, "test accuracy")
    name = "results"
    _plot(runs, args.models, args.out / "test_accuracy.png")

  summary = f"MNIST-1D, {_config_text(args)}; accuracy after the last epoch, mean ± std over seeds."
  (args.out / f"{name}.md").write_text(f"{summary}\n\n{table}\n")
  (args.out / f"{name}.json").write_text(
    json.dumps({"config": vars(args) | {"out": str(args.out)}, "runs": runs}, indent=1)
  )
  print(f"\n{summary}\n\n{table}\n\nWrote {name}.md and {name}.json", end="")
  print(" and test_accuracy.png" if not args.sweep else "", f"under {args.out}/")
  return runs


if __name__ == "__main__":
  main()
