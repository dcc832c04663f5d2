"""Friendly SAM: the ascent along the gradient minus its running mean (Li et al., CVPR 2024)."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from asam_jax import _validation
from asam_jax._ascent import ScalarOrSchedule, make_ascent
from asam_jax._masks import Mask
from asam_jax._maximizer import real_gradient
from asam_jax._sam import ascend, diagnostics, like


class FriendlySAMState(NamedTuple):
  """State of :func:`friendly_sam`.

  Attributes:
    count: the number of updates so far; schedules are evaluated at it.
    momentum: ``m``, the running mean of the clean gradients (averaged over
      ``axis_name``, so replicated).
    perturbed_loss: ``L(w + eps)`` at the last update.
    perturbation_norm: ``||T^-1 eps||_2`` at the last update, as in
      :class:`asam_jax.SAMState`.
  """

  count: chex.Array
  momentum: Any
  perturbed_loss: chex.Array
  perturbation_norm: chex.Array


def friendly_sam(
  rho: ScalarOrSchedule = 0.05,
  sigma: float = 1.0,
  lmbda: float = 0.9,
  *,
  adaptive: bool = False,
  eta: ScalarOrSchedule = 0.0,
  adaptive_mask: Mask | None = None,
  perturb_mask: Mask | None = None,
  axis_name: Any = None,
  sync_perturbation: Any = False,
  has_aux: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Friendly SAM (F-SAM): the ascent along ``g - sigma m``, ``m`` the running mean of ``g``.

  The full-batch part of the gradient, which ``m`` estimates, barely changes
  the sharpness, so F-SAM removes it from the ascent direction. As the
  authors' code (nblt/F-SAM, ``utils.py``) does:

  * the first step is plain SAM, and sets ``m = g``;
  * afterwards the direction is ``d = g - sigma m`` with the previous ``m``, and
    only then ``m <- lmbda m + (1 - lmbda) g``;
  * ``eps = rho d / ||d||`` (ASAM's ball with ``adaptive=True``).

  ``m`` averages the raw clean gradients; weight decay belongs to the optimizer
  after it. A step whose gradient is not finite (its update NaN, which
  ``optax.apply_if_finite`` skips) leaves ``m`` as it was. The paper updates ``m`` first, from ``m = 0``, then subtracts it:
  after several steps the two differ by a few percent (the code's order is
  followed here). Returns ``grad L(w + eps)``; put it first in an
  ``optax.chain``. It costs SAM plus one read and write of ``m``. The authors
  divide by ``||d|| + 1e-12``, this by ``||d||``.

  Args:
    rho: the radius, >= 0, or a schedule.
    sigma: the weight of ``m`` subtracted from the gradient, >= 0 (0 is SAM).
    lmbda: the decay of ``m``, in [0, 1).
    adaptive: perturb in ASAM's geometry ``T_w = diag(|w| + eta)``.
    eta: ASAM's offset, >= 0, or a schedule; ignored unless ``adaptive``.
    adaptive_mask: which leaves ``T_w`` scales, as in :func:`asam_jax.asam`.
    perturb_mask: which leaves are perturbed at all.
    axis_name: as in :func:`asam_jax.sam`: each device subtracts ``m`` from
      its own gradient, and ``m`` follows the gradient averaged over the axis.
    sync_perturbation: as in :func:`asam_jax.sam`.
    has_aux: as in :func:`asam_jax.sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``loss_fn=``; its state is a :class:`FriendlySAMState`.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, optax, asam_jax
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> loss_fn = lambda p: jnp.sum(jnp.array([1.0, 3.0]) * p["w"] ** 2)
    >>> tx = optax.chain(asam_jax.friendly_sam(rho=0.1, sigma=1.0, lmbda=0.9), optax.sgd(0.05))
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   updates, state = tx.update(jax.grad(loss_fn)(params), state, params, loss_fn=loss_fn)
    ...   params = optax.apply_updates(params, updates)
    >>> print(np.asarray(params["w"]).round(4))
    [ 0.7288 -0.7224]

  References:
    Li, Zhou, He, Cheng and Huang, Friendly Sharpness-Aware Minimization,
    CVPR 2024, Algorithm 1; the authors' code, https://github.com/nblt/F-SAM.
  """
  _validation.check_nonnegative("sigma", sigma)
  lmbda = _validation.in_interval(
    "lmbda", lmbda, low=0, high=1, closed_low=True, meaning="the decay of m"
  )
  ascent = make_ascent(
    "friendly_sam",
    rho,
    eta,
    geometry="adaptive" if adaptive else "euclidean",
    adaptive_mask=adaptive_mask,
    perturb_mask=perturb_mask,
    axis_name=axis_name,
    sync_perturbation=sync_perturbation,
    has_aux=has_aux,
  )

  def init_fn(params):
    ascent.check_params(params)
    zero = jnp.zeros([], jnp.float32)
    return FriendlySAMState(
      jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params), zero, zero
    )

  def update_fn(updates, state, params=None, *, loss_fn=None, loss_scale=None, **extra_args):
    del extra_args
    started = state.count > 0
    m = jax.tree.leaves(state.momentum)
    # The first step is SAM: nothing to subtract yet.
    weight = jnp.where(started, _validation.guard(sigma, jnp.float32), 0)

    def direction(i, g):
      return g - (weight * real_gradient(m[i])).astype(g.dtype)

    up = ascend(
      ascent, updates, params, loss_fn, state.count, loss_scale=loss_scale, direction=direction
    )
    g = up.layout.mean(up.grads)
    # A non-finite gradient (its step NaN, for apply_if_finite to skip) leaves m as it was.
    finite = up.layout.everywhere(jnp.isfinite(up.reached))

    def mean_of(m, g):
      if not jnp.issubdtype(jnp.result_type(g), jnp.inexact):
        return m
      new = jnp.where(started, lmbda * m + (1 - lmbda) * g, g)
      return jnp.where(finite, new, m).astype(m.dtype)

    momentum = jax.tree.map(mean_of, state.momentum, g)
    stats = diagnostics(up.layout, up.loss, up.reached)
    new_state = FriendlySAMState(numerics.safe_increment(state.count), momentum, *stats)
    return like(up.layout.finish(up.perturbed_grads), updates, params), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
