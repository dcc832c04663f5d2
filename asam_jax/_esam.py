"""ESAM: SAM with a random share of the weights perturbed and the sharpest examples kept (Du et al., ICLR 2022)."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax._src import numerics

from asam_jax import _validation
from asam_jax._ascent import ScalarOrSchedule, make_ascent
from asam_jax._masks import Mask
from asam_jax._random_sam import check_key
from asam_jax._sam import ascend, diagnostics, like


class ESAMState(NamedTuple):
  """State of :func:`esam`.

  Attributes:
    count: the number of updates so far; schedules are evaluated at it.
    key: the PRNG key the next draw of perturbed leaves comes from.
    perturbed_loss: the loss at ``w + eps`` that the returned gradient is the
      gradient of (with ``gamma < 1``, the mean over the kept examples).
    perturbation_norm: ``||T^-1 eps||_2`` at the last update: ``rho / beta``
      when some leaf was drawn, 0 when none was.
  """

  count: chex.Array
  key: chex.PRNGKey
  perturbed_loss: chex.Array
  perturbation_norm: chex.Array


def _selected_gradient(loss_fn, has_aux, clean, gamma):
  """The last pass of ESAM's data selection: ``perturbed -> (loss, gradient)``.

  The mean loss over the ``int(gamma n)`` examples whose loss rose most from
  ``w`` to ``w + eps``, and its gradient, from one forward and one backward
  pass at ``w + eps``.
  """

  def losses(params):
    out = loss_fn(params)
    return out[0] if has_aux else out

  def last(perturbed):
    after, pullback = jax.vjp(losses, perturbed)
    n = after.shape[0] if after.ndim == 1 else 0
    if after.ndim != 1 or jnp.shape(clean) != after.shape:
      raise TypeError(
        "esam with gamma < 1 selects examples, so loss_fn must return one loss per "
        f"example, a vector of shape (batch,): got shape {after.shape}, and the clean "
        f"losses have shape {jnp.shape(clean)}. Return the unreduced loss, e.g. "
        "optax.softmax_cross_entropy_with_integer_labels(logits, labels) without .mean()."
      )
    k = int(gamma * n)
    if k < 1:
      raise ValueError(
        f"esam keeps int(gamma * batch) = int({gamma} * {n}) = 0 examples: raise gamma or "
        "the per-device batch."
      )
    rise = after.astype(jnp.float32) - clean.astype(jnp.float32)
    _, kept = jax.lax.top_k(rise, k)
    weights = jnp.zeros(n, after.dtype).at[kept].set(1 / k)
    (grads,) = pullback(weights)
    return jnp.sum(weights * after), grads

  return last


def esam(
  rho: ScalarOrSchedule = 0.05,
  beta: float = 0.5,
  gamma: float = 0.5,
  *,
  key: chex.PRNGKey,
  adaptive: bool = False,
  eta: ScalarOrSchedule = 0.0,
  adaptive_mask: Mask | None = None,
  perturb_mask: Mask | None = None,
  axis_name: Any = None,
  sync_perturbation: Any = False,
  has_aux: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """ESAM: SAM with stochastic weight perturbation and sharpness-sensitive data selection.

  * **Stochastic weight perturbation:** each step draws, from the key in the
    state, each perturbed leaf with probability ``beta`` (per tensor, as the
    authors' ``utils/Esam.py`` does; the paper draws per coordinate), and
    perturbs only the drawn ones: ``eps = (rho / beta) (m g) / ||m g||`` with
    ``m`` the drawn leaves and the norm over them. The second gradient is over
    every leaf.
  * **Sharpness-sensitive data selection:** with ``gamma < 1``, ``loss_fn``
    returns per-example losses, and the returned gradient is that of the mean
    loss over the ``int(gamma n)`` examples whose loss rose most from ``w`` to
    ``w + eps`` (the paper's count; the authors' code keeps the examples
    strictly above the ``int(gamma n)``-th largest rise, one fewer). The
    losses at ``w`` come from ``update(..., losses=...)`` when the clean pass
    returns them, else from one more forward pass.

  With ``beta = gamma = 1`` it is :func:`asam_jax.sam`. Put it first in an
  ``optax.chain``. The authors draw step ``t``'s leaves at the end of step
  ``t - 1``, so their first step perturbs every leaf; here every step draws,
  and their norm adds ``1e-7``, where this divides by the exact norm.

  Args:
    rho: the radius, >= 0, or a schedule; the perturbation reaches ``rho / beta``.
    beta: the probability that a leaf is perturbed, in (0, 1].
    gamma: the fraction of the batch whose gradient is returned, in (0, 1].
    key: the PRNG key the draws come from; the same key gives the same draws.
    adaptive: perturb in ASAM's geometry ``T_w = diag(|w| + eta)``.
    eta: ASAM's offset, >= 0, or a schedule; ignored unless ``adaptive``.
    adaptive_mask: which leaves ``T_w`` scales, as in :func:`asam_jax.asam`.
    perturb_mask: which leaves can be drawn at all.
    axis_name: as in :func:`asam_jax.sam`; every device draws the same leaves,
      and selects among its own examples.
    sync_perturbation: as in :func:`asam_jax.sam`.
    has_aux: ``loss_fn`` returns ``(loss, aux)``; the ``aux`` is dropped.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``loss_fn=`` (and, with ``gamma < 1``, optionally ``losses=``, the clean
    pass's per-example losses); its state is an :class:`ESAMState`.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, optax, asam_jax
    >>> x, y = jnp.arange(8.0).reshape(4, 2), jnp.array([1.0, 0.0, 2.0, 1.0])
    >>> params = {"w": jnp.array([0.5, -0.5]), "b": jnp.array(0.1)}
    >>> losses = lambda p: (x @ p["w"] + p["b"] - y) ** 2  # one loss per example
    >>> tx = optax.chain(asam_jax.esam(0.1, beta=0.5, gamma=0.5, key=jax.random.key(0)),
    ...                  optax.sgd(0.01))
    >>> state = tx.init(params)
    >>> clean, grads = jax.value_and_grad(lambda p: losses(p).mean())(params)
    >>> updates, state = tx.update(grads, state, params, loss_fn=losses)
    >>> print(int(state[0].count), bool(np.isfinite(state[0].perturbed_loss)))
    1 True

  References:
    Du, Yan, Feng, Zhou, Zhen, Goh and Tan, Efficient Sharpness-aware
    Minimization for Improved Training of Neural Networks, ICLR 2022,
    Algorithm 1; the authors' code, https://github.com/dydjw9/Efficient_SAM.
  """
  beta = _validation.in_interval(
    "beta", beta, low=0, high=1, closed_low=False, meaning="the share of leaves perturbed"
  )
  if isinstance(gamma, (jax.Array, np.ndarray)):
    raise TypeError(
      "gamma is traced, but it sets how many examples are kept, which must be static. "
      "optax.inject_hyperparams injects every numeric argument, defaults included: build "
      "with optax.inject_hyperparams(asam_jax.esam, static_args=('gamma',))."
    )
  _validation.in_interval(
    "gamma", gamma, low=0, high=1, closed_low=False, meaning="the share of the batch kept"
  )
  check_key(key)
  ascent = make_ascent(
    "esam",
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
    return ESAMState(jnp.zeros([], jnp.int32), key, zero, zero)

  def update_fn(
    updates, state, params=None, *, loss_fn=None, losses=None, loss_scale=None, **extra_args
  ):
    del extra_args
    next_key, draw = jax.random.split(state.key)
    # One Bernoulli(beta) per leaf; the same on every device (the key is replicated).
    drawn = jax.random.bernoulli(draw, beta, (len(jax.tree.leaves(updates)),))

    def direction(i, g):
      # 0 g, not 0: a leaf left out still makes a non-finite gradient's step NaN.
      return jnp.where(drawn[i], g, 0 * g)

    climb: dict[str, Any] = {"direction": direction, "rho_factor": 1 / beta}
    # Without loss_fn or params, ascend says how to call update.
    if gamma < 1 and loss_fn is not None and params is not None:
      clean = losses
      if clean is None:
        out = loss_fn(params)
        clean = out[0] if has_aux else out
      climb["last"] = _selected_gradient(loss_fn, has_aux, clean, gamma)
    up = ascend(ascent, updates, params, loss_fn, state.count, loss_scale=loss_scale, **climb)
    stats = diagnostics(up.layout, up.loss, up.reached)
    new_state = ESAMState(numerics.safe_increment(state.count), next_key, *stats)
    return like(up.layout.finish(up.perturbed_grads), updates, params), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
