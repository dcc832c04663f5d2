"""SAM and ASAM as optax gradient transformations that take a loss closure.

:func:`ascend` is the two-pass step every closure-based variant shares: it
checks the call, resolves the devices, builds the ball at ``w`` and climbs to
``w + eps``. A variant hands it a direction, a radius factor or its own last
pass, and combines the two gradients it returns (:class:`SAMUpdate`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from asam_jax._ascent import Ascent, ScalarOrSchedule, check_call, make_ascent
from asam_jax._layout import Layout
from asam_jax._masks import Mask


class SAMState(NamedTuple):
  """State of :func:`sam`, :func:`asam` and the variants built like them.

  Attributes:
    count: the number of updates so far; schedules for ``rho`` and ``eta`` are
      evaluated at it.
    perturbed_loss: ``L(w + eps)`` at the last update, averaged over
      ``axis_name`` when one is given. Worth logging: minus the clean loss it
      is the (first-order) sharpness.
    perturbation_norm: ``||T^-1 eps||_p``, the radius the last perturbation
      reached in the ball's own norm (``||eps||_2`` for SAM with p = 2):
      ``rho`` for any nonzero gradient, 0 for a zero one, NaN for a
      non-finite one; averaged like ``perturbed_loss``. For params stored
      below float32 it is the radius left after ``w + eps`` is rounded to their
      dtype. It is free otherwise, where ASAM's ``||eps||_2`` would cost a pass
      over the weights; compute that with :func:`asam_jax.perturbation` if you
      need it.
  """

  count: chex.Array
  perturbed_loss: chex.Array
  perturbation_norm: chex.Array


def fresh_state(ascent: Ascent, params: Any) -> SAMState:
  """The state of a fresh SAM-type transformation."""
  ascent.check_params(params)
  zero = jnp.zeros([], jnp.float32)
  return SAMState(jnp.zeros([], jnp.int32), zero, zero)


def diagnostics(
  layout: Layout, loss: chex.Array, reached: chex.Array
) -> tuple[chex.Array, chex.Array]:
  """A state's ``perturbed_loss`` and ``perturbation_norm``: float32, averaged over the devices."""
  return layout.mean((loss.astype(jnp.float32), reached.astype(jnp.float32)))


def next_state(state: SAMState, layout: Layout, loss: chex.Array, reached: chex.Array) -> SAMState:
  """The state after an update: the count advanced, the diagnostics averaged over devices."""
  return SAMState(numerics.safe_increment(state.count), *diagnostics(layout, loss, reached))


def like(tree: Any, reference: Any, params: Any) -> Any:
  """``tree`` in the dtypes of ``reference``: updates keep the incoming gradient's dtypes.

  Where the reference is the ``float0`` gradient of an integer leaf, the update
  is the zero of the leaf's own dtype, which ``optax.apply_updates`` can add.
  """
  float0 = jax.dtypes.float0
  return jax.tree.map(
    lambda x, r, w: jnp.zeros_like(w) if jnp.result_type(r) == float0 else x.astype(r.dtype),
    tree,
    reference,
    params,
  )


class Ascended(NamedTuple):
  """What :func:`ascend` returns: the two gradients, the perturbed loss, the radius, the devices."""

  grads: Any
  perturbed_grads: Any
  loss: chex.Array
  reached: chex.Array
  layout: Layout


def ascend(
  ascent: Ascent,
  updates: Any,
  params: Any,
  loss_fn: Any,
  count: chex.Array,
  *,
  loss_scale: chex.Numeric | None = None,
  clean: bool = True,
  **climb: Any,
) -> Ascended:
  """The two-pass step: the clean gradient ``g``, and the loss and gradient at ``w + eps``.

  Args:
    ascent: the perturbation and the devices.
    updates: the clean gradient, as ``update`` received it.
    params: the weights ``w``.
    loss_fn: the loss closure.
    count: the step the schedules are evaluated at.
    loss_scale: the factor ``loss_fn`` multiplies the loss by (dynamic loss
      scaling): the gradients it gives, and ``updates``, are divided by it.
    clean: ``updates`` is the clean gradient; ``False`` where it only stands
      for the params' structure (random SAM), so it is neither checked nor used.
    **climb: passed to :meth:`Ascent.climb` (a direction, a radius factor,
      the last pass).

  Returns:
    :class:`Ascended`: ``g`` (through ``layout.ascent_gradient``) and ``g_p``
    (through ``layout.perturbed_gradient``), both unscaled.
  """
  check_call(ascent.who, loss_fn, params)
  layout = ascent.layout(params, updates if clean else None)
  plain = (lambda t: t) if loss_scale is None else lambda t: unscale(t, loss_scale)
  g = plain(layout.ascent_gradient(updates)) if clean else params
  ball = ascent.ball(params, g, count, layout)
  loss, g_p, reached = ascent.climb(ball, g, loss_fn, **climb)
  return Ascended(g, plain(g_p), plain(loss), reached, layout)


def unscale(tree: Any, scale: chex.Numeric) -> Any:
  """``tree`` divided by a loss scale, leaf by leaf in its dtype; ``float0`` leaves pass."""

  def divide(x):
    if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
      return x
    return (x / jnp.asarray(scale, jnp.float32)).astype(jnp.result_type(x))

  return jax.tree.map(divide, tree)


class SAMUpdate(NamedTuple):
  """The ``update`` of SAM and of the variants that combine its two gradients.

  Its fields are the transformation's settings, readable where
  :func:`asam_jax.alternating` needs them.

  Attributes:
    ascent: the perturbation and the devices.
    combine: ``(g, g_p, layout) -> update`` from the clean gradient and the
      one at ``w + eps`` (GSAM's); ``None`` returns ``g_p``: SAM.
  """

  ascent: Ascent
  combine: Callable[[Any, Any, Layout], Any] | None = None

  def __call__(
    self,
    updates: optax.Updates,
    state: SAMState,
    params: optax.Params | None = None,
    *,
    loss_fn: Any = None,
    loss_scale: chex.Numeric | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, SAMState]:
    """One update: ``grad L(w + eps)`` (or its combination with ``g``), averaged over the devices.

    Args:
      updates: the clean gradient.
      state: the transformation's state.
      params: the weights.
      loss_fn: the loss closure ``params -> loss`` over the current batch.
      loss_scale: with dynamic loss scaling, the factor ``loss_fn`` and
        ``updates`` are scaled by; the update and the state come out unscaled.
      **extra_args: ignored.

    Returns:
      The update, in the dtypes of ``updates``, and the new state.
    """
    del extra_args
    up = ascend(self.ascent, updates, params, loss_fn, state.count, loss_scale=loss_scale)
    # With sync, from the global g and g_p; otherwise per device, then averaged.
    out = up.perturbed_grads if self.combine is None else self.combine(*up[:2], up.layout)
    out = like(up.layout.finish(out), updates, params)
    return out, next_state(state, up.layout, up.loss, up.reached)


def transformation(
  ascent: Ascent, combine: Callable[[Any, Any, Layout], Any] | None = None
) -> optax.GradientTransformationExtraArgs:
  """The transformation of ``ascent``, its settings in ``update.ascent``."""
  return optax.GradientTransformationExtraArgs(
    lambda params: fresh_state(ascent, params), SAMUpdate(ascent, combine)
  )


def ascent_of(tx: Any) -> Ascent:
  """The :class:`Ascent` of a transformation built by :func:`sam` or :func:`asam`."""
  update = getattr(tx, "update", None)
  if isinstance(update, SAMUpdate) and update.combine is None:
    return update.ascent
  raise TypeError(
    "expected a transformation built by asam_jax.sam, asam_jax.asam or asam_jax.fisher_sam "
    f"(not chained, not wrapped), got {tx!r}. Pass the optimizer that follows it separately."
  )


def sam(
  rho: ScalarOrSchedule = 0.05,
  *,
  p: float = 2,
  eps: float = 0.0,
  perturb_mask: Mask | None = None,
  axis_name: Any = None,
  sync_perturbation: Any = False,
  has_aux: bool = False,
  ascent_steps: int = 1,
  ascent_projection: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Sharpness-Aware Minimization: the gradient at the worst nearby weights.

  Given the clean gradient ``g`` at ``w``, returns ``grad L(w + eps)`` with
  ``eps = rho g / ||g||_2`` (for p = 2). Put it first in an ``optax.chain``, so
  that every later transformation (weight decay, clipping, momentum, Adam)
  sees the SAM gradient, as in Algorithm 1 of the paper.

  Args:
    rho: the neighbourhood radius, >= 0, or an optax schedule of the step
      count, which advances on every update. 0 recovers the base optimizer. A
      schedule value that is negative or not finite makes the update NaN (so
      that ``optax.apply_if_finite`` skips it).
    p: the norm of the ball: 2, ``float('inf')`` or any real number >= 1.
    eps: gradients whose norm is at most ``eps`` are divided by ``eps``
      instead; the default 0 normalizes every nonzero gradient, however small
      or large, and a zero gradient gives ``eps = 0``.
    perturb_mask: which leaves are perturbed, a pytree of bools or a callable of
      params (as ``optax.masked`` takes); the rest keep ``eps = 0`` and stay
      out of the norm. Integer leaves must be left out; their gradient may be
      the ``float0`` of ``jax.grad(..., allow_int=True)``.
    axis_name: inside ``pmap``/``shard_map`` (or ``vmap``, see
      :func:`asam_jax.grouped_update`), the data-parallel device axis, or a
      tuple of axes, over which params are replicated. Each device perturbs
      with its own gradient (m-sharpness) and the returned gradient is
      averaged over the axis. Under ``shard_map`` take the gradient with
      respect to ``asam_jax.to_varying(params, axis_name)``: a gradient already
      summed over the devices is refused. Params *sharded* over a
      ``shard_map`` axis (FSDP) need no ``axis_name`` for it: their norms are
      summed over the shards, which is global SAM.
    sync_perturbation: ``False`` (each device perturbs with its own gradient),
      ``True`` (the gradient is averaged over ``axis_name`` first: one global
      perturbation), or an axis name or tuple of names among ``axis_name``:
      one perturbation per group of devices along those axes (the SAM authors'
      ``inner_group_size``).
    has_aux: ``loss_fn`` returns ``(loss, aux)``; the perturbed pass's ``aux``
      is dropped, so the caller keeps the clean pass's (BatchNorm statistics).
    ascent_steps: the number of ascent steps before the descent gradient;
      each adds ``rho`` times the normalized gradient at the current point
      (``optax.contrib.sam``'s ``sync_period = ascent_steps + 1``). Each costs
      one more gradient.
    ascent_projection: project the perturbation back onto the ``rho``-ball
      after each ascent step (p = 2 or inf), as :func:`asam_jax.sharpness`
      does.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``loss_fn=``, a closure ``params -> scalar loss`` over the current batch,
    and optionally ``loss_scale=`` (the README's mixed-precision recipe).

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, optax, asam_jax
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> loss_fn = lambda p: jnp.sum(p["w"] ** 2)
    >>> tx = optax.chain(asam_jax.sam(rho=0.1), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss_fn)(params)
    >>> updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    >>> params = optax.apply_updates(params, updates)
    >>> print(np.asarray(params["w"]).round(4), np.asarray(state[0].perturbation_norm).round(4))
    [ 0.7911 -1.5821] 0.1

  References:
    Foret et al., Sharpness-Aware Minimization for Efficiently Improving
    Generalization, ICLR 2021, Algorithm 1.
  """
  return transformation(
    make_ascent(
      "sam",
      rho,
      p=p,
      eps=eps,
      perturb_mask=perturb_mask,
      axis_name=axis_name,
      sync_perturbation=sync_perturbation,
      has_aux=has_aux,
      ascent_steps=ascent_steps,
      ascent_projection=ascent_projection,
    )
  )


def asam(
  rho: ScalarOrSchedule = 0.5,
  eta: ScalarOrSchedule = 0.01,
  *,
  p: float = 2,
  eps: float = 0.0,
  adaptive_mask: Mask | None = None,
  perturb_mask: Mask | None = None,
  axis_name: Any = None,
  sync_perturbation: Any = False,
  has_aux: bool = False,
  ascent_steps: int = 1,
  ascent_projection: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Adaptive SAM: SAM in the scale-invariant geometry ``T_w = diag(|w| + eta)``.

  Returns ``grad L(w + eps)`` with ``eps = rho T^2 g / ||T g||_2`` (for p = 2),
  the first-order maximizer over ``||T^-1 eps||_p <= rho``. Since
  ``T_{Aw} A^-1 = T_w`` for positive per-neuron rescalings ``A`` (and
  ``eta = 0``), the perturbed loss does not depend on how a ReLU network is
  scaled. Put it first in an ``optax.chain``. It costs SAM plus one read of
  ``w``.

  By default every leaf is scaled, as in the paper.
  ``adaptive_mask=asam_jax.weight_mask`` gives the official PyTorch code's
  convention (the leaves PyTorch names ``weight``).

  Args:
    rho: the neighbourhood radius, >= 0, or an optax schedule. ASAM's radius is
      relative to ``|w|``, so it is typically ~10x SAM's (the paper uses 0.5
      to 2 on CIFAR).
    eta: the offset that keeps ``T_w`` away from 0 on zero weights, >= 0, or a
      schedule.
    p: the norm of the ball: 2, ``float('inf')`` or any real number >= 1.
    eps: as in :func:`sam`, for the norm ``||T g||``.
    adaptive_mask: which leaves ``T_w`` scales (others get ``T = 1``), a pytree
      of bools or a callable of params.
    perturb_mask: which leaves are perturbed at all.
    axis_name: as in :func:`sam`.
    sync_perturbation: as in :func:`sam`.
    has_aux: as in :func:`sam`.
    ascent_steps: as in :func:`sam`; every step is scaled by ``T_w`` at the
      unperturbed ``w``.
    ascent_projection: as in :func:`sam`, onto ``||T_w^-1 eps||_p <= rho``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``loss_fn=`` (and ``loss_scale=``).

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, optax, asam_jax
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> loss_fn = lambda p: jnp.sum(p["w"] ** 2)
    >>> tx = optax.chain(asam_jax.asam(rho=0.5, eta=0.0), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss_fn)(params)
    >>> updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    >>> print(np.asarray(optax.apply_updates(params, updates)["w"]).round(4))
    [ 0.7757 -1.406 ]

  References:
    Kwon et al., ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks, ICML 2021, Algorithm 1.
  """
  return transformation(
    make_ascent(
      "asam",
      rho,
      eta,
      geometry="adaptive",
      p=p,
      eps=eps,
      adaptive_mask=adaptive_mask,
      perturb_mask=perturb_mask,
      axis_name=axis_name,
      sync_perturbation=sync_perturbation,
      has_aux=has_aux,
      ascent_steps=ascent_steps,
      ascent_projection=ascent_projection,
    )
  )
