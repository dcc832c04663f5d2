"""GSAM: SAM plus an ascent step on the surrogate gap (Zhuang et al., ICLR 2022)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from asam_jax import _validation
from asam_jax._ascent import ScalarOrSchedule, make_ascent
from asam_jax._masks import Mask
from asam_jax._norms import combination, projection
from asam_jax._sam import transformation


def gsam_rho_schedule(
  learning_rate: optax.Schedule,
  *,
  rho_max: float,
  rho_min: float,
  lr_max: float,
  lr_min: float,
) -> optax.Schedule:
  """GSAM's radius, which follows the learning rate between ``rho_min`` and ``rho_max``.

  ``rho_t = rho_min + (rho_max - rho_min) (lr_t - lr_min) / (lr_max - lr_min)``,
  clamped to ``[rho_min, rho_max]`` (so a warm-up from 0 starts at
  ``rho_min``), and ``rho_max`` throughout for a constant learning rate
  (``lr_max == lr_min``), as big_vision does.

  Args:
    learning_rate: the optimizer's learning-rate schedule.
    rho_max: the radius at ``lr_max``.
    rho_min: the radius at ``lr_min``, 0 <= rho_min <= rho_max.
    lr_max: the schedule's largest value (after warm-up).
    lr_min: the schedule's smallest value after warm-up, <= lr_max.

  Returns:
    An optax schedule ``count -> rho_t``, for :func:`gsam`'s ``rho``.

  Example:
    >>> import optax, asam_jax
    >>> lr = optax.linear_schedule(0.1, 0.0, 100)
    >>> rho = asam_jax.gsam_rho_schedule(lr, rho_max=0.04, rho_min=0.02, lr_max=0.1, lr_min=0.0)
    >>> print(round(float(rho(0)), 4), round(float(rho(50)), 4), round(float(rho(100)), 4))
    0.04 0.03 0.02

  References:
    Zhuang et al., Surrogate Gap Guided Sharpness-Aware Minimization, ICLR
    2022, Section 5.2 (rho_t proportional to the learning rate).
  """
  _validation.check_nonnegative("rho_min", rho_min)
  _validation.check_nonnegative("rho_max", rho_max)
  if not rho_min <= rho_max:
    raise ValueError(f"rho_min must be <= rho_max, got rho_min={rho_min}, rho_max={rho_max}.")
  if not lr_min <= lr_max:
    raise ValueError(
      f"lr_max must be >= lr_min, got lr_max={lr_max}, lr_min={lr_min}: they are the "
      "learning-rate schedule's largest and smallest values."
    )
  if lr_max == lr_min:
    return lambda count: jnp.full([], rho_max, jnp.float32)

  def schedule(count):
    fraction = (learning_rate(count) - lr_min) / (lr_max - lr_min)
    return jnp.clip(rho_min + (rho_max - rho_min) * fraction, rho_min, rho_max)

  return schedule


def _surrogate_gap_direction(alpha, minimize_fp, g, g_p, layout):
  """``g_p - alpha g_perp`` (``g_perp`` of ``g`` against ``g_p``), or big_vision's other form."""
  alpha = _validation.guard(alpha, jnp.float32)
  if minimize_fp:
    # g_perp = g - c g_p with c g_p g's projection on g_p: d = (1 + alpha c) g_p - alpha g.
    a, b = 1 + alpha * projection(g, g_p, layout), -alpha
  else:
    # g_p's part orthogonal to g, added to g: d = alpha g_p + (1 - alpha c) g.
    a, b = alpha, 1 - alpha * projection(g_p, g, layout)
  return jax.tree.map(lambda gp, x: combination(a, gp, b, x), g_p, g)


def gsam(
  rho: ScalarOrSchedule = 0.05,
  alpha: float = 0.01,
  *,
  adaptive: bool = False,
  eta: ScalarOrSchedule = 0.0,
  eps: float = 0.0,
  adaptive_mask: Mask | None = None,
  perturb_mask: Mask | None = None,
  minimize_fp: bool = True,
  axis_name: Any = None,
  sync_perturbation: Any = False,
  has_aux: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Surrogate Gap Guided SAM: SAM's gradient minus ``alpha`` times the clean gradient's orthogonal part.

  With ``g`` the clean gradient and ``g_p = grad L(w + eps)`` SAM's (``eps`` as
  in :func:`asam_jax.sam`, or :func:`asam_jax.asam` when ``adaptive``), the
  clean gradient splits into ``g_par = (<g, g_p> / ||g_p||^2) g_p`` and
  ``g_perp = g - g_par``, and the returned direction is
  ``g_p - alpha g_perp`` (Algorithm 1 of the paper). Descending along it
  minimizes the perturbed loss while the ``-alpha g_perp`` part raises the
  clean loss along a direction that leaves the perturbed one unchanged to first
  order, shrinking the surrogate gap ``L(w + eps) - L(w)``. ``alpha = 0``
  with a constant ``rho`` is exactly SAM. The paper ties ``rho`` to the
  learning rate: pass :func:`gsam_rho_schedule`. Costs SAM plus the reads of
  ``<g, g_p>`` and ``||g_p||``. Put it first in an ``optax.chain``.

  Args:
    rho: the radius, >= 0, or a schedule (e.g. :func:`gsam_rho_schedule`).
    alpha: the weight of the ascent along ``g_perp``, >= 0 (the paper searches
      0.01 to 0.3).
    adaptive: perturb in ASAM's geometry ``T_w = diag(|w| + eta)``.
    eta: ASAM's offset, >= 0, or a schedule; ignored unless ``adaptive``.
    eps: as in :func:`asam_jax.sam`. Zero ``g_p`` (or ``g``) give a zero
      projection, never NaN.
    adaptive_mask: which leaves ``T_w`` scales, as in :func:`asam_jax.asam`.
    perturb_mask: which leaves are perturbed at all.
    minimize_fp: ``True`` (the paper's GSAM): descend along
      ``g_p - alpha g_perp``. ``False`` (big_vision's other option): split
      ``g_p`` against ``g`` instead and descend along
      ``g + alpha (g_p - (<g, g_p> / ||g||^2) g)``.
    axis_name: as in :func:`asam_jax.sam`. Each device decomposes its own
      ``g`` and ``g_p`` and the directions are averaged, as in big_vision's
      trainer.
    sync_perturbation: as in :func:`asam_jax.sam`; the decomposition is then of
      the averaged ``g`` and ``g_p``, as on one device with the whole batch.
    has_aux: ``loss_fn`` returns ``(loss, aux)``; the perturbed ``aux`` is dropped.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``loss_fn=``; its state is a :class:`asam_jax.SAMState`.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, optax, asam_jax
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> loss_fn = lambda p: jnp.sum(jnp.array([1.0, 3.0]) * p["w"] ** 2)
    >>> tx = optax.chain(asam_jax.gsam(rho=0.1, alpha=0.5), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.grad(loss_fn)(params), state, params, loss_fn=loss_fn)
    >>> print(np.asarray(optax.apply_updates(params, updates)["w"]).round(4))
    [ 0.7998 -0.7403]

  References:
    Zhuang et al., Surrogate Gap Guided Sharpness-Aware Minimization, ICLR
    2022, Algorithm 1; big_vision's ``gsam_gradient`` for ``minimize_fp``.
  """
  _validation.check_nonnegative("alpha", alpha)
  ascent = make_ascent(
    "gsam",
    rho,
    eta,
    geometry="adaptive" if adaptive else "euclidean",
    eps=eps,
    adaptive_mask=adaptive_mask,
    perturb_mask=perturb_mask,
    axis_name=axis_name,
    sync_perturbation=sync_perturbation,
    has_aux=has_aux,
  )
  # Per device, then averaged (big_vision's trainer); with sync, from the global g and g_p.
  return transformation(ascent, functools.partial(_surrogate_gap_direction, alpha, minimize_fp))
