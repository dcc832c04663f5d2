"""The bSAM authors' optimizer (JAX), ported to float64 NumPy.

Source: https://github.com/team-approx-bayes/bayesian-sam, files ``optim.py``
(``build_bsam_optimizer``: ``init``, ``_bsam_gradient``, ``step``),
``util.py`` (``normal_like_tree``) and ``train.py`` (``get_optimizer`` and the
epoch loop), snapshot commit 936eec17f5f560d032f924c3c1c79763edc3d30d.

State: the mean ``w``, ``gm = 0`` and ``s = s_init`` per coordinate, and a key.
One step on a batch split into ``m`` equal contiguous groups
(``reshape(m, -1, ...)``, ``msharpness = --batchsplit``, default 8), with
``N = num_data`` and ``wd`` the weight decay, for each group ``k`` (``vmap``):

* ``theta = w + sqrt(1 / (N s)) n_k``, ``n_k ~ N(0, I)`` from the group's key;
* ``g = grad_k(theta)`` (the group's mean loss); ``eps = rho g / s`` (not
  normalized, no epsilon); ``g_eps = grad_k(w + eps)``; ``gs = sqrt(s g^2)``;

then ``g_eps`` and ``gs`` are averaged over the groups and, per coordinate,

* ``gm <- b1 gm + (1 - b1) (g_eps + wd w)``;
* ``w <- w - lr lrfactor gm / s`` with the *old* ``s``;
* ``s <- b2 s + (1 - b2) (gs + damping + wd)``.

No bias correction. Keys: ``keys = split(key, m + 1)``, group ``k`` draws with
``keys[k]`` (``normal_like_tree``: ``split(keys[k], L + 1)``, leaf ``i`` of the
tree's ``L`` leaves from the ``(i + 1)``-th), and ``keys[m]`` is the next
step's key. The port takes the noise ``n_k`` as input;
:func:`noise_like_tree` reproduces the authors' draw.

How ``train.py`` calls it: ``ndata = len(trainset) * dafactor`` (``--dafactor``,
default 1; the README's CIFAR runs use 4, "to account for data augmentation");
``Ndata = ndata`` and ``wdecay = priorprec / ndata`` (``--priorprec``, 25 by
default, 40 in the README's bSAM runs): the prior precision divided by the
*scaled* number of examples, e.g. ``40 / 200000 = 2e-4`` on CIFAR-10.
``learningrate = --alpha``; ``lrfactor`` is set once per epoch (constant
within it) by :func:`lrfactor`, over ``epochs + 1`` epochs. ``s_init =
--custominit`` (1.0), ``damping = --damping`` (0.1), ``b1``/``b2`` 0.9/0.999.

Departures from the paper (Möllenhoff & Khan, "SAM as an Optimal Relaxation
of Bayes", ICLR 2023, Algorithm 1 (bSAM), which updates ``s`` before the mean
and divides by the new ``s``):

* The mean step divides by the *old* ``s``; ``s`` is updated after it.
* ``sqrt(s g^2)`` is the paper's ``sqrt(s) |g|`` (equal in exact arithmetic).
* m-sharpness: each of the ``m`` groups gets its own noise sample and its own
  ``eps``; ``g_eps`` and ``gs`` are averaged over the groups.
* ``wd = priorprec / (dafactor len(trainset))`` and ``N = dafactor
  len(trainset)``: the data-set size is inflated by ``dafactor`` in both the
  noise and the prior.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from peers import Named

GradFn = Callable[[Named], Named]


def init(params: Named, *, s_init: float = 1.0) -> dict[str, Any]:
  """``init``: ``gm = 0``, ``s = s_init`` per coordinate."""
  return {
    "gm": {n: np.zeros_like(w) for n, w in params.items()},
    "s": {n: s_init * np.ones_like(w) for n, w in params.items()},
  }


def group_gradients(
  params: Named,
  state: dict[str, Any],
  grad_fn: GradFn,
  noise: Named,
  *,
  rho: float,
  num_data: float,
) -> tuple[Named, Named]:
  """``_bsam_gradient`` of one group: ``(gs, g_eps)``."""
  s = state["s"]
  theta = {n: w + np.sqrt(1.0 / (num_data * s[n])) * noise[n] for n, w in params.items()}
  g = grad_fn(theta)
  perturbed = {n: w + rho * g[n] / s[n] for n, w in params.items()}
  g_eps = grad_fn(perturbed)
  gs = {n: np.sqrt(s[n] * g[n] ** 2.0) for n in params}
  return gs, g_eps


def step(
  params: Named,
  state: dict[str, Any],
  grad_fns: Sequence[GradFn],
  noises: Sequence[Named],
  *,
  learning_rate: float,
  rho: float,
  num_data: float,
  lrfactor: float = 1.0,
  b1: float = 0.9,
  b2: float = 0.999,
  weight_decay: float = 0.0,
  damping: float = 0.1,
) -> tuple[Named, dict[str, Any]]:
  """One ``step``: ``grad_fns[k]`` the gradient of group ``k``'s mean loss, ``noises[k]`` its draw."""
  if len(grad_fns) != len(noises):
    raise ValueError(f"{len(grad_fns)} groups but {len(noises)} noise draws")
  per_group = [
    group_gradients(params, state, f, n, rho=rho, num_data=num_data)
    for f, n in zip(grad_fns, noises)
  ]
  gs = {n: np.mean([p[0][n] for p in per_group], axis=0) for n in params}
  g_eps = {n: np.mean([p[1][n] for p in per_group], axis=0) for n in params}
  s = state["s"]
  gm = {
    n: b1 * state["gm"][n] + (1 - b1) * (g_eps[n] + weight_decay * w) for n, w in params.items()
  }
  new_params = {n: w - learning_rate * lrfactor * gm[n] / s[n] for n, w in params.items()}
  new_s = {n: b2 * s[n] + (1 - b2) * (gs[n] + damping + weight_decay) for n in params}
  return new_params, {"gm": gm, "s": new_s}


def lrfactor(epoch: int, *, warmup: int = 5, epochs: int = 180) -> float:
  """``train.py``'s factor for ``epoch`` (0 .. ``epochs``): linear warmup, then a cosine."""
  if epoch < warmup:
    return float(np.linspace(0.0, 1.0, warmup + 1)[epoch + 1])
  step_t = float(epoch - warmup) / float(epochs + 1 - warmup)
  return 0.5 * (1.0 + math.cos(math.pi * step_t))


def noise_like_tree(tree: Any, key: jax.Array, msharpness: int) -> tuple[list[Any], jax.Array]:
  """The authors' draws for one step: ``([n_0, ..., n_{m-1}], next key)``, each ``n_k`` like ``tree``.

  ``tree`` is the pytree the authors' optimizer holds (its leaf order picks
  the keys). Float32 unless ``jax_enable_x64`` is on, as theirs.
  """
  keys = jax.random.split(key, msharpness + 1)
  leaves, treedef = jax.tree.flatten(tree)
  draws = []
  for k in range(msharpness):
    leaf_keys = jax.random.split(keys[k], len(leaves) + 1)[1:]
    noise = [jax.random.normal(lk, shape=np.shape(x)) for lk, x in zip(leaf_keys, leaves)]
    draws.append(treedef.unflatten(noise))
  return draws, keys[-1]
