"""SAM without a loss closure: ascent and descent on alternate calls of ``update``."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from asam_jax._layout import axis_names
from asam_jax._maximizer import as_real
from asam_jax._sam import ascent_of, like


class AlternatingState(NamedTuple):
  """State of :func:`alternating`.

  Attributes:
    count: the calls of ``update`` so far. A call ascends when
      ``count % (ascent_steps + 1) < ascent_steps`` and descends otherwise;
      schedules are evaluated at the SAM step ``count // (ascent_steps + 1)``.
    perturbation_norm: ``||T^-1 eps||_p`` of the last ascent, as in
      :class:`asam_jax.SAMState`.
    weights: the unperturbed weights ``w``, saved by the first ascent call of
      a step and restored by its descent call.
    inner_state: the optimizer's state, which only descent calls advance.
  """

  count: chex.Array
  perturbation_norm: chex.Array
  weights: Any
  inner_state: Any


def alternating(
  tx: optax.GradientTransformation, optimizer: optax.GradientTransformation
) -> optax.GradientTransformationExtraArgs:
  """SAM/ASAM as a plain optimizer: ``update(grads, state, params)``, no loss closure.

  The perturbation moves into the parameters. With ``tx = sam(...)`` or
  ``asam(...)`` (one ascent step), odd calls of ``update`` return the ascent
  step ``eps``, so the parameters become ``w + eps`` and ``optimizer``'s state
  is untouched; even calls receive the gradient the loop took at ``w + eps``
  and return the step that restores ``w`` and applies ``optimizer`` to that
  gradient. So ``2 N`` calls are ``N`` steps of ``optax.chain(tx, optimizer)``
  (up to rounding), and the transformation works in loops that cannot pass a
  closure: Flax's stock ``TrainState.apply_gradients``,
  ``nnx.Optimizer.update(model, grads)``, or a framework that calls
  ``tx.update`` itself. It is optax's transparent SAM mode
  (``optax.contrib.sam(..., opaque_mode=False)``) with this library's
  perturbation: ``rho``, ``eta``, ``p``, masks, schedules and
  ``ascent_steps`` (``k`` ascent calls, then one descent call) come from
  ``tx``.

  What it costs and what to watch:

  * Two train-step calls (each a forward and backward pass) per SAM step, as
    SAM's two gradients; the loop's step counter counts calls.
  * Whatever the loss pass updates besides the parameters is updated on both
    calls. BatchNorm's running statistics would then mix in the perturbed
    weights' activations: keep the ascent call's and drop the descent call's
    (in the train step, ``jnp.where(descending, old_stats, new_stats)`` with
    ``descending = opt_state.count % (ascent_steps + 1) == ascent_steps``
    read *before* the update), or use the closure form
    (:func:`asam_jax.flax.nnx_value_and_grad`,
    :class:`asam_jax.flax.TrainState`), which never sees a perturbed pass's
    statistics.
  * With ``axis_name``, ``tx`` needs ``sync_perturbation=True``: the
    perturbation lives in the parameters, which must stay replicated, so it
    cannot differ per device (mSAM needs the closure form).

  Args:
    tx: a transformation built by :func:`asam_jax.sam`, :func:`asam_jax.asam`
      or :func:`asam_jax.fisher_sam`, not chained.
    optimizer: the optimizer applied to the gradient at ``w + eps``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; extra keyword arguments of
    ``update`` go to ``optimizer`` on descent calls.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, optax, asam_jax
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> loss_fn = lambda p: jnp.sum(p["w"] ** 2)
    >>> tx = asam_jax.alternating(asam_jax.sam(rho=0.1), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> for _ in range(2):  # one SAM step: ascent, then descent
    ...   updates, state = tx.update(jax.grad(loss_fn)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(np.asarray(params["w"]).round(4))
    [ 0.7911 -1.5821]

  References:
    Foret et al., Sharpness-Aware Minimization for Efficiently Improving
    Generalization, ICLR 2021, Algorithm 1.
  """
  ascent = ascent_of(tx)
  if set(ascent.sync) != set(axis_names(ascent.axis_name)):
    raise ValueError(
      "alternating keeps the perturbation in the parameters, which must stay replicated "
      "over the devices, so it cannot perturb each device with its own gradient (mSAM). "
      f"Build tx with sync_perturbation=True (global SAM over {ascent.axis_name!r}), or use "
      "the closure form, tx.update(..., loss_fn=...), for mSAM or one perturbation per "
      "group of devices."
    )
  if ascent.geometry == "fisher" and ascent.steps > 1:
    raise ValueError(
      "alternating with fisher_sam(ascent_steps > 1) would take each step's Fisher metric "
      "from the gradient at the perturbed point, not the clean one. Use ascent_steps=1, or "
      "the closure form, tx.update(..., loss_fn=...)."
    )
  period = ascent.steps + 1
  optimizer = optax.with_extra_args_support(optimizer)

  def init_fn(params):
    ascent.check_params(params)
    return AlternatingState(
      jnp.zeros([], jnp.int32), jnp.zeros([], jnp.float32), params, optimizer.init(params)
    )

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(
        "alternating moves the parameters to w + eps and back, so update needs params: "
        "tx.update(grads, state, params)."
      )
    layout = ascent.layout(params, updates)
    phase = state.count % period
    sam_step = state.count // period

    def ascend(state):
      g = layout.ascent_gradient(updates)
      if ascent.steps == 1:
        ball = ascent.ball(params, g, sam_step, layout)
        eps, reached = ascent.advance(ball, None, g)
        return like(ball.tree(eps), updates, params), state._replace(
          perturbation_norm=reached.astype(jnp.float32), weights=params
        )
      # A step's first call saves w; the later ones start from w plus the steps so far.
      weights = jax.tree.map(lambda w, p: jnp.where(phase == 0, p, w), state.weights, params)
      ball = ascent.ball(weights, g, sam_step, layout)
      moved = jax.tree.leaves(params)
      so_far = [
        as_real(moved[i]).astype(ball.dtype) - as_real(ball.params[i]).astype(ball.dtype)
        for i in ball.chosen
      ]
      eps, reached = ascent.advance(ball, so_far, g)
      if reached is None:
        reached = ball.radius(eps)
      step = [e - s for e, s in zip(eps, so_far)]
      return like(ball.tree(step), updates, params), state._replace(
        perturbation_norm=reached.astype(jnp.float32), weights=weights
      )

    def descend(state):
      grads = layout.finish(layout.perturbed_gradient(updates))
      step, inner_state = optimizer.update(grads, state.inner_state, state.weights, **extra_args)
      # Back to w, then the optimizer's step, as optax's transparent mode does.
      step = jax.tree.map(lambda w, p, u: w - p + u, state.weights, params, step)
      return like(step, updates, params), state._replace(inner_state=inner_state)

    step, state = jax.lax.cond(phase < ascent.steps, ascend, descend, state)
    return step, state._replace(count=numerics.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
