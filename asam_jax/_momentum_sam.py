"""Momentum-SAM: an optimizer that keeps its weights at ``w - rho m / ||m||``, m its momentum."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from asam_jax import _validation
from asam_jax._ascent import ScalarOrSchedule, value_at
from asam_jax._layout import resolve
from asam_jax._norms import inner_products


class MomentumSAMState(NamedTuple):
  """State of :func:`momentum_sam` and :func:`momentum_sam_adamw`.

  Attributes:
    count: the number of updates so far; schedules are evaluated at it.
    momentum: the momentum ``m`` whose direction perturbs the weights: SGD's
      buffer ``m <- mu m + g``, or AdamW's first moment.
    scale: ``rho_t / ||m||``: the weights held are ``w - scale * m``, and
      :func:`momentum_sam_weights` adds ``scale * m`` back.
    nu: AdamW's second moment; ``None`` in the SGD form.
  """

  count: chex.Array
  momentum: Any
  scale: chex.Array
  nu: Any = None


def _perturbation_scale(m: Any, rho: Any, eps: float, layout: Any) -> chex.Array:
  """``rho / max(||m||, eps)``, 0 for a zero ``m``, taken without overflow or underflow."""
  leaves = jax.tree.leaves(m)
  (squares,), (s,) = inner_products([leaves], [(0, 0)], layout, range(len(leaves)))
  norm = jnp.maximum(jnp.sqrt(squares), eps * s)
  return jnp.where(norm > 0, rho * s / jnp.where(norm > 0, norm, 1), 0).astype(jnp.float32)


def _update_fn(step, *, rho, eps, axis_name, who):
  """Momentum-SAM's update around ``step(g, state, params) -> (m, nu, unperturbed update)``."""

  def update_fn(updates, state, params=None):
    layout = resolve(who, axis_name, (), params if params is not None else updates, updates)
    # The perturbation follows the replicated momentum, so with axis_name
    # this is one device with the whole batch.
    g = layout.mean(updates)
    m, nu, step_update = step(g, state, params)
    scale = _perturbation_scale(
      m, _validation.guard(value_at(rho, state.count), jnp.float32), eps, layout
    )
    # Back to w_t, the optimizer's step, then out to w~_{t+1}, as one update of w~_t.
    out = jax.tree.map(
      lambda old, new, u, g: (state.scale * old + u - scale * new).astype(g.dtype),
      state.momentum,
      m,
      step_update,
      updates,
    )
    return out, MomentumSAMState(numerics.safe_increment(state.count), m, scale, nu)

  return update_fn


def momentum_sam(
  learning_rate: ScalarOrSchedule,
  rho: ScalarOrSchedule = 0.3,
  momentum: float = 0.9,
  *,
  eps: float = 0.0,
  axis_name: Any = None,
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
  It costs SGD with momentum plus one read of ``v`` for its norm. The authors'
  code divides by ``||v|| + 1e-12``, this by ``||v||`` (a zero ``v`` gives no
  perturbation).

  Args:
    learning_rate: the SGD learning rate, or a schedule.
    rho: the perturbation radius, >= 0, or a schedule (the paper uses 0.3 to
      3 with SGD on CIFAR).
    momentum: ``mu``, in [0, 1).
    eps: norms ``||v||`` below ``eps`` are divided by ``eps`` instead.
    axis_name: inside ``pmap``/``shard_map``, the data-parallel axis: the
      gradient is averaged over it first, so the momentum, and the
      perturbation along it, are those of one device with the whole batch.

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
  _validation.check_nonnegative("eps", eps)
  momentum = _validation.in_interval(
    "momentum", momentum, low=0, high=1, closed_low=True, meaning="the momentum's decay"
  )

  def init_fn(params):
    return MomentumSAMState(
      jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params), jnp.zeros([], jnp.float32)
    )

  def step(g, state, params):
    del params
    m = jax.tree.map(lambda m, g: (momentum * m + g).astype(m.dtype), state.momentum, g)
    lr = _validation.guard(value_at(learning_rate, state.count), jnp.float32)
    return m, None, jax.tree.map(lambda x: -lr * x, m)

  return optax.GradientTransformation(
    init_fn, _update_fn(step, rho=rho, eps=eps, axis_name=axis_name, who="momentum_sam")
  )


def momentum_sam_adamw(
  learning_rate: ScalarOrSchedule = 1e-3,
  rho: ScalarOrSchedule = 1.0,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: float = 1e-2,
  *,
  axis_name: Any = None,
) -> optax.GradientTransformation:
  """Momentum-SAM in AdamW form (the authors' ``AdamW_MSAM``): AdamW at ``w - rho m / ||m||``.

  As :func:`momentum_sam`, the weights held are the perturbed ones,
  ``w~ = w - rho m / ||m||`` with ``m`` Adam's first moment (not bias
  corrected), and the gradient a loop takes there is MSAM's. With ``g`` that
  gradient, each update undoes the perturbation (``w_t = w~_t + n_t m_t``), takes
  an AdamW step with the decay applied after it, as the authors' code does,

  * ``m <- b1 m + (1 - b1) g``, ``nu <- b2 nu + (1 - b2) g^2``,
  * ``w <- w - (lr / (1 - b1^t)) m / (sqrt(nu) / sqrt(1 - b2^t) + eps)``,
  * ``w <- (1 - lr weight_decay) w``,

  and perturbs again: ``n_{t+1} = rho_t / ||m||``, ``w~ = w - n_{t+1} m``. Read the
  unperturbed weights with :func:`momentum_sam_weights`. The authors' decay
  comes after the Adam step (PyTorch's and optax's AdamW decay before it,
  from the same ``w``), so it also shrinks that step by ``1 - lr wd``; and
  their norm is ``||m|| + 1e-12`` where this divides by ``||m||``.

  Args:
    learning_rate: the learning rate, or a schedule.
    rho: the perturbation radius, >= 0, or a schedule.
    b1: the first moment's decay, in [0, 1).
    b2: the second moment's decay, in [0, 1).
    eps: Adam's ``eps``, added to the bias-corrected ``sqrt(nu)``, > 0.
    weight_decay: the decoupled weight decay, >= 0.
    axis_name: as in :func:`momentum_sam`.

  Returns:
    An ``optax.GradientTransformation`` (an optimizer); its state is a
    :class:`MomentumSAMState` with ``nu`` set.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, optax, asam_jax
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> loss_fn = lambda p: jnp.sum(p["w"] ** 2)
    >>> tx = asam_jax.momentum_sam_adamw(learning_rate=0.1, rho=0.1, weight_decay=0.0)
    >>> state = tx.init(params)
    >>> for _ in range(2):
    ...   updates, state = tx.update(jax.grad(loss_fn)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(np.asarray(asam_jax.momentum_sam_weights(params, state)["w"]).round(4))
    [ 0.8007 -1.8004]

  References:
    Becker, Altrock and Risse, Momentum-SAM: Sharpness Aware Minimization
    without Computational Overhead, arXiv:2401.12033, 2024; the authors'
    ``AdamW_MSAM``, https://github.com/MarlonBecker/MSAM.
  """
  _validation.check_nonnegative("learning_rate", learning_rate)
  _validation.check_nonnegative("rho", rho)
  _validation.check_positive("eps", eps)
  _validation.check_nonnegative("weight_decay", weight_decay)
  b1, b2 = (
    _validation.in_interval(n, b, low=0, high=1, closed_low=True, meaning="a moment's decay")
    for n, b in (("b1", b1), ("b2", b2))
  )

  def init_fn(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return MomentumSAMState(jnp.zeros([], jnp.int32), zeros, jnp.zeros([], jnp.float32), zeros)

  def step(g, state, params):
    if params is None:
      raise ValueError(
        "momentum_sam_adamw applies weight decay, so update needs params: "
        "tx.update(grads, state, params)."
      )
    t = numerics.safe_increment(state.count).astype(jnp.float32)
    lr = _validation.guard(value_at(learning_rate, state.count), jnp.float32)
    m = jax.tree.map(lambda m, g: (b1 * m + (1 - b1) * g).astype(m.dtype), state.momentum, g)
    nu = jax.tree.map(lambda v, g: (b2 * v + (1 - b2) * g * g).astype(v.dtype), state.nu, g)
    step_size = lr / (1 - b1**t)
    root = jnp.sqrt(1 - b2**t)

    def adamw(w_tilde, old, m, nu):
      adam = step_size * m / (jnp.sqrt(nu) / root + eps)
      # The decay multiplies the unperturbed w after the Adam step, as the authors' code does.
      w = w_tilde + state.scale * old
      return -adam - lr * weight_decay * (w - adam)

    return m, nu, jax.tree.map(adamw, params, state.momentum, m, nu)

  return optax.GradientTransformation(
    init_fn, _update_fn(step, rho=rho, eps=0.0, axis_name=axis_name, who="momentum_sam_adamw")
  )


def momentum_sam_weights(params: Any, state: Any) -> Any:
  """The unperturbed weights ``w = w~ + rho m / ||m||`` of a Momentum-SAM run.

  Use them for evaluation and for the final model; keep training from the
  perturbed ``params``.

  Args:
    params: the weights the optimizer holds (the perturbed ``w~``).
    state: the optimizer state: a :class:`MomentumSAMState`, or any state that
      contains exactly one (e.g. ``optax.chain``'s tuple, or ``nnx.Optimizer``'s
      ``opt_state``, whose arrays it wraps).

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
  msam = _validation.only_state(
    state, MomentumSAMState, "asam_jax.momentum_sam or momentum_sam_adamw"
  )
  # Leaf by leaf, so that the wrappers around either tree do not matter: nnx.Optimizer
  # holds the momentum as OptVariables where nnx.state(model, nnx.Param) holds Params.
  w_leaves, treedef = jax.tree.flatten(params)
  m_leaves = jax.tree.leaves(msam.momentum)
  if [jnp.shape(w) for w in w_leaves] != [jnp.shape(m) for m in m_leaves]:
    raise ValueError(
      "params and the Momentum-SAM state's momentum differ: pass the params the optimizer "
      f"updates (with NNX, nnx.state(model, wrt) for the optimizer's wrt). params leaves: "
      f"{[jnp.shape(w) for w in w_leaves]}, momentum leaves: {[jnp.shape(m) for m in m_leaves]}."
    )
  (scale,) = jax.tree.leaves(msam.scale)
  return jax.tree.unflatten(
    treedef, [(w + scale * m).astype(jnp.result_type(w)) for w, m in zip(w_leaves, m_leaves)]
  )
