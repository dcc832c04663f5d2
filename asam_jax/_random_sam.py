"""Average-direction (random) SAM: the gradient at a random point of the rho-sphere."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from asam_jax._ascent import ScalarOrSchedule, make_ascent
from asam_jax._masks import Mask
from asam_jax._sam import ascend, diagnostics, like


class RandomSAMState(NamedTuple):
  """State of :func:`random_sam`.

  Attributes:
    count: the number of updates so far; schedules are evaluated at it.
    key: the PRNG key the next perturbation is drawn from.
    perturbed_loss: ``L(w + eps)`` at the last update.
    perturbation_norm: ``||T^-1 eps||_2`` at the last update: ``rho``.
  """

  count: chex.Array
  key: chex.PRNGKey
  perturbed_loss: chex.Array
  perturbation_norm: chex.Array


def check_key(key: Any) -> None:
  """Refuses a ``key`` that is not a JAX PRNG key (typed, or a raw uint32 pair)."""
  is_array = isinstance(key, jax.Array)
  is_typed_key = is_array and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  is_raw_key = is_array and key.dtype == jnp.uint32 and key.shape[-1:] == (2,)
  if not (is_typed_key or is_raw_key):
    raise TypeError(f"key must be a jax PRNG key, e.g. jax.random.key(0), got {key!r}.")


def random_sam(
  key: chex.PRNGKey,
  rho: ScalarOrSchedule = 0.05,
  *,
  adaptive: bool = False,
  eta: ScalarOrSchedule = 0.0,
  adaptive_mask: Mask | None = None,
  perturb_mask: Mask | None = None,
  axis_name: Any = None,
  sync_perturbation: Any = False,
  has_aux: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Average-direction SAM: returns ``grad L(w + eps)``, eps uniform on the rho-sphere.

  Each step draws ``eps`` uniformly on ``||T_w^-1 eps||_2 = rho``
  (:func:`asam_jax.random_perturbation`; ``T_w = diag(|w| + eta)`` when
  ``adaptive``, the identity otherwise) from the key in the state, and
  returns the gradient there: a stochastic descent on the average-direction
  sharpness-aware loss ``E L(w + eps)`` of Wen, Ma and Li (2023). The
  incoming clean gradient is not used, only its structure, so one gradient per
  step is enough: pass ``params`` (or anything shaped like them) in its place
  to skip the clean pass. Put it first in an ``optax.chain``.

  For an ensemble trained under ``jax.vmap``, ``jax.vmap(tx.init)`` copies the
  one key to every member, so every member would draw the same ``eps``. Give
  each member its own stream by replacing the keys after ``init``::

    states = jax.vmap(tx.init)(ensemble_params)  # tx = random_sam(...), unchained
    states = states._replace(key=jax.random.split(jax.random.key(1), n_members))

  Args:
    key: the PRNG key the perturbations are drawn from; the same key gives the
      same run.
    rho: the radius, >= 0, or a schedule.
    adaptive: draw on ASAM's adaptive sphere.
    eta: ASAM's offset, >= 0, or a schedule; ignored unless ``adaptive``.
    adaptive_mask: which leaves ``T_w`` scales, as in :func:`asam_jax.asam`.
    perturb_mask: which leaves are perturbed at all.
    axis_name: inside ``pmap``/``shard_map``, the data-parallel axis: the
      gradient is averaged over it, and by default each device draws its own
      ``eps`` (the key folded with the device's index), so one step averages
      as many directions as there are devices. The state's key stays
      replicated.
    sync_perturbation: with ``axis_name``, ``True`` makes every device draw
      the same ``eps`` (one device with the whole batch); an axis name or tuple
      of names among ``axis_name`` makes every group of devices along them
      draw one.
    has_aux: ``loss_fn`` returns ``(loss, aux)``; the ``aux`` is dropped.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``loss_fn=``; its state is a :class:`RandomSAMState`.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, optax, asam_jax
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> loss_fn = lambda p: jnp.sum(p["w"] ** 2)
    >>> tx = optax.chain(asam_jax.random_sam(jax.random.key(0), rho=0.1), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params, loss_fn=loss_fn)
    >>> print(np.asarray(state[0].perturbation_norm).round(4))
    0.1

  References:
    Wen, Ma and Li, How Does Sharpness-Aware Minimization Minimize Sharpness?,
    ICLR 2023, Table 1 (the average-direction sharpness-aware loss).
  """
  check_key(key)
  ascent = make_ascent(
    "random_sam",
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
    return RandomSAMState(jnp.zeros([], jnp.int32), key, zero, zero)

  def update_fn(updates, state, params=None, *, loss_fn=None, loss_scale=None, **extra_args):
    del extra_args
    next_key, draw = jax.random.split(state.key)

    def sphere(ball):
      # One draw per device, or per group of devices along the synced axes.
      apart = tuple(a for a in ball.layout.data_axes if a not in ball.layout.sync_axes)
      key = jax.random.fold_in(draw, jax.lax.axis_index(apart)) if apart else draw
      return ball.random_directions(key)

    # The incoming gradient only stands for the params' structure: params will do.
    up = ascend(
      ascent,
      updates,
      params,
      loss_fn,
      state.count,
      loss_scale=loss_scale,
      clean=False,
      first=sphere,
    )
    stats = diagnostics(up.layout, up.loss, up.reached)
    new_state = RandomSAMState(numerics.safe_increment(state.count), next_key, *stats)
    return like(up.layout.finish(up.perturbed_grads), updates, params), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
