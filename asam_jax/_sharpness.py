"""Sharpness and adaptive sharpness: worst-case and average-direction.

With ``T_w = diag(|w| + eta)`` on adaptive leaves (the identity elsewhere), the
(adaptive) sharpness of Kwon et al. (2021, eq. 3) is

  ``max_{||T_w^-1 eps||_p <= rho} L(w + eps) - L(w)``

(Foret et al.'s sharpness when ``adaptive=False``), and the average-direction
sharpness of Wen, Ma and Li (2023) replaces the max by the expectation over
``eps`` uniform on the sphere ``||T_w^-1 eps||_2 = rho``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp

from asam_jax import _validation
from asam_jax._masks import Mask
from asam_jax._maximizer import real_gradient
from asam_jax._perturbation import ball_at, random_perturbation


def sharpness(
  loss_fn: Callable[[Any], chex.Array],
  params: Any,
  *,
  rho: chex.Numeric,
  adaptive: bool = False,
  eta: chex.Numeric = 0.0,
  p: float = 2,
  steps: int = 20,
  step_size: chex.Numeric | None = None,
  key: chex.PRNGKey | None = None,
  adaptive_mask: Mask | None = None,
  perturb_mask: Mask | None = None,
) -> chex.Array:
  """The (adaptive) sharpness ``max L(w + eps) - L(w)`` over ``||T_w^-1 eps||_p <= rho``.

  The maximum is sought by projected gradient ascent: ``steps`` steps of
  ``eps <- proj(eps + perturbation(grad L(w + eps), w, rho=step_size))``, each
  a steepest-ascent step of length ``step_size`` in the ball's own geometry,
  projected back onto the ball. The start is SAM's/ASAM's first-order
  maximizer ``perturbation(grad L(w), w, rho=rho)``, or a uniform random point
  on the sphere when ``key`` is given (needed at a critical point, where the
  gradient is zero). The value returned is the largest loss increase seen over
  the start and every step, and at least 0 (``eps = 0`` is in the ball), so it
  is a lower bound on the true maximum that grows with ``steps``.

  With ``adaptive=True`` and ``eta=0`` the value is invariant to the positive
  per-neuron rescalings that leave a ReLU network's function unchanged; with
  ``adaptive=False`` it is not (Kwon et al., 2021, Section 3).

  Call it under ``jax.jit`` (with ``loss_fn`` built inside), so that the ascent
  loop compiles once.

  Args:
    loss_fn: ``params -> scalar loss``, e.g. a closure over the training set.
    params: the weights ``w``.
    rho: the radius, >= 0.
    adaptive: the adaptive ball ``||T_w^-1 eps||_p <= rho`` (ASAM) or the plain
      one (SAM).
    eta: ASAM's offset in ``T_w = diag(|w| + eta)``, >= 0.
    p: 2 or ``float('inf')``, the two norms whose projection is exact.
    steps: the number of ascent steps, >= 1.
    step_size: the length of each step in ``T_w^-1`` units; default ``rho / 2``.
    key: a PRNG key for a random start; ``None`` starts along the gradient.
    adaptive_mask: which leaves ``T_w`` scales, as in :func:`asam_jax.asam`.
    perturb_mask: which leaves are perturbed at all.

  Returns:
    A scalar, ``max L(w + eps) - L(w)`` over the iterates (>= 0).

  Example:
    >>> import jax.numpy as jnp, numpy as np, asam_jax
    >>> loss_fn = lambda p: 0.5 * jnp.sum(jnp.array([4.0, 1.0]) * p["w"] ** 2)
    >>> s = asam_jax.sharpness(loss_fn, {"w": jnp.array([1.0, 1.0])}, rho=0.1, steps=50)
    >>> print(np.round(s, 4))  # a dense grid over the circle gives 0.43148
    0.4315

  References:
    Kwon et al., ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks, ICML 2021, eq. 3.
    Foret et al., Sharpness-Aware Minimization for Efficiently Improving
    Generalization, ICLR 2021.
  """
  p = _validation.check_p(p)
  if p not in (2, math.inf):
    raise ValueError(
      f"sharpness supports p=2 and p=float('inf'), got p={p}: those are the balls "
      "whose projection is exact."
    )
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
    raise ValueError(f"steps must be an int >= 1, got {steps!r}.")
  _validation.check_nonnegative("rho", rho)
  step_size = rho / 2 if step_size is None else step_size
  _validation.check_nonnegative("step_size", step_size)
  ball = ball_at(params, params, rho, eta, adaptive, adaptive_mask, perturb_mask, p=p)
  step_size = _validation.guard(step_size, ball.dtype)

  def ascent(grads):
    return [real_gradient(jax.tree.leaves(grads)[i]) for i in ball.chosen]

  clean, grads = jax.value_and_grad(loss_fn)(params)
  if key is None:
    eps = ball.maximizer(ascent(grads))[0]
  else:
    eps = ball.project(ball.maximizer(ball.random_directions(key), in_ball=True)[0])[0]

  def body(_, carry):
    eps, best = carry
    value, g = jax.value_and_grad(loss_fn)(ball.shift(eps))
    step = ball.maximizer(ascent(g), rho=step_size)[0]
    eps = ball.project([a + b for a, b in zip(eps, step)])[0]
    return eps, jnp.maximum(best, value)

  eps, best = jax.lax.fori_loop(0, steps, body, (eps, clean))
  best = jnp.maximum(best, loss_fn(ball.shift(eps)))
  return best - clean


def average_sharpness(
  loss_fn: Callable[[Any], chex.Array],
  params: Any,
  key: chex.PRNGKey,
  *,
  rho: chex.Numeric,
  adaptive: bool = False,
  eta: chex.Numeric = 0.0,
  samples: int = 64,
  adaptive_mask: Mask | None = None,
  perturb_mask: Mask | None = None,
) -> chex.Array:
  """The average-direction sharpness ``E L(w + eps) - L(w)``, eps uniform on the rho-sphere.

  A Monte Carlo mean over ``samples`` perturbations from
  :func:`random_perturbation` (uniform on ``||T_w^-1 eps||_2 = rho``), drawn
  from ``key``, evaluated one after the other to keep memory flat. For small
  ``rho`` it approaches ``rho^2 tr(T H T) / (2 d)``, d the number of perturbed
  weights (Wen, Ma and Li, 2023).

  Args:
    loss_fn: ``params -> scalar loss``.
    params: the weights ``w``.
    key: a JAX PRNG key; the same key gives the same value.
    rho: the radius, >= 0.
    adaptive: the adaptive sphere (ASAM) or the plain one.
    eta: ASAM's offset, >= 0.
    samples: the number of Monte Carlo draws, >= 1.
    adaptive_mask: which leaves ``T_w`` scales.
    perturb_mask: which leaves are perturbed at all.

  Returns:
    A scalar, the sample mean of ``L(w + eps) - L(w)``.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, asam_jax
    >>> loss_fn = lambda p: 0.5 * jnp.sum(p["w"] ** 2)  # H = I: every direction alike
    >>> s = asam_jax.average_sharpness(loss_fn, {"w": jnp.zeros(4)}, jax.random.key(0), rho=0.2)
    >>> print(np.round(s, 4))
    0.02

  References:
    Wen, Ma and Li, How Does Sharpness-Aware Minimization Minimize Sharpness?,
    ICLR 2023, Table 1.
  """
  if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
    raise ValueError(f"samples must be an int >= 1, got {samples!r}.")
  ball = dict(eta=eta, adaptive=adaptive, adaptive_mask=adaptive_mask, perturb_mask=perturb_mask)

  def one(k):
    eps = random_perturbation(k, params, rho=rho, **ball)
    return loss_fn(jax.tree.map(jnp.add, params, eps))

  values = jax.lax.map(one, jax.random.split(key, samples))
  return jnp.mean(values) - loss_fn(params)
