"""Average-direction (random) SAM: the gradient at a random point of the rho-sphere."""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from asam_jax import _validation
from asam_jax._masks import Mask, resolve_masks
from asam_jax._perturbation import global_norm
from asam_jax._sam import ScalarOrSchedule, _check_call, _value_and_grad_at, _value_at
from asam_jax._sharpness import random_perturbation


class RandomSAMState(NamedTuple):
  """State of :func:`random_sam`.

  Attributes:
    count: the number of updates so far; schedules are evaluated at it.
    key: the PRNG key the next perturbation is drawn from.
    perturbed_loss: ``L(w + eps)`` at the last update.
    perturbation_norm: ``||eps||_2`` at the last update.
  """

  count: chex.Array
  key: chex.PRNGKey
  perturbed_loss: chex.Array
  perturbation_norm: chex.Array


def random_sam(
  key: chex.PRNGKey,
  rho: ScalarOrSchedule = 0.05,
  *,
  adaptive: bool = False,
  eta: ScalarOrSchedule = 0.0,
  adaptive_mask: Mask | None = None,
  perturb_mask: Mask | None = None,
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

  Args:
    key: the PRNG key the perturbations are drawn from; the same key gives the
      same run.
    rho: the radius, >= 0, or a schedule.
    adaptive: draw on ASAM's adaptive sphere.
    eta: ASAM's offset, >= 0, or a schedule; ignored unless ``adaptive``.
    adaptive_mask: which leaves ``T_w`` scales, as in :func:`asam_jax.asam`.
    perturb_mask: which leaves are perturbed at all.
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
  _validation.check_nonnegative("rho", rho)
  _validation.check_nonnegative("eta", eta)
  is_typed_key = isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  is_raw_key = isinstance(key, jax.Array) and key.dtype == jnp.uint32 and key.shape == (2,)
  if not (is_typed_key or is_raw_key):
    raise TypeError(f"key must be a jax PRNG key, e.g. jax.random.key(0), got {key!r}.")

  def init_fn(params):
    # Masks are checked against the parameters here, before any tracing.
    resolve_masks(params, adaptive=adaptive, adaptive_mask=adaptive_mask, perturb_mask=perturb_mask)
    zero = jnp.zeros([], jnp.float32)
    return RandomSAMState(jnp.zeros([], jnp.int32), key, zero, zero)

  def update_fn(updates, state, params=None, *, loss_fn=None, **extra_args):
    del updates, extra_args
    _check_call(loss_fn, params)
    next_key, draw = jax.random.split(state.key)
    eps_tree = random_perturbation(
      draw,
      params,
      rho=_value_at(rho, state.count),
      eta=_value_at(eta, state.count),
      adaptive=adaptive,
      adaptive_mask=adaptive_mask,
      perturb_mask=perturb_mask,
    )
    loss, grads = _value_and_grad_at(loss_fn, has_aux, params, eps_tree)
    new_state = RandomSAMState(
      numerics.safe_increment(state.count),
      next_key,
      loss.astype(jnp.float32),
      global_norm(eps_tree),
    )
    return grads, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
