"""The F-SAM authors' FriendlySAM, ported to float64 NumPy, and the paper's order beside it.

Source: https://github.com/nblt/F-SAM, file ``utils.py`` (class
``FriendlySAM``: ``first_step``, ``second_step``, ``_grad_norm``) and
``train.py`` (how it is built and called), snapshot commit
2e2f9899ab473880430640fa5def4ad8f5aa2401.

The rule, over the parameters with a gradient, ``g`` their gradient at ``w``
and ``m`` a per-parameter state that does not exist before the first step:

* first step (no ``m`` yet): ``d = g`` (plain SAM) and ``m = g``;
* every later step: ``d = g - sigma m`` with the *previous* ``m``, then
  ``m <- lmbda m + (1 - lmbda) g``;
* ``norm = || (|w| if adaptive else 1) d ||_2``, global over every parameter;
  ``eps = rho (w^2 if adaptive else 1) d / (norm + 1e-12)``;
* ``first_step`` stores ``w`` and moves to ``w + eps``; after the second
  backward pass ``second_step`` restores the stored ``w`` (a copy) and steps
  the base optimizer with the gradient taken at ``w + eps``.

How ``train.py`` calls it (``--optimizer FriendlySAM``): the base optimizer is
``torch.optim.SGD(lr, momentum, weight_decay, nesterov=False)``, so weight
decay ``d = g + wd w`` is added by SGD at the restored ``w`` after the
perturbation (it never enters ``m`` or ``eps``); ``adaptive=0``;
``--optimizer FriendlySAM_adamw`` uses ``torch.optim.AdamW(lr, weight_decay)``
instead. The loop calls ``first_step(zero_grad=True)`` and
``second_step(zero_grad=True)`` itself; ``run.sh`` uses ``rho=0.2``,
``sigma=1``, ``lmbda=0.6``, ``lr=0.05``, ``wd=1e-3`` with a per-iteration cosine
schedule (``train.py``'s default ``lmbda`` is 0.95, the class's 0.9).

Departures from the paper (Li et al., "Friendly Sharpness-Aware
Minimization", CVPR 2024, Algorithm 1: ``m_t = lmbda m_{t-1} + (1 - lmbda) g_t``
from ``m_0 = 0``, then ``eps = rho (g_t - sigma m_t) / ||g_t - sigma m_t||``):

* ``d`` subtracts the momentum of the *previous* steps (``m_{t-1}``, without
  ``g_t``), and ``m`` is updated afterwards; the paper subtracts ``m_t``,
  which already holds ``(1 - lmbda) g_t``.
* ``m`` starts at the first gradient, not at 0, and the first step is plain
  SAM (the paper's first step perturbs along ``lmbda g_1``, the same direction).
* ``1e-12`` is added to the norm.
* ``adaptive=True`` is davda54's ASAM without ``eta`` (``T = |w|`` on every
  parameter); the authors train with ``adaptive=0``.

:func:`paper_first_step` and :func:`paper_step` are Algorithm 1's order with
everything else the same, so the two can be compared step by step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from peers import Named, global_norm

GradFn = Callable[[Named], Mapping[str, np.ndarray | None]]
BaseStep = Callable[[Named, Mapping[str, np.ndarray | None]], Named]


def init() -> dict[str, Any]:
  """``FriendlySAM``'s state before its first step: no ``momentum`` for any parameter."""
  return {"momentum": {}}


def _perturb(
  params: Named, d: Mapping[str, np.ndarray], *, rho: float, adaptive: bool
) -> tuple[Named, Named]:
  """``(w + eps, old_p)`` for the direction ``d`` (the names in ``d`` only)."""
  norm = global_norm({n: (np.abs(params[n]) if adaptive else 1.0) * v for n, v in d.items()})
  scale = rho / (norm + 1e-12)
  old_p = {n: params[n].copy() for n in d}
  perturbed = {
    n: (w + (np.square(w) if adaptive else 1.0) * d[n] * scale if n in d else w)
    for n, w in params.items()
  }
  return perturbed, old_p


def first_step(
  params: Named,
  grads: Mapping[str, np.ndarray | None],
  state: dict[str, Any],
  *,
  rho: float = 0.05,
  sigma: float = 1.0,
  lmbda: float = 0.9,
  adaptive: bool = False,
) -> tuple[Named, Named, dict[str, Any]]:
  """``FriendlySAM.first_step``: ``(w + eps, old_p, new state)``."""
  momentum = dict(state["momentum"])
  d = {}
  for n, g in grads.items():
    if g is None:
      continue
    if n not in momentum:
      momentum[n] = g.copy()
      d[n] = g
    else:
      d[n] = g - momentum[n] * sigma
      momentum[n] = momentum[n] * lmbda + g * (1 - lmbda)
  perturbed, old_p = _perturb(params, d, rho=rho, adaptive=adaptive)
  return perturbed, old_p, {"momentum": momentum}


def second_step(
  perturbed: Named,
  old_p: Named,
  grads_at_perturbed: Mapping[str, np.ndarray | None],
  base_step: BaseStep,
) -> Named:
  """Back to the stored ``w`` (where the gradient is not ``None``), then the base step."""
  back = {
    n: (old_p[n] if grads_at_perturbed.get(n) is not None else w) for n, w in perturbed.items()
  }
  return base_step(back, grads_at_perturbed)


def step(
  params: Named,
  state: dict[str, Any],
  grad_fn: GradFn,
  base_step: BaseStep,
  **kwargs: Any,
) -> tuple[Named, dict[str, Any]]:
  """One iteration of ``train.py``'s loop: gradient, ``first_step``, gradient there, ``second_step``.

  ``grad_fn`` is the batch's gradient at given weights; ``base_step`` the base
  optimizer's step (``peers.torch_sgd`` with ``momentum`` and ``weight_decay``,
  its state kept by the caller); ``kwargs`` are ``rho``, ``sigma``, ``lmbda``,
  ``adaptive``.
  """
  perturbed, old_p, state = first_step(params, grad_fn(params), state, **kwargs)
  return second_step(perturbed, old_p, grad_fn(perturbed), base_step), state


# --- the paper's order ------------------------------------------------------------


def paper_init(params: Named) -> dict[str, Any]:
  """Algorithm 1's ``m_0 = 0``."""
  return {"momentum": {n: np.zeros_like(w) for n, w in params.items()}}


def paper_first_step(
  params: Named,
  grads: Mapping[str, np.ndarray | None],
  state: dict[str, Any],
  *,
  rho: float = 0.05,
  sigma: float = 1.0,
  lmbda: float = 0.9,
  adaptive: bool = False,
) -> tuple[Named, Named, dict[str, Any]]:
  """Algorithm 1: ``m <- lmbda m + (1 - lmbda) g`` first, then ``d = g - sigma m``; else as the code."""
  momentum = dict(state["momentum"])
  d = {}
  for n, g in grads.items():
    if g is None:
      continue
    momentum[n] = momentum[n] * lmbda + g * (1 - lmbda)
    d[n] = g - momentum[n] * sigma
  perturbed, old_p = _perturb(params, d, rho=rho, adaptive=adaptive)
  return perturbed, old_p, {"momentum": momentum}


def paper_step(
  params: Named,
  state: dict[str, Any],
  grad_fn: GradFn,
  base_step: BaseStep,
  **kwargs: Any,
) -> tuple[Named, dict[str, Any]]:
  """:func:`step` with :func:`paper_first_step`; start it from :func:`paper_init`."""
  perturbed, old_p, state = paper_first_step(params, grad_fn(params), state, **kwargs)
  return second_step(perturbed, old_p, grad_fn(perturbed), base_step), state
