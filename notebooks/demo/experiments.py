"""What the harness trains: the variants, ASAM's conventions, and grids of runs over seeds.

The data, models, training loop and tuned rho are the demo's
(``asam_jax.demo``); this module adds the methods and options the demo does not
ship, and trains every configuration of a grid over the seeds.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import asam_jax
from asam_jax import demo

VARIANTS = ("gsam", "looksam", "msam", "random_sam")
METHODS = (*demo.METHODS, *VARIANTS)
# The variants use SAM's tuned rho, and their papers' other hyperparameters.
GSAM_ALPHA = 0.01
LOOKSAM_K = 5
# Which leaves ASAM scales by |w| + eta: every leaf (the paper, the default),
# the leaves PyTorch names `weight` (the official code: kernels, normalization
# scales, embeddings) or the leaves with ndim >= 2 (kernels only).
CONVENTIONS = ("all", "weights", "kernels")
ADAPTIVE_MASKS = {"all": None, "weights": asam_jax.weight_mask, "kernels": asam_jax.kernel_mask}
SWEEP_RHO = {
  "sam": (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
  "asam": (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
}
# One run of a grid: (model, method, rho, ASAM's convention or None).
Config = tuple[str, str, float, str | None]


def make_optimizer(
  method: str,
  *,
  rho: float = 0.0,
  eta: float = demo.ETA,
  convention: str | None = "all",
  learning_rate: float = 0.1,
  total_steps: int = 1000,
  momentum: float = 0.9,
  weight_decay: float = 5e-4,
  seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  """The demo's optimizer (:func:`asam_jax.demo.make_optimizer`), for every method and convention.

  Args:
    method: one of ``METHODS``: the demo's ``"sgd"``, ``"sam"``, ``"asam"``,
      or the variants ``"gsam"``, ``"looksam"`` (k = 5), ``"random_sam"``
      (chained in front of the same SGD) and ``"msam"`` (Momentum-SAM, which
      replaces SGD).
    rho: the method's radius (ignored by SGD).
    eta: ASAM's offset.
    convention: which leaves ASAM scales by ``|w| + eta``: ``"all"`` (the
      paper), ``"weights"`` (the official code: ``asam_jax.weight_mask``,
      kernels and normalization scales) or ``"kernels"``
      (``asam_jax.kernel_mask``, leaves with two or more dimensions).
    learning_rate: the peak learning rate of the cosine schedule.
    total_steps: the schedule's length.
    momentum: SGD's momentum.
    weight_decay: the decoupled L2 coefficient added to the gradient.
    seed: seeds random SAM's perturbations.

  Returns:
    An optax transformation whose ``update`` takes ``loss_fn=``, with ``rho``
    and ``eta`` in its state (``optax.inject_hyperparams``).
  """
  options: dict[str, Any] = {
    "learning_rate": learning_rate,
    "total_steps": total_steps,
    "momentum": momentum,
    "weight_decay": weight_decay,
  }
  if method == "asam" and convention not in CONVENTIONS:
    raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}.")
  if method in ("sgd", "sam") or (method == "asam" and convention == "all"):
    return demo.make_optimizer(method, rho=rho, eta=eta, **options)
  if method == "msam":
    # Momentum-SAM replaces SGD: it perturbs along the momentum it keeps.
    return optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.inject_hyperparams(asam_jax.momentum_sam, static_args=("momentum",))(
        learning_rate=optax.cosine_decay_schedule(learning_rate, total_steps),
        rho=rho,
        momentum=momentum,
      ),
    )
  if method == "asam":
    first = optax.inject_hyperparams(
      asam_jax.asam, static_args=("p", "ascent_steps", "adaptive_mask")
    )(rho=rho, eta=eta, adaptive_mask=ADAPTIVE_MASKS[str(convention)])
  elif method == "gsam":
    first = optax.inject_hyperparams(asam_jax.gsam)(rho=rho, alpha=GSAM_ALPHA)
  elif method == "looksam":
    first = optax.inject_hyperparams(asam_jax.looksam, static_args=("k",))(rho=rho, k=LOOKSAM_K)
  elif method == "random_sam":
    key = jax.random.key(seed)
    first = optax.inject_hyperparams(lambda rho: asam_jax.random_sam(key, rho))(rho=rho)
  else:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
  return optax.chain(first, demo.make_optimizer("sgd", **options))


@functools.cache
def _optimizer(convention: str | None) -> Callable[..., optax.GradientTransformationExtraArgs]:
  # One factory per convention, so that the demo compiles one epoch per method and convention.
  return functools.partial(make_optimizer, convention=convention)


def train(
  model: str, method: str, seed: int, data: dict[str, np.ndarray], *, convention=None, **options
) -> dict[str, Any]:
  """:func:`asam_jax.demo.train` with every method and convention of :func:`make_optimizer`.

  Momentum-SAM holds the perturbed weights; it is evaluated at the
  unperturbed ones (``asam_jax.momentum_sam_weights``).
  """
  weights = asam_jax.momentum_sam_weights if method == "msam" else None
  return demo.train(
    model, method, seed, data, optimizer=_optimizer(convention), weights=weights, **options
  )


def run_grid(
  configs: Sequence[Config],
  data: dict[str, np.ndarray],
  *,
  seeds: int,
  epochs: int,
  eta: float,
  batch_size: int,
  learning_rate: float,
  description: str,
) -> list[dict[str, Any]]:
  """Trains every (model, method, rho, convention) over the seeds under one progress bar.

  Returns:
    One run per configuration: :func:`asam_jax.demo.summarize`'s fields, with
    ``eta`` and ``convention`` ASAM's (None for the other methods).
  """
  from tqdm.auto import tqdm

  runs = []
  with tqdm(total=len(configs) * seeds * epochs, unit="epoch", desc=description) as bar:
    for model, method, rho, convention in configs:
      results = []
      for seed in range(seeds):
        bar.set_postfix_str(f"{model} {method} ρ={rho:g} seed {seed}")
        results.append(
          train(
            model,
            method,
            seed,
            data,
            convention=convention,
            epochs=epochs,
            rho=rho,
            eta=eta,
            batch_size=batch_size,
            learning_rate=learning_rate,
            on_epoch=lambda _: bar.update(),
          )
        )
      asam = method == "asam"
      run = demo.summarize(model, method, rho, eta if asam else None, results)
      head = {key: run.pop(key) for key in ("model", "method", "rho", "eta")}
      runs.append({**head, "convention": convention if asam else None, **run})
  return runs


def validation_split(data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The first 3000 training signals to train on, the last 1000 as the data to evaluate on."""
  return {
    "x": data["x"][:-1000],
    "y": data["y"][:-1000],
    "x_test": data["x"][-1000:],
    "y_test": data["y"][-1000:],
  }


def mask_counts(model: str, convention: str) -> dict[str, Any]:
  """How many leaves and parameters of ``model`` the convention scales, and the mask itself."""
  params = jax.eval_shape(
    lambda k: demo.MODELS[model]().init(k, jnp.zeros((1, 40)))["params"], jax.random.key(0)
  )
  mask = ADAPTIVE_MASKS[convention]
  selected = jax.tree.leaves(jax.tree.map(lambda _: True, params) if mask is None else mask(params))
  sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(params)]
  return {
    "mask": selected,
    "scaled_leaves": sum(selected),
    "total_leaves": len(sizes),
    "scaled_params": sum(s for s, m in zip(sizes, selected) if m),
    "total_params": sum(sizes),
  }


def conventions(
  models: Sequence[str], rho: Callable[[str], float], data, **grid: Any
) -> list[dict[str, Any]]:
  """ASAM with every convention on every model; a convention whose mask repeats one is not rerun.

  Args:
    models: the models.
    rho: each model's ASAM rho.
    data: as for :func:`asam_jax.demo.train`.
    **grid: the other arguments of :func:`run_grid`.

  Returns:
    One run per model and convention, with the counts of :func:`mask_counts`
    and, for a convention that selects the leaves of an earlier one,
    ``same_as`` that convention (and its runs).
  """
  configs: list[Config] = []
  copies = []
  for model in models:
    seen: dict[tuple[bool, ...], str] = {}
    for convention in CONVENTIONS:
      counts = mask_counts(model, convention)
      key = tuple(counts.pop("mask"))
      copies.append((model, convention, seen.get(key), counts))
      if key not in seen:
        seen[key] = convention
        configs.append((model, "asam", rho(model), convention))
  trained = {(r["model"], r["convention"]): r for r in run_grid(configs, data, **grid)}
  runs = []
  for model, convention, same_as, counts in copies:
    run = dict(trained[model, same_as or convention], convention=convention, **counts)
    if same_as:
      run["same_as"] = same_as
    runs.append(run)
  return runs
