"""The Momentum-SAM authors' MSAM, AdamW_MSAM and LookSAM, ported to float64 NumPy.

Source: https://github.com/MarlonBecker/MSAM, files ``optimizer/msam.py``
(``MSAM``), ``optimizer/adamW_msam.py`` (``AdamW_MSAM``, ``adamW_msam``),
``optimizer/looksam.py`` (``LookSAM``, ``sgd``) and ``main.py`` (how they are
called), snapshot commit 780fa4f623fe0c99760fd7cfb1a94d14f00179ee.

The weights these optimizers hold between steps are the perturbed ones, and
the training loop's gradient ``g`` is taken there; ``main.py`` calls
``move_back_from_momentumAscent`` before each evaluation and
``move_up_to_momentumAscent`` before each training epoch.

MSAM (SGD form), state ``v`` (zeros) and ``s = 1 / (||v|| + 1e-12)`` (0 at first):

* ``d = g + wd w~`` (weight decay at the held, perturbed weights);
* ``w = w~ + rho s v`` (back), ``v <- mu v + d``, ``w <- w - lr v`` (SGD);
* ``s <- 1 / (||v|| + 1e-12)``, ``w~ = w - rho s v`` (out again).

AdamW_MSAM, state ``m``, ``u`` (zeros), step ``t`` and ``n = rho / (||m|| + 1e-12)``
(0 at first); per step ``t <- t + 1`` and

* ``w = w~ + n m`` (back); ``m <- b1 m + (1 - b1) g``, ``u <- b2 u + (1 - b2) g^2``
  (``g`` without weight decay);
* ``w <- w - (lr / (1 - b1^t)) m / (sqrt(u) / sqrt(1 - b2^t) + eps)``, then
  ``w <- (1 - lr wd) w`` (decoupled decay *after* the Adam step);
* ``n <- rho / (||m|| + 1e-12)``, ``w~ = w - n m``.

LookSAM (SGD form), full step every ``k`` steps (the first step is full):

* full: ``e = rho g / (||g|| + 1e-12)``, ``g_s`` the gradient at ``w + e``;
  ``g_v = g_s - (<g_s, g> / (||g||^2 + 1e-12)) g``, stored as ``g_v / ||g_v||``;
  the step uses ``g_s``;
* other steps: ``g + alpha ||g|| g_v / ||g_v||``;
* then PyTorch's SGD with ``d = . + wd w`` at the unperturbed ``w``, momentum
  ``v <- mu v + d`` (``v`` starts at zeros) and optional Nesterov.

Departures from the paper (Becker et al., arXiv:2401.12033, Algorithm 1; Liu
et al., CVPR 2022, Algorithm 1):

* MSAM: moving back uses the *current* ``rho`` with the stored ``1 / ||v||``,
  so under a changing rho schedule it does not undo the last perturbation
  exactly (our ``momentum_sam`` stores ``rho_{t-1} / ||v||`` and does).
* MSAM: ``nesterov`` is accepted and ignored.
* AdamW_MSAM: the perturbation follows the uncorrected first moment ``m``, and
  decay multiplies the weights after the Adam step (PyTorch's AdamW decays
  before it), so it also shrinks that step by ``1 - lr wd``.
* AdamW_MSAM: ``rho`` is folded into the stored ``n``, so moving back is exact
  even when rho changes.
* LookSAM: ``||g_v||`` is divided by with no guard (NaN when ``g_s`` is parallel
  to ``g``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from peers import Named, global_norm

# --- MSAM ---------------------------------------------------------------------


def msam_init(params: Named) -> dict[str, Any]:
  """``MSAM.__init__``: zero momentum buffers and ``inverse_norm_buffer = 0``."""
  return {
    "momentum_buffer": {n: np.zeros_like(w) for n, w in params.items()},
    "inverse_norm_buffer": 0.0,
  }


def msam_step(
  params: Named,
  grads: Mapping[str, np.ndarray | None],
  state: dict[str, Any],
  *,
  lr: float,
  momentum: float = 0.9,
  weight_decay: float = 1e-2,
  rho: float = 0.3,
) -> tuple[Named, dict[str, Any]]:
  """``MSAM.step()``: from the held ``w~`` and the gradient there to the next ``w~``."""
  params, bufs = dict(params), dict(state["momentum_buffer"])
  inverse_norm = state["inverse_norm_buffer"]
  with_grad = [n for n, g in grads.items() if g is not None]
  for n in with_grad:
    d_p = grads[n] + weight_decay * params[n] if weight_decay != 0 else grads[n]
    params[n] = params[n] + rho * inverse_norm * bufs[n]
    bufs[n] = momentum * bufs[n] + d_p
    params[n] = params[n] - lr * bufs[n]
  inverse_norm = 1 / (global_norm({n: bufs[n] for n in with_grad}) + 1e-12)
  for n in with_grad:
    params[n] = params[n] - rho * inverse_norm * bufs[n]
  return params, {"momentum_buffer": bufs, "inverse_norm_buffer": inverse_norm}


def msam_move_back(params: Named, state: dict[str, Any], *, rho: float) -> Named:
  """``move_back_from_momentumAscent``: ``w = w~ + rho s v``, with the group's current ``rho``."""
  s, bufs = state["inverse_norm_buffer"], state["momentum_buffer"]
  return {n: w + rho * s * bufs[n] if n in bufs else w for n, w in params.items()}


def msam_move_up(params: Named, state: dict[str, Any], *, rho: float) -> Named:
  """``move_up_to_momentumAscent``: ``w~ = w - rho s v``."""
  s, bufs = state["inverse_norm_buffer"], state["momentum_buffer"]
  return {n: w - rho * s * bufs[n] if n in bufs else w for n, w in params.items()}


# --- AdamW_MSAM -----------------------------------------------------------------


def adamw_msam_init(params: Named) -> dict[str, Any]:
  """``AdamW_MSAM``'s state before its first step (PyTorch creates the moments lazily)."""
  del params
  return {"step": {}, "exp_avg": {}, "exp_avg_sq": {}, "norm_factor": 0.0}


def adamw_msam_step(
  params: Named,
  grads: Mapping[str, np.ndarray | None],
  state: dict[str, Any],
  *,
  lr: float = 1e-3,
  betas: tuple[float, float] = (0.9, 0.999),
  eps: float = 1e-8,
  weight_decay: float = 1e-2,
  rho: float = 1.0,
) -> tuple[Named, dict[str, Any]]:
  """``AdamW_MSAM.step()`` and ``adamW_msam``: from the held ``w~`` to the next ``w~``."""
  beta1, beta2 = betas
  params = dict(params)
  steps, exp_avgs, exp_avg_sqs = (dict(state[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
  norm_factor = state["norm_factor"]
  with_grad = [n for n, g in grads.items() if g is not None]
  for n in with_grad:
    if n not in steps:
      steps[n] = 0
      exp_avgs[n] = np.zeros_like(params[n])
      exp_avg_sqs[n] = np.zeros_like(params[n])
    steps[n] += 1
  for n in with_grad:
    g, t = grads[n], steps[n]
    bias_correction1 = 1 - beta1**t
    bias_correction2 = 1 - beta2**t
    params[n] = params[n] + norm_factor * exp_avgs[n]
    exp_avgs[n] = beta1 * exp_avgs[n] + (1 - beta1) * g
    exp_avg_sqs[n] = beta2 * exp_avg_sqs[n] + (1 - beta2) * g * g
    denom = np.sqrt(exp_avg_sqs[n]) / np.sqrt(bias_correction2) + eps
    params[n] = params[n] - (lr / bias_correction1) * exp_avgs[n] / denom
    params[n] = params[n] * (1 - lr * weight_decay)
  # The norm runs over every stored first moment (``exp_avgs`` of the params with a gradient).
  norm_factor = 1 / (global_norm({n: exp_avgs[n] for n in with_grad}) + 1e-12) * rho
  for n in with_grad:
    params[n] = params[n] - norm_factor * exp_avgs[n]
  new_state = {
    "step": steps,
    "exp_avg": exp_avgs,
    "exp_avg_sq": exp_avg_sqs,
    "norm_factor": norm_factor,
  }
  return params, new_state


def adamw_msam_move_back(params: Named, state: dict[str, Any]) -> Named:
  """``move_back_from_momentumAscent``: ``w = w~ + n m``."""
  m, nf = state["exp_avg"], state["norm_factor"]
  return {n: w + nf * m[n] if n in m else w for n, w in params.items()}


def adamw_msam_move_up(params: Named, state: dict[str, Any]) -> Named:
  """``move_up_to_momentumAscent``: ``w~ = w - n m``."""
  m, nf = state["exp_avg"], state["norm_factor"]
  return {n: w - nf * m[n] if n in m else w for n, w in params.items()}


# --- LookSAM --------------------------------------------------------------------


def looksam_init(params: Named, *, k: int = 5) -> dict[str, Any]:
  """``LookSAM.__init__``: zero momentum buffers, ``iteration_counter = k`` (first step full)."""
  return {
    "momentum_buffer": {n: np.zeros_like(w) for n, w in params.items()},
    "normalized_orthogonal_gradient": {},
    "iteration_counter": k,
  }


def _sgd(
  params: Named,
  grads: Mapping[str, np.ndarray],
  bufs: Named,
  *,
  weight_decay: float,
  momentum: float,
  lr: float,
  nesterov: bool,
) -> tuple[Named, Named]:
  """``looksam.sgd``, the functional SGD ``LookSAM.SGD_step`` calls."""
  params, bufs = dict(params), dict(bufs)
  for n, g in grads.items():
    d_p = g + weight_decay * params[n] if weight_decay != 0 else g
    if momentum != 0:
      buf = bufs.get(n)
      buf = d_p.copy() if buf is None else momentum * buf + d_p
      bufs[n] = buf
      d_p = d_p + momentum * buf if nesterov else buf
    params[n] = params[n] - lr * d_p
  return params, bufs


def looksam_step(
  params: Named,
  state: dict[str, Any],
  grad_fn: Callable[[Named], Named],
  *,
  lr: float = 1e-1,
  momentum: float = 0.9,
  weight_decay: float = 1e-2,
  nesterov: bool = False,
  rho: float = 0.3,
  alpha: float = 0.2,
  k: int = 5,
) -> tuple[Named, dict[str, Any]]:
  """``LookSAM.step(model, inputs, targets)``, ``grad_fn`` the batch's gradient at given weights."""
  g = grad_fn(params)
  state = dict(state)
  if state["iteration_counter"] == k:
    state["iteration_counter"] = 0
    # move_up
    norm = global_norm(g)
    e_w = {n: v * (rho / (norm + 1e-12)) for n, v in g.items()}
    perturbed = {n: w + e_w[n] for n, w in params.items()}
    # second forward-backward pass
    g_s = grad_fn(perturbed)
    # move_back
    dot = float(sum(np.sum(g_s[n] * g[n]) for n in g))
    grad_norm = global_norm(g)
    params = {n: w - e_w[n] for n, w in perturbed.items()}
    g_v = {n: g_s[n] - dot / (grad_norm**2 + 1e-12) * g[n] for n in g}
    g_v_norm = global_norm(g_v)
    state["normalized_orthogonal_gradient"] = {n: v / g_v_norm for n, v in g_v.items()}
    grads = g_s
  else:
    # update_gradient
    grad_norm = global_norm(g)
    unit = state["normalized_orthogonal_gradient"]
    grads = {n: v + alpha * grad_norm * unit[n] for n, v in g.items()}
  params, bufs = _sgd(
    params,
    grads,
    state["momentum_buffer"],
    weight_decay=weight_decay,
    momentum=momentum,
    lr=lr,
    nesterov=nesterov,
  )
  state["momentum_buffer"] = bufs
  state["iteration_counter"] += 1
  return params, state
