"""big_vision's GSAM gradient and how its trainer drives it, ported to float64 NumPy.

Source: https://github.com/google-research/big_vision, files
``big_vision/trainers/proj/gsam/gsam.py`` (``dual_vector``, ``gsam_gradient``)
and ``big_vision/trainers/proj/gsam/train.py`` (``update_fn`` and the training
loop), with ``big_vision/optax.py`` (``make``, ``get_count``), snapshot commit
0127fb6b337ee2a27bf4e54dea79cff176527356.

``gsam_gradient``, with ``g`` the clean gradient at ``w`` and ``lr`` the
learning rate it is given:

* ``rho = rho_max`` if ``lr_max == lr_min``, else
  ``rho_min + (rho_max - rho_min) (lr - lr_min) / (lr_max - lr_min)``;
* ``w_p = w + rho g / (||g|| + eps)``, or with ``adaptive_perturbation``
  ``w_p = w + |w| rho g / (||g|| + eps)``; ``g_r`` the gradient at ``w_p``;
* ``minimize_fp=True`` (the paper's GSAM): ``g_par = <g, g_r/||g_r||> g_r/||g_r||``,
  ``out = g_r - alpha (g - g_par)``;
* ``minimize_fp=False``: ``g_r_par = <g_r, g/||g||> g/||g||``,
  ``out = g + alpha (g_r - g_r_par)``: the clean gradient plus ``alpha`` times
  the part of the perturbed gradient orthogonal to it.

The trainer (``train.py``) calls it on each device's batch inside ``pmap``
and averages afterwards: ``l, grads = jax.lax.pmean((l, grads), "batch")``,
so the perturbation and both decompositions are per device (m-sharpness with
m the per-device batch) and only the finished GSAM gradients are averaged.
The step index it passes is one ahead of the optimizer's: the loop runs
``step`` over ``first_step + 1 ...`` where ``first_step = get_count(opt)``,
the ``ScaleByScheduleState.count`` (0 before the first update), and
``update_fn`` uses ``lr = sched_fns[0](step) * config.lr`` for GSAM while the
optimizer's ``scale_by_schedule`` applies ``sched_fns[0](count)`` with
``count = step - 1`` (the loop logs ``sched_fn(step - 1)`` as the schedule).
So at optimizer count ``t``, GSAM's rho comes from the learning rate of step
``t + 1``.

Departures from the paper (Zhuang et al., ICLR 2022, Algorithm 1):

* rho follows the learning rate one step ahead of the one applied (above).
* ``adaptive_perturbation`` is ``rho |w| g / ||g||``, not ASAM's
  ``rho T^2 g / ||T g||``: one factor of ``|w|``, no ``eta``, the plain
  gradient's norm (it lies on ASAM's ball ``||eps / |w| || = rho`` but is not
  the maximizer of ``eps^T g`` there).
* ``eps`` is added to ``||g||`` in the perturbation; the decompositions divide
  by ``||g_r||`` and ``||g||`` with no guard.
* ``minimize_fp=False`` is not in the paper: it minimizes ``(f, h)`` rather
  than ``(f_p, h)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from peers import Named, global_norm

GradFn = Callable[[Named], Named]


def _vdot(a: Named, b: Named) -> float:
  return float(sum(np.vdot(a[n], b[n]) for n in a))


def dual_vector(y: Named) -> tuple[Named, float]:
  """``(y / ||y||, ||y||)``, ``||y||`` over every leaf; no guard against ``||y|| = 0``."""
  norm = global_norm(y)
  return {n: v / norm for n, v in y.items()}, norm


def rho_from_lr(
  lr: float, *, rho_max: float, rho_min: float, lr_max: float, lr_min: float
) -> float:
  """``gsam_gradient``'s ``sam_rho``."""
  if lr_max == lr_min:
    return rho_max
  return rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min)


def gsam_gradient(
  grad_fn: GradFn,
  params: Named,
  *,
  lr: float,
  rho_max: float,
  rho_min: float,
  alpha: float,
  lr_max: float,
  lr_min: float,
  eps: float = 1e-12,
  adaptive_perturbation: bool = False,
  minimize_fp: bool = True,
) -> Named:
  """The GSAM gradient of one device, ``grad_fn`` its gradient at given weights."""
  g_clean = grad_fn(params)
  _, g_clean_length = dual_vector(g_clean)
  rho = rho_from_lr(lr, rho_max=rho_max, rho_min=rho_min, lr_max=lr_max, lr_min=lr_min)
  step = rho / (g_clean_length + eps)
  if adaptive_perturbation:
    param_sam = {n: w + np.abs(w) * step * g_clean[n] for n, w in params.items()}
  else:
    param_sam = {n: w + step * g_clean[n] for n, w in params.items()}
  g_robust = grad_fn(param_sam)

  if minimize_fp:
    unit_robust, _ = dual_vector(g_robust)
    projection = _vdot(unit_robust, g_clean)
    residual = {n: g - projection * unit_robust[n] for n, g in g_clean.items()}
    return {n: g - alpha * residual[n] for n, g in g_robust.items()}
  unit_clean, _ = dual_vector(g_clean)
  projection = _vdot(unit_clean, g_robust)
  residual = {n: g - projection * unit_clean[n] for n, g in g_robust.items()}
  return {n: g + alpha * residual[n] for n, g in g_clean.items()}


def trainer_gradient(
  grad_fns: Sequence[GradFn],
  params: Named,
  *,
  count: int,
  learning_rate: Callable[[int], float],
  **gsam_kwargs,
) -> Named:
  """What ``update_fn`` hands the optimizer at optimizer count ``count``.

  ``learning_rate(step)`` is ``sched_fns[0](step) * config.lr``, the absolute
  rate; GSAM is given it at ``step = count + 1``. ``grad_fns`` holds one
  gradient function per device (its own batch); the per-device GSAM gradients
  are averaged, as ``jax.lax.pmean`` does.
  """
  lr = learning_rate(count + 1)
  per_device = [gsam_gradient(f, params, lr=lr, **gsam_kwargs) for f in grad_fns]
  return {n: np.mean([d[n] for d in per_device], axis=0) for n in params}


def sgd_trainer_step(
  params: Named,
  grad_fns: Sequence[GradFn],
  *,
  count: int,
  learning_rate: Callable[[int], float],
  **gsam_kwargs,
) -> Named:
  """One trainer step with plain SGD (``config.optax_name = "identity"``): ``w - lr(count) g_gsam``.

  big_vision's optimizer chain applies ``sched_fns[0](count) * config.lr`` (via
  ``scale_by_schedule`` and ``scale(config.lr)``), at the count before the update.
  """
  g = trainer_gradient(grad_fns, params, count=count, learning_rate=learning_rate, **gsam_kwargs)
  lr = learning_rate(count)
  return {n: w - lr * g[n] for n, w in params.items()}
