"""SAM and ASAM as optax gradient transformations that take a loss closure."""

from __future__ import annotations

import functools
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
  """State of :func:`sam` and :func:`asam`.

  Attributes:
    count: the number of updates so far; schedules for ``rho`` and ``eta`` are
      evaluated at it.
    perturbed_loss: ``L(w + eps)`` at the last update, averaged over
      ``axis_name`` when one is given. Worth logging: minus the clean loss it
      is the (first-order) sharpness.
    perturbation_norm: ``||T^-1 eps||_p``, the radius the last perturbation
      reached in the ball's own norm (``||eps||_2`` for SAM with p = 2):
      ``rho`` for any nonzero gradient, 0 for a zero one, NaN for a
      non-finite one; averaged like ``perturbed_loss``. It is free, where
      ASAM's ``||eps||_2`` would cost a pass over the weights; compute that
      with :func:`asam_jax.perturbation` if you need it.
  """

  count: chex.Array
  perturbed_loss: chex.Array
  perturbation_norm: chex.Array


def init(ascent: Ascent, params: Any) -> SAMState:
  """The state of a fresh SAM-type transformation."""
  ascent.check_params(params)
  zero = jnp.zeros([], jnp.float32)
  return SAMState(jnp.zeros([], jnp.int32), zero, zero)


def next_state(state: SAMState, layout: Any, loss: chex.Array, reached: chex.Array) -> SAMState:
  """The state after an update: the count advanced, the diagnostics averaged over devices."""
  stats = layout.mean((loss.astype(jnp.float32), reached.astype(jnp.float32)))
  return SAMState(numerics.safe_increment(state.count), *stats)


def like(tree: Any, reference: Any) -> Any:
  """``tree`` in the dtypes of ``reference``: updates keep the incoming gradient's dtypes."""
  return jax.tree.map(lambda x, r: x.astype(jnp.result_type(r)), tree, reference)


def update(
  ascent: Ascent,
  direction: Callable[[Any, Any, Layout], Any] | None,
  updates: optax.Updates,
  state: SAMState,
  params: optax.Params | None = None,
  *,
  loss_fn: Any = None,
  **extra_args: Any,
) -> tuple[optax.Updates, SAMState]:
  """The update of SAM and of the variants that combine its two gradients.

  Args:
    ascent: the perturbation and the devices.
    direction: ``(g, g_p, layout) -> update`` from the clean gradient and the
      one at ``w + eps`` (GSAM's); ``None`` returns ``g_p``: SAM.
    updates, state, params: as optax's ``update`` takes them.
    loss_fn: the loss closure.
    **extra_args: ignored.

  Returns:
    The update, averaged over the devices, and the new state.
  """
  del extra_args
  check_call(ascent.who, loss_fn, params)
  layout = ascent.layout(params, updates)
  g = layout.ascent_gradient(updates)
  loss, g_p, reached = ascent.climb(g, params, state.count, loss_fn, layout)
  # With sync, from the global g and g_p; otherwise per device, then averaged.
  out = g_p if direction is None else direction(g, g_p, layout)
  return like(layout.finish(out), updates), next_state(state, layout, loss, reached)


def transformation(
  ascent: Ascent, direction: Callable[[Any, Any, Layout], Any] | None = None
) -> optax.GradientTransformationExtraArgs:
  """The transformation of ``ascent``; :func:`asam_jax.alternating` reads SAM's back."""
  return optax.GradientTransformationExtraArgs(
    functools.partial(init, ascent), functools.partial(update, ascent, direction)
  )


def ascent_of(tx: Any) -> Ascent:
  """The :class:`Ascent` of a transformation built by :func:`sam` or :func:`asam`."""
  step = getattr(tx, "update", None)
  if isinstance(step, functools.partial) and step.func is update and step.args[1] is None:
    return step.args[0]
  raise TypeError(
    "expected a transformation built by asam_jax.sam or asam_jax.asam (not chained, not "
    f"wrapped), got {tx!r}. Pass the optimizer that follows SAM separately."
  )


def sam(
  rho: ScalarOrSchedule = 0.05,
  *,
  p: float = 2,
  eps: float = 0.0,
  perturb_mask: Mask | None = None,
  axis_name: Any = None,
  sync_perturbation: bool = False,
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
      out of the norm.
    axis_name: inside ``pmap``/``shard_map`` (or ``vmap``, see
      :func:`asam_jax.grouped_update`), the data-parallel device axis, or a
      tuple of axes, over which params are replicated. Each device perturbs
      with its own gradient (m-sharpness) and the returned gradient is
      averaged over the axis. Under ``shard_map`` take the gradient with
      respect to ``asam_jax.to_varying(params, axis_name)``: a gradient already
      summed over the devices is refused. Params *sharded* over a
      ``shard_map`` axis (FSDP) need no ``axis_name`` for it: their norms are
      summed over the shards, which is global SAM.
    sync_perturbation: with ``axis_name``, average the gradient over the axis
      before perturbing: one global perturbation instead of one per device.
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
    ``loss_fn=``, a closure ``params -> scalar loss`` over the current batch.

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
      0.0,
      adaptive=False,
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
  sync_perturbation: bool = False,
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
    ``loss_fn=``.

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
      adaptive=True,
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
