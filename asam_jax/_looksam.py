"""LookSAM: SAM's second gradient only every k steps (Liu et al., CVPR 2022)."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from asam_jax import _validation
from asam_jax._ascent import Ascent, ScalarOrSchedule, make_ascent
from asam_jax._masks import Mask
from asam_jax._norms import combination, inexact_leaves, inner_products, projection
from asam_jax._sam import SAMState, ascend, fresh_state, like, next_state, unscale


class LookSAMState(NamedTuple):
  """State of :func:`looksam`.

  Attributes:
    sam: the :class:`asam_jax.SAMState` of the full steps; its ``count``
      counts every step, and ``perturbed_loss`` and ``perturbation_norm`` are
      those of the last full step.
    orthogonal: ``g_v``, the part of the last full step's SAM gradient
      orthogonal to its clean gradient, reused until the next full step
      (averaged over ``axis_name``).
  """

  sam: SAMState
  orthogonal: Any


def _orthogonal_part(g, g_s, layout):
  """``g_v = g_s - (<g, g_s> / ||g||^2) g``, and whether it is finite (its coefficient is)."""
  c = projection(g_s, g, layout)
  return jax.tree.map(lambda s, x: combination(1, s, -c, x), g_s, g), jnp.isfinite(c)


def _reuse(g, g_v, alpha, layout):
  """``g + alpha (||g|| / ||g_v||) g_v``."""
  (g_leaves, v_leaves), indices = inexact_leaves(g, g_v)
  (gg, vv), (s_g, s_v) = inner_products([g_leaves, v_leaves], [(0, 0), (1, 1)], layout, indices)
  # Two roots, not the root of a ratio, which can overflow where they do not.
  scale = (
    alpha * jnp.where(vv > 0, jnp.sqrt(gg) / jnp.sqrt(jnp.where(vv > 0, vv, 1)), 0) * (s_v / s_g)
  )
  return jax.tree.map(lambda x, v: combination(1, x, scale, v), g, g_v)


def _update(
  ascent: Ascent,
  k: int,
  alpha: Any,
  updates: optax.Updates,
  state: LookSAMState,
  params: optax.Params | None = None,
  *,
  loss_fn: Any = None,
  loss_scale: Any = None,
  full_step: bool | None = None,
  **extra_args: Any,
) -> tuple[optax.Updates, LookSAMState]:
  del extra_args
  if full_step is not None and not isinstance(full_step, bool):
    raise TypeError(
      f"full_step must be a Python bool or None, got {full_step!r}: it picks the branch "
      "when the step is traced. Compile one step with full_step=True and one with "
      "full_step=False, and call the first every k-th step."
    )
  alpha = _validation.guard(alpha, jnp.float32)

  def full(sam_state, _):
    up = ascend(ascent, updates, params, loss_fn, sam_state.count, loss_scale=loss_scale)
    # Per device and then averaged, like GSAM; with sync, from the global g and g_s.
    g_v, finite = _orthogonal_part(up.grads, up.perturbed_grads, up.layout)
    out, g_v = up.layout.finish((up.perturbed_grads, g_v))
    # A non-finite step (its update NaN, for apply_if_finite to skip) keeps the stored g_v.
    finite = up.layout.everywhere(finite & jnp.isfinite(up.reached))
    g_v = jax.tree.map(lambda new, old: jnp.where(finite, new, old), g_v, state.orthogonal)
    return like(out, updates, params), LookSAMState(
      next_state(sam_state, up.layout, up.loss, up.reached), like(g_v, state.orthogonal, params)
    )

  def reuse(sam_state, g_v):
    layout = ascent.layout(params, updates)
    g = layout.ascent_gradient(updates if loss_scale is None else unscale(updates, loss_scale))
    out = layout.finish(_reuse(g, g_v, alpha, layout))
    sam_state = sam_state._replace(count=numerics.safe_increment(sam_state.count))
    return like(out, updates, params), LookSAMState(sam_state, g_v)

  if full_step is None:
    return jax.lax.cond(state.sam.count % k == 0, full, reuse, state.sam, state.orthogonal)
  return (full if full_step else reuse)(state.sam, state.orthogonal)


def looksam(
  rho: ScalarOrSchedule = 0.05,
  k: int = 5,
  alpha: float = 0.7,
  *,
  adaptive: bool = False,
  eta: ScalarOrSchedule = 0.0,
  eps: float = 0.0,
  adaptive_mask: Mask | None = None,
  perturb_mask: Mask | None = None,
  axis_name: Any = None,
  sync_perturbation: Any = False,
  has_aux: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """LookSAM: a full SAM step every ``k`` steps, its orthogonal gradient reused in between.

  On steps ``0, k, 2k, ...`` it returns SAM's gradient ``g_s = grad L(w + eps)``
  (ASAM's when ``adaptive``) and stores ``g_v = g_s - (<g, g_s> / ||g||^2) g``,
  the part of ``g_s`` orthogonal to the clean gradient ``g``. On the other
  steps it returns ``g + alpha (||g|| / ||g_v||) g_v`` and never calls
  ``loss_fn``. Average cost: ``1 + 1/k`` gradients per step. Put it first in
  an ``optax.chain``.

  Which step is full is chosen in one of two ways:

  * ``update(..., full_step=None)`` (the default): a ``lax.cond`` on the step
    count, so one compiled step serves every step and the second forward and
    backward pass really runs once every ``k`` steps (but under a ``vmap``
    that batches the state, ``cond`` becomes a select that runs both).
  * ``update(..., full_step=True)`` or ``full_step=False``, a Python bool: the
    branch is picked when the step is traced. Compile the train step twice
    (e.g. with ``full_step`` a static argument) and call the full one every
    ``k``-th step. Use this on XLA:CPU, where a gradient inside a taken
    ``lax.cond`` branch runs backward convolutions several times slower
    (see ``benchmarks/README.md``); ``k`` then only serves the default. A
    reuse step before any full step reuses ``g_v = 0`` and returns ``g``.

  Args:
    rho: the radius, >= 0, or a schedule.
    k: the interval between full SAM steps, an int >= 1 (``k = 1`` is SAM).
    alpha: the weight of the reused orthogonal gradient, >= 0 (the paper uses
      0.7).
    adaptive: perturb in ASAM's geometry ``T_w = diag(|w| + eta)``.
    eta: ASAM's offset, >= 0, or a schedule; ignored unless ``adaptive``.
    eps: as in :func:`asam_jax.sam`. Zero gradients give zeros, not NaN.
    adaptive_mask: which leaves ``T_w`` scales, as in :func:`asam_jax.asam`.
    perturb_mask: which leaves are perturbed at all.
    axis_name: as in :func:`asam_jax.sam`: each device perturbs and
      decomposes with its own gradient; the returned gradient and the stored
      ``g_v`` are averaged over the axis, so the state stays replicated.
    sync_perturbation: as in :func:`asam_jax.sam`: the perturbation and the
      decomposition use the averaged gradients, as on one device with the
      whole batch.
    has_aux: ``loss_fn`` returns ``(loss, aux)``; the perturbed ``aux`` is dropped.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``loss_fn=`` (and ``full_step=``); its state is a :class:`LookSAMState`.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, optax, asam_jax
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> loss_fn = lambda p: jnp.sum(jnp.array([1.0, 3.0]) * p["w"] ** 2)
    >>> tx = optax.chain(asam_jax.looksam(rho=0.1, k=2), optax.sgd(0.05))
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   updates, state = tx.update(jax.grad(loss_fn)(params), state, params, loss_fn=loss_fn)
    ...   params = optax.apply_updates(params, updates)
    >>> print(np.asarray(params["w"]).round(4), int(state[0].sam.count))
    [ 0.9854 -0.6098] 3

  References:
    Liu et al., Towards Efficient and Scalable Sharpness-Aware Minimization,
    CVPR 2022, Algorithm 1.
  """
  k = _validation.static_int(
    "k", k, minimum=1, who="looksam", statics=("k",), meaning="the steps between full SAM steps"
  )
  _validation.check_nonnegative("alpha", alpha)
  ascent = make_ascent(
    "looksam",
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

  def init_fn(params):
    return LookSAMState(fresh_state(ascent, params), jax.tree.map(jnp.zeros_like, params))

  return optax.GradientTransformationExtraArgs(
    init_fn, functools.partial(_update, ascent, k, alpha)
  )
