"""The (adaptive) sharpness-aware perturbation as pure functions of pytrees.

The first-order solution of ``max_{||T^-1 eps||_p <= rho} eps^T g`` with
``T = diag(|w| + eta)`` on ASAM's leaves and ``T = 1`` elsewhere (Kwon et al.,
ICML 2021, eq. 4; Foret et al., ICLR 2021, eq. 2), and a uniform draw on the
sphere of that ball (Wen, Ma and Li, ICLR 2023): the transformations' own
ball (:mod:`asam_jax._ball`), outside any transformation.
"""

from __future__ import annotations

from typing import Any

import chex
import jax

from asam_jax import _validation
from asam_jax._ball import Ball, make_ball
from asam_jax._layout import Layout, shard_axes_of
from asam_jax._masks import Mask
from asam_jax._maximizer import real_gradient


def ball_at(
  params: Any,
  grads: Any,
  rho: chex.Numeric,
  eta: chex.Numeric,
  adaptive: bool,
  adaptive_mask: Mask | None,
  perturb_mask: Mask | None,
  *,
  p: float = 2,
  floor: float = 0.0,
) -> Ball:
  """The ball of the pure functions (SAM's or ASAM's, outside any transformation), checked."""
  p = _validation.check_p(p)
  _validation.check_nonnegative("rho", rho)
  _validation.check_nonnegative("eta", eta)
  return make_ball(
    params,
    grads,
    rho=rho,
    eta=eta,
    geometry="adaptive" if adaptive else "euclidean",
    p=p,
    floor=floor,
    adaptive_mask=adaptive_mask,
    perturb_mask=perturb_mask,
    layout=Layout(shard_axes=shard_axes_of(params)),
  )


def perturbation(
  grads: Any,
  params: Any,
  *,
  rho: chex.Numeric,
  eta: chex.Numeric = 0.0,
  adaptive: bool = False,
  p: float = 2,
  eps: float = 0.0,
  adaptive_mask: Mask | None = None,
  perturb_mask: Mask | None = None,
) -> Any:
  """The (adaptive) sharpness-aware perturbation ``eps`` for gradient ``grads``.

  ``eps`` maximizes the first-order loss increase ``eps^T g`` over the ball
  ``||T_w^-1 eps||_p <= rho``, where ``T_w = diag(|w| + eta)`` on adaptive
  leaves and the identity elsewhere. With ``adaptive=False`` this is SAM's
  perturbation; with ``adaptive=True`` it is ASAM's. The norm is global over
  every perturbed leaf (and over the shards of a leaf sharded inside
  ``shard_map``), taken in float32 or wider whatever the leaves' dtype, and
  rescaled where it would overflow or underflow, so ``||T^-1 eps||_p = rho``
  holds for any nonzero finite gradient. A zero gradient gives ``eps = 0``; a
  gradient, ``rho`` or ``eta`` that is not finite, or a negative ``rho`` or
  ``eta`` (from a schedule, say), gives ``eps`` NaN everywhere, never a finite
  wrong value. Complex leaves count as their real and imaginary parts.

  Args:
    grads: the gradient at ``params``, a pytree with the structure of
      ``params``.
    params: the weights ``w``.
    rho: the radius of the ball, >= 0.
    eta: ASAM's offset in ``T_w = diag(|w| + eta)``, >= 0; ignored unless
      ``adaptive``.
    adaptive: whether to scale by ``T_w`` (ASAM) or not (SAM).
    p: the ball's norm: 2, ``float('inf')`` or any real number >= 1.
    eps: gradients whose dual norm ``||T g||_q`` is at most ``eps`` are
      divided by ``eps`` instead (the old guard against a zero gradient); the
      default 0 normalizes every nonzero gradient exactly. Ignored for
      ``p = inf`` and ``p = 1``.
    adaptive_mask: which leaves ``T_w`` scales when ``adaptive``: a pytree of
      bools or a callable of ``params``, as ``optax.masked`` takes. The default
      scales every leaf; :func:`asam_jax.weight_mask` gives the official code's
      convention. Leaves left out get ``T = 1``.
    perturb_mask: which leaves are perturbed at all, in the same forms. Leaves
      left out get ``eps = 0`` and do not enter the norm.

  Returns:
    ``eps``, a pytree with the structure of ``params`` and each leaf in its
    parameter's dtype.

  Example:
    >>> import jax.numpy as jnp, asam_jax
    >>> g = {"w": jnp.array([3.0, 4.0])}
    >>> asam_jax.perturbation(g, g, rho=0.5)["w"]
    Array([0.3, 0.4], dtype=float32)
    >>> w = {"w": jnp.array([1.0, 2.0])}
    >>> asam_jax.perturbation({"w": jnp.array([1.0, 0.0])}, w, rho=0.5, adaptive=True)["w"]
    Array([0.5, 0. ], dtype=float32)

  References:
    Foret et al., Sharpness-Aware Minimization for Efficiently Improving
    Generalization, ICLR 2021. Kwon et al., ASAM: Adaptive Sharpness-Aware
    Minimization for Scale-Invariant Learning of Deep Neural Networks,
    ICML 2021.
  """
  _validation.check_nonnegative("eps", eps)
  ball = ball_at(params, grads, rho, eta, adaptive, adaptive_mask, perturb_mask, p=p, floor=eps)
  directions = [real_gradient(jax.tree.leaves(grads)[i]) for i in ball.chosen]
  return ball.tree(ball.maximizer(directions)[0])


def random_perturbation(
  key: chex.PRNGKey,
  params: Any,
  *,
  rho: chex.Numeric,
  eta: chex.Numeric = 0.0,
  adaptive: bool = False,
  adaptive_mask: Mask | None = None,
  perturb_mask: Mask | None = None,
) -> Any:
  """A perturbation drawn uniformly on the sphere ``||T_w^-1 eps||_2 = rho``.

  ``eps = rho T_w z / ||z||_2`` with ``z ~ N(0, I)`` over the perturbed leaves,
  so that ``T_w^-1 eps`` is uniform on the rho-sphere (the isotropic Gaussian's
  direction is uniform).

  Args:
    key: a JAX PRNG key.
    params: the weights ``w``, a pytree of float arrays.
    rho: the radius, >= 0.
    eta: ASAM's offset in ``T_w``, >= 0; ignored unless ``adaptive``.
    adaptive: whether the sphere is the adaptive one (ASAM) or the plain one.
    adaptive_mask: which leaves ``T_w`` scales, as in
      :func:`asam_jax.perturbation`.
    perturb_mask: which leaves are perturbed; the others get ``eps = 0``.

  Returns:
    ``eps``, a pytree with the structure and dtypes of ``params``.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, asam_jax
    >>> e = asam_jax.random_perturbation(jax.random.key(0), {"w": jnp.ones(3)}, rho=0.5)
    >>> print(np.linalg.norm(e["w"]).round(4))
    0.5

  References:
    Wen, Ma and Li, How Does Sharpness-Aware Minimization Minimize Sharpness?,
    ICLR 2023 (average-direction sharpness).
  """
  ball = ball_at(params, params, rho, eta, adaptive, adaptive_mask, perturb_mask)
  return ball.tree(ball.maximizer(ball.random_directions(key), in_ball=True)[0])
