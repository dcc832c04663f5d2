"""Bayesian SAM: SAM as the optimizer of a Gaussian posterior (Möllenhoff and Khan, ICLR 2023)."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from asam_jax import _validation
from asam_jax._ascent import ScalarOrSchedule, check_call, value_and_grad_at, value_at
from asam_jax._ball import make_ball, normals
from asam_jax._layout import check_sync, resolve
from asam_jax._random_sam import check_key
from asam_jax._sam import unscale


class BayesianSAMState(NamedTuple):
  """State of :func:`bayesian_sam`.

  Attributes:
    count: the number of updates so far; schedules are evaluated at it.
    key: the PRNG key the next noisy sample is drawn from.
    momentum: ``gm``, the momentum of the perturbed gradients (plus decay).
    precision: ``s``, the posterior's diagonal precision (per weight, times
      ``num_data``): the posterior is ``N(w, 1 / (num_data s))``.
    perturbed_loss: ``L(w + rho g / s)`` at the last update.
  """

  count: chex.Array
  key: chex.PRNGKey
  momentum: Any
  precision: Any
  perturbed_loss: chex.Array


def _noise(key: chex.PRNGKey, params: Any) -> Any:
  """``n ~ N(0, I)`` like ``params``, drawn in the widest of their dtypes (:func:`normals`)."""
  leaves, treedef = jax.tree.flatten(params)
  dtype = jnp.result_type(*leaves) if leaves else jnp.float32
  drawn = normals(key, leaves, dtype)
  return jax.tree.unflatten(treedef, [n.astype(jnp.result_type(w)) for n, w in zip(drawn, leaves)])


def bayesian_sam_sample(key: chex.PRNGKey, params: Any, state: Any, num_data: float) -> Any:
  """A sample ``w + n / sqrt(num_data s)`` of a Bayesian SAM posterior, for predictions.

  The posterior is ``N(w, 1 / (num_data s))`` with ``s`` the state's
  precision. Its predictive distribution is the average of the model's
  predicted probabilities over samples (the authors average 32); the mean
  ``w`` itself predicts as plain SAM would.

  Args:
    key: a PRNG key; each call with another key gives another sample.
    params: the mean ``w``, the params the optimizer holds.
    state: a :class:`BayesianSAMState`, or a state that holds exactly one.
    num_data: the ``num_data`` the optimizer was built with.

  Returns:
    A pytree like ``params``.

  Example:
    >>> import jax, jax.numpy as jnp, asam_jax
    >>> params = {"w": jnp.zeros(3)}
    >>> tx = asam_jax.bayesian_sam(0.1, rho=0.01, num_data=100, key=jax.random.key(0))
    >>> samples = [asam_jax.bayesian_sam_sample(jax.random.key(i), params, tx.init(params), 100)
    ...            for i in range(2)]  # s = 1: standard deviation 0.1
    >>> print(samples[0]["w"].shape)
    (3,)

  References:
    Möllenhoff and Khan, SAM as an Optimal Relaxation of Bayes, ICLR 2023,
    Section 4 (the predictive distribution).
  """
  precision = _validation.only_state(state, BayesianSAMState, "asam_jax.bayesian_sam").precision
  return jax.tree.map(
    lambda w, n, s: (w + n * jax.lax.rsqrt(num_data * s)).astype(jnp.result_type(w)),
    params,
    _noise(key, params),
    precision,
  )


def bayesian_sam(
  learning_rate: ScalarOrSchedule,
  rho: ScalarOrSchedule,
  num_data: float,
  *,
  key: chex.PRNGKey,
  b1: float = 0.9,
  b2: float = 0.999,
  weight_decay: float = 0.0,
  damping: float = 0.1,
  s_init: float = 1.0,
  axis_name: Any = None,
  has_aux: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Bayesian SAM (bSAM): an optimizer of the mean and precision of a Gaussian posterior.

  It is the optimizer, like :func:`asam_jax.momentum_sam`: its updates
  contain the learning rate, and it holds the momentum ``gm`` and the
  precision ``s``. As the authors' ``build_bsam_optimizer``
  (team-approx-bayes/bayesian-sam, ``optim.py``), each step

  * draws ``theta = w + n / sqrt(num_data s)``, ``n ~ N(0, I)``, and takes
    ``g = grad L(theta)``;
  * takes ``g_eps = grad L(w + rho g / s)``: the ascent in the metric of the
    posterior, ``T = s^-1/2``, not normalized;
  * ``gm <- b1 gm + (1 - b1)(g_eps + weight_decay w)``, ``w <- w - lr gm / s``
    with the old ``s``;
  * only then ``s <- b2 s + (1 - b2)(sqrt(s g^2) + damping + weight_decay)``.

  There is no bias correction. ``update(grads, state, params, loss_fn=...)``
  takes both gradients itself, so ``grads`` only stands for the params'
  structure: pass ``params`` (a clean gradient, if the loop computes one for
  its logs, is not used). Evaluate with the mean ``w``, or average the
  predictions of samples from :func:`bayesian_sam_sample`.

  Args:
    learning_rate: the learning rate, or a schedule (the authors' ``alpha``
      times their ``lrfactor`` schedule).
    rho: the radius of the ascent, >= 0, or a schedule.
    num_data: the number of training examples the posterior is over (the
      authors multiply it by their data-augmentation factor).
    key: the PRNG key the noisy samples are drawn from.
    b1: the momentum's decay, in [0, 1).
    b2: the precision's decay, in [0, 1).
    weight_decay: the authors' ``delta``: the prior precision divided by the
      number of examples, >= 0.
    damping: added to the precision's update, >= 0.
    s_init: the initial precision, > 0.
    axis_name: inside ``pmap``/``shard_map``, the data-parallel axis: each
      device draws its own noise and takes its own two gradients (the
      authors' m-sharpness groups), and ``g_eps`` and ``sqrt(s g^2)`` are
      averaged over the axis.
    has_aux: ``loss_fn`` returns ``(loss, aux)``; the ``aux`` is dropped.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (an optimizer) whose
    ``update`` takes ``loss_fn=``; its state is a :class:`BayesianSAMState`.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, optax, asam_jax
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> loss_fn = lambda p: jnp.sum(p["w"] ** 2)
    >>> tx = asam_jax.bayesian_sam(0.1, rho=0.01, num_data=1000, key=jax.random.key(0))
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   updates, state = tx.update(params, state, params, loss_fn=loss_fn)
    ...   params = optax.apply_updates(params, updates)
    >>> print(int(state.count), bool(np.all(np.abs(params["w"]) < [1.0, 2.0])))
    3 True

  References:
    Möllenhoff and Khan, SAM as an Optimal Relaxation of Bayes, ICLR 2023,
    Algorithm 1; the authors' code,
    https://github.com/team-approx-bayes/bayesian-sam.
  """
  _validation.check_nonnegative("learning_rate", learning_rate)
  _validation.check_nonnegative("rho", rho)
  _validation.check_positive("num_data", num_data)
  _validation.check_nonnegative("weight_decay", weight_decay)
  _validation.check_nonnegative("damping", damping)
  _validation.check_positive("s_init", s_init)
  b1, b2 = (
    _validation.in_interval(n, b, low=0, high=1, closed_low=True, meaning="a decay rate")
    for n, b in (("b1", b1), ("b2", b2))
  )
  check_key(key)
  check_sync(axis_name, False)

  def init_fn(params):
    return BayesianSAMState(
      jnp.zeros([], jnp.int32),
      key,
      jax.tree.map(jnp.zeros_like, params),
      jax.tree.map(lambda w: jnp.full_like(w, s_init), params),
      jnp.zeros([], jnp.float32),
    )

  def update_fn(updates, state, params=None, *, loss_fn=None, loss_scale=None, **extra_args):
    del updates, extra_args
    check_call("bayesian_sam", loss_fn, params)
    layout = resolve("bayesian_sam", axis_name, (), params)
    plain = (lambda t: t) if loss_scale is None else lambda t: unscale(t, loss_scale)
    next_key, draw = jax.random.split(state.key)
    if layout.data_axes:  # each device its own noise, as the authors' m groups
      draw = jax.random.fold_in(draw, jax.lax.axis_index(layout.data_axes))
    s = state.precision
    theta = jax.tree.map(
      lambda w, n, s: (w + n * jax.lax.rsqrt(num_data * s)).astype(w.dtype),
      params,
      _noise(draw, params),
      s,
    )
    _, g = value_and_grad_at(loss_fn, has_aux, theta, layout)
    g = plain(g)
    rho_t = value_at(rho, state.count)
    ball = make_ball(params, g, rho=rho_t, geometry="precision", precision=s, layout=layout)
    eps = ball.scaled([jax.tree.leaves(g)[i] for i in ball.chosen])
    loss, g_eps = value_and_grad_at(loss_fn, has_aux, ball.shift(eps), layout)
    g_eps = plain(g_eps)
    gs = jax.tree.map(lambda g, s: jnp.sqrt(s * g**2), g, s)
    g_eps, gs, loss = layout.mean((g_eps, gs, plain(loss)))
    lr = _validation.guard(value_at(learning_rate, state.count), jnp.float32)
    momentum = jax.tree.map(
      lambda m, g, w: (b1 * m + (1 - b1) * (g + weight_decay * w)).astype(m.dtype),
      state.momentum,
      g_eps,
      params,
    )
    out = jax.tree.map(lambda m, s, w: (-lr * m / s).astype(w.dtype), momentum, s, params)
    precision = jax.tree.map(
      lambda s, gs: (b2 * s + (1 - b2) * (gs + damping + weight_decay)).astype(s.dtype), s, gs
    )
    new_state = BayesianSAMState(
      numerics.safe_increment(state.count), next_key, momentum, precision, loss.astype(jnp.float32)
    )
    return out, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
