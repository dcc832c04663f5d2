"""LookSAM: SAM's second gradient only every k steps (Liu et al., CVPR 2022)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics
from optax.tree_utils import tree_vdot

from asam_jax import _validation
from asam_jax._masks import Mask
from asam_jax._perturbation import global_norm
from asam_jax._sam import SAMState, ScalarOrSchedule, _check_call, _sharpness_aware


class LookSAMState(NamedTuple):
  """State of :func:`looksam`.

  Attributes:
    sam: the :class:`asam_jax.SAMState` of the full steps; its ``count``
      counts every step, and ``perturbed_loss`` and ``perturbation_norm`` are
      those of the last full step.
    orthogonal: ``g_v``, the part of the last full step's SAM gradient
      orthogonal to its clean gradient, reused until the next full step.
  """

  sam: SAMState
  orthogonal: Any


def looksam(
  rho: ScalarOrSchedule = 0.05,
  k: int = 5,
  alpha: float = 0.7,
  *,
  adaptive: bool = False,
  eta: ScalarOrSchedule = 0.0,
  eps: float = 1e-12,
  adaptive_mask: Mask | None = None,
  perturb_mask: Mask | None = None,
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
    eps: the smallest norm divided by; zero gradients give zeros, not NaN.
    adaptive_mask: which leaves ``T_w`` scales, as in :func:`asam_jax.asam`.
    perturb_mask: which leaves are perturbed at all.
    has_aux: ``loss_fn`` returns ``(loss, aux)``; the perturbed ``aux`` is dropped.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``loss_fn=``; its state is a :class:`LookSAMState`.

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
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ValueError(f"k must be an int >= 1 (the steps between full SAM steps), got {k!r}.")
  _validation.check_nonnegative("alpha", alpha)
  sam_tx = _sharpness_aware(
    rho,
    eta,
    adaptive=adaptive,
    eps=eps,
    adaptive_mask=adaptive_mask,
    perturb_mask=perturb_mask,
    has_aux=has_aux,
  )

  def init_fn(params):
    return LookSAMState(sam_tx.init(params), jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None, *, loss_fn=None, full_step=None, **extra_args):
    del extra_args
    grads = updates
    if full_step is not None and not isinstance(full_step, bool):
      raise TypeError(
        f"full_step must be a Python bool or None, got {full_step!r}: it picks the branch "
        "when the step is traced. Compile one step with full_step=True and one with "
        "full_step=False, and call the first every k-th step."
      )
    if full_step is not False:
      _check_call(loss_fn, params)

    def full(sam_state, _):
      g_s, sam_state = sam_tx.update(grads, sam_state, params, loss_fn=loss_fn)
      projection = tree_vdot(grads, g_s) / jnp.maximum(tree_vdot(grads, grads), eps)
      g_v = jax.tree.map(lambda s, g: (s - projection * g).astype(s.dtype), g_s, grads)
      return g_s, LookSAMState(sam_state, g_v)

    def reuse(sam_state, g_v):
      scale = alpha * global_norm(grads) / jnp.maximum(global_norm(g_v), eps)
      out = jax.tree.map(lambda g, v: (g + scale * v).astype(g.dtype), grads, g_v)
      return out, LookSAMState(
        sam_state._replace(count=numerics.safe_increment(sam_state.count)), g_v
      )

    if full_step is None:
      return jax.lax.cond(state.sam.count % k == 0, full, reuse, state.sam, state.orthogonal)
    return (full if full_step else reuse)(state.sam, state.orthogonal)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
