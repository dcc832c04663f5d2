"""Momentum-SAM: SGD with momentum that keeps its weights at ``w - rho v / ||v||``."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from asam_jax import _validation
from asam_jax._perturbation import global_norm
from asam_jax._sam import ScalarOrSchedule, _value_at


class MomentumSAMState(NamedTuple):
  """State of :func:`momentum_sam`.

  Attributes:
    count: the number of updates so far; schedules are evaluated at it.
    momentum: the momentum buffer ``v`` (``v <- mu v + g``).
    scale: ``rho_t / ||v||``: the weights held are ``w - scale * v``, and
      :func:`momentum_sam_weights` adds ``scale * v`` back.
  """

  count: chex.Array
  momentum: Any
  scale: chex.Array


def momentum_sam(
  learning_rate: ScalarOrSchedule,
  rho: ScalarOrSchedule = 0.3,
  momentum: float = 0.9,
  *,
  eps: float = 1e-12,
) -> optax.GradientTransformation:
  """Momentum-SAM (MSAM): SGD with momentum, evaluated at the weights perturbed along ``-v``.

  The parameters this optimizer holds are the perturbed ones,
  ``w~ = w - rho v / ||v||``, so the gradient a training loop computes at them
  is already MSAM's: one gradient per step, no ``loss_fn``. With ``g`` that
  gradient, each update (Algorithm 1 of the paper, in its efficient form)

  * undoes the perturbation: ``w_t = w~_t + rho_{t-1} v_t / ||v_t||``,
  * takes an SGD-with-momentum step: ``v_{t+1} = mu v_t + g``,
    ``w_{t+1} = w_t - lr_t v_{t+1}``,
  * perturbs again: ``w~_{t+1} = w_{t+1} - rho_t v_{t+1} / ||v_{t+1}||``.

  The first step has ``v_0 = 0`` and so no perturbation. To evaluate or save
  the model, read the unperturbed weights with :func:`momentum_sam_weights`
  (the paper's code calls this ``move_back_from_momentumAscent``). For weight
  decay as in the paper's code, chain ``optax.add_decayed_weights`` before it.

  Args:
    learning_rate: the SGD learning rate, or a schedule.
    rho: the perturbation radius, >= 0, or a schedule (the paper uses 0.3 to
      3 with SGD on CIFAR).
    momentum: ``mu``, in [0, 1).
    eps: added to ``||v||`` before dividing, so a zero momentum gives no
      perturbation rather than NaN.

  Returns:
    An ``optax.GradientTransformation`` (an optimizer: its updates already
    contain the learning rate); its state is a :class:`MomentumSAMState`.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, optax, asam_jax
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> loss_fn = lambda p: jnp.sum(p["w"] ** 2)
    >>> tx = asam_jax.momentum_sam(learning_rate=0.1, rho=0.1)
    >>> state = tx.init(params)
    >>> for _ in range(2):
    ...   updates, state = tx.update(jax.grad(loss_fn)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(np.asarray(asam_jax.momentum_sam_weights(params, state)["w"]).round(4))
    [ 0.4689 -0.9379]

  References:
    Becker, Altrock and Risse, Momentum-SAM: Sharpness Aware Minimization
    without Computational Overhead, arXiv:2401.12033, 2024, Algorithm 1.
  """
  _validation.check_nonnegative("learning_rate", learning_rate)
  _validation.check_nonnegative("rho", rho)
  _validation.check_positive("eps", eps)
  if not 0 <= momentum < 1:
    raise ValueError(f"momentum must be in [0, 1), got {momentum}.")

  def init_fn(params):
    return MomentumSAMState(
      jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params), jnp.zeros([], jnp.float32)
    )

  def update_fn(updates, state, params=None):
    del params
    v = jax.tree.map(lambda m, g: momentum * m + g, state.momentum, updates)
    lr = _value_at(learning_rate, state.count)
    scale = _value_at(rho, state.count) / (global_norm(v) + eps)
    # Back to w_t, the SGD step, then out to w~_{t+1}, as one update of w~_t.
    out = jax.tree.map(
      lambda old, new: (state.scale * old - (lr + scale) * new).astype(new.dtype),
      state.momentum,
      v,
    )
    return out, MomentumSAMState(
      numerics.safe_increment(state.count), v, jnp.asarray(scale, jnp.float32)
    )

  return optax.GradientTransformation(init_fn, update_fn)


def momentum_sam_weights(params: Any, state: Any) -> Any:
  """The unperturbed weights ``w = w~ + rho v / ||v||`` of a :func:`momentum_sam` run.

  Use them for evaluation and for the final model; keep training from the
  perturbed ``params``.

  Args:
    params: the weights the optimizer holds (the perturbed ``w~``).
    state: the optimizer state: a :class:`MomentumSAMState`, or any state that
      contains exactly one (e.g. ``optax.chain``'s tuple).

  Returns:
    A pytree like ``params``.

  Example:
    >>> import jax.numpy as jnp, asam_jax
    >>> tx = asam_jax.momentum_sam(learning_rate=0.1)
    >>> params = {"w": jnp.ones(2)}
    >>> asam_jax.momentum_sam_weights(params, tx.init(params))["w"]  # no momentum yet
    Array([1., 1.], dtype=float32)

  References:
    Becker, Altrock and Risse, Momentum-SAM, arXiv:2401.12033, 2024.
  """
  found = [
    s
    for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, MomentumSAMState))
    if isinstance(s, MomentumSAMState)
  ]
  if len(found) != 1:
    raise ValueError(
      f"state must contain exactly one MomentumSAMState (the state of "
      f"asam_jax.momentum_sam), found {len(found)}."
    )
  (msam,) = found
  return jax.tree.map(lambda w, v: (w + msam.scale * v).astype(w.dtype), params, msam.momentum)
