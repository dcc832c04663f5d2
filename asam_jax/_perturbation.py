"""The adversarial perturbation of SAM and ASAM, a pure function of pytrees.

The first-order solution of ``max_{||T_w^-1 eps||_p <= rho} eps^T g`` is

* p = 2:        ``eps = rho T^2 g / ||T g||_2``
* p = inf:      ``eps = rho T sign(g)``
* 1 < p < inf:  ``eps = rho T sign(g) |T g|^(q-1) / ||T g||_q^(q-1)``, q = p/(p-1)
* p = 1:        all of ``rho`` on the coordinates where ``|T g|`` is largest,

with ``T = diag(|w| + eta)`` on the adaptive leaves and ``T = 1`` elsewhere
(Kwon et al., ICML 2021, eq. 4 and Foret et al., ICLR 2021, eq. 2).
"""

from __future__ import annotations

import math
from typing import Any

import chex
import jax
import jax.numpy as jnp

from asam_jax import _validation
from asam_jax._masks import Mask, resolve_masks


def accumulation_dtype(x: chex.Array) -> jnp.dtype:
  """The dtype norms are summed in: at least float32, float64 under x64."""
  return jnp.promote_types(x.dtype, jnp.float32)


def global_norm(tree: Any) -> chex.Array:
  """The l2 norm over every leaf of ``tree``, accumulated in float32 or wider."""
  squares = [jnp.sum(jnp.square(x.astype(accumulation_dtype(x)))) for x in jax.tree.leaves(tree)]
  return jnp.sqrt(sum(squares, jnp.zeros([], jnp.float32)))


def _dual_norm(tg: list[chex.Array], q: float) -> chex.Array:
  """``||T g||_q`` over the leaves in ``tg``, safe from under- and overflow."""
  if q == 2:
    return global_norm(tg)
  largest = jnp.max(jnp.stack([jnp.max(jnp.abs(x), initial=0) for x in tg]))
  if q == math.inf:
    return largest
  # Scaling by the largest entry keeps |Tg|^q finite for any q.
  safe = jnp.where(largest > 0, largest, 1)
  total = sum(jnp.sum((jnp.abs(x) / safe) ** q) for x in tg)
  return largest * total ** (1 / q)


def perturbation(
  grads: Any,
  params: Any,
  *,
  rho: chex.Numeric,
  eta: chex.Numeric = 0.0,
  adaptive: bool = False,
  p: float = 2,
  eps: float = 1e-12,
  adaptive_mask: Mask | None = None,
  perturb_mask: Mask | None = None,
) -> Any:
  """The (adaptive) sharpness-aware perturbation ``eps`` for gradient ``grads``.

  ``eps`` maximizes the first-order loss increase ``eps^T g`` over the ball
  ``||T_w^-1 eps||_p <= rho``, where ``T_w = diag(|w| + eta)`` on adaptive
  leaves and the identity elsewhere. With ``adaptive=False`` this is SAM's
  perturbation; with ``adaptive=True`` it is ASAM's. The norm is global over
  every perturbed leaf, and it is summed in float32 (or wider) whatever the
  leaves' dtype. Where ``||T g||_q < eps`` the division uses ``eps`` instead, so
  a zero gradient gives ``eps = 0``, never NaN.

  Args:
    grads: the gradient at ``params``, a pytree with the structure of
      ``params``.
    params: the weights ``w``.
    rho: the radius of the ball, >= 0.
    eta: ASAM's offset in ``T_w = diag(|w| + eta)``, >= 0; ignored unless
      ``adaptive``.
    adaptive: whether to scale by ``T_w`` (ASAM) or not (SAM).
    p: the ball's norm: 2, ``float('inf')`` or any real number >= 1.
    eps: the smallest norm divided by; guards a zero gradient.
    adaptive_mask: which leaves ``T_w`` scales when ``adaptive``: a pytree of
      bools or a callable of ``params``, as ``optax.masked`` takes. The default
      scales every leaf; :func:`asam_jax.kernel_mask` gives the official code's
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
  return perturbation_with_norm(
    grads,
    params,
    rho=rho,
    eta=eta,
    adaptive=adaptive,
    p=p,
    eps=eps,
    adaptive_mask=adaptive_mask,
    perturb_mask=perturb_mask,
  )[0]


def perturbation_with_norm(
  grads: Any,
  params: Any,
  *,
  rho: chex.Numeric,
  eta: chex.Numeric = 0.0,
  adaptive: bool = False,
  p: float = 2,
  eps: float = 1e-12,
  adaptive_mask: Mask | None = None,
  perturb_mask: Mask | None = None,
) -> tuple[Any, chex.Array]:
  """:func:`perturbation` and its norm ``||eps||_2``, computed in float32 or wider.

  For p = 2 the unscaled leaves' part of the norm is ``rho ||g|| / ||T g||``
  from the sums of squares the dual norm has already taken, so SAM's norm
  needs no pass over ``eps``. The scaled leaves' part is summed from ``eps``
  before its cast to the leaves' dtype.

  Args:
    grads, params, rho, eta, adaptive, p, eps, adaptive_mask, perturb_mask: as
      in :func:`perturbation`.

  Returns:
    ``(eps, ||eps||_2)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from asam_jax._perturbation import perturbation_with_norm
    >>> g, w = {"w": jnp.array([3.0, 4.0])}, {"w": jnp.array([1.0, 1.0])}
    >>> perturbation_with_norm(g, w, rho=0.5)
    ({'w': Array([0.3, 0.4], dtype=float32)}, Array(0.5, dtype=float32))

  References:
    Foret et al., ICLR 2021 and Kwon et al., ICML 2021, as for
    :func:`perturbation`.
  """
  p = _validation.check_p(p)
  _validation.check_nonnegative("rho", rho)
  _validation.check_nonnegative("eta", eta)
  _validation.check_positive("eps", eps)
  if jax.tree.structure(grads) != jax.tree.structure(params):
    raise ValueError(
      "grads and params must have the same tree structure.\n"
      f"  grads:  {jax.tree.structure(grads)}\n  params: {jax.tree.structure(params)}"
    )
  perturbed, scaled = resolve_masks(
    params, adaptive=adaptive, adaptive_mask=adaptive_mask, perturb_mask=perturb_mask
  )

  paths_and_w, treedef = jax.tree_util.tree_flatten_with_path(params)
  g_leaves = treedef.flatten_up_to(grads)
  chosen = [
    (i, g, w, s)
    for i, ((path, w), g, on, s) in enumerate(
      zip(paths_and_w, g_leaves, treedef.flatten_up_to(perturbed), treedef.flatten_up_to(scaled))
    )
    if on
  ]
  for i, _, w, _ in chosen:
    if not jnp.issubdtype(jnp.result_type(w), jnp.floating):
      raise TypeError(
        f"params leaf {jax.tree_util.keystr(paths_and_w[i][0])} has dtype "
        f"{jnp.result_type(w)} and cannot be perturbed; leave it out with perturb_mask."
      )

  out = [jnp.zeros_like(w) for _, w in paths_and_w]
  if not chosen:
    return treedef.unflatten(out), jnp.zeros([], jnp.float32)

  # T and T g in float32 or wider; T is None where it is the identity.
  ts, tgs = [], []
  for _, g, w, s in chosen:
    g = jnp.asarray(g).astype(accumulation_dtype(jnp.asarray(w)))
    t = jnp.abs(w).astype(g.dtype) + eta if s else None
    ts.append(t)
    tgs.append(g if t is None else t * g)

  if p == math.inf:
    directions = [jnp.sign(tg) for tg in tgs]
  else:
    q = math.inf if p == 1 else p / (p - 1)
    norm = jnp.maximum(_dual_norm(tgs, q), eps)
    if q == 2:
      directions = [tg / norm for tg in tgs]
    elif q == math.inf:
      # p = 1: the maximizer puts all of rho on the largest |T g|, split evenly
      # over ties so that ||T^-1 eps||_1 = rho still holds.
      top = [(jnp.abs(tg) == norm) & (tg != 0) for tg in tgs]
      count = jnp.maximum(sum(jnp.sum(m) for m in top), 1)
      directions = [jnp.sign(tg) * m / count for tg, m in zip(tgs, top)]
    else:
      directions = [jnp.sign(tg) * (jnp.abs(tg) / norm) ** (q - 1) for tg in tgs]

  es = [rho * d if t is None else rho * t * d for t, d in zip(ts, directions)]
  if p == 2:
    # On unscaled leaves eps = rho g / ||T g||, so their part of ||eps|| is the
    # dual norm's own sum of squares (XLA merges the two): no pass over eps.
    unscaled = global_norm([tg for t, tg in zip(ts, tgs) if t is None]) * rho / norm
    eps_norm = jnp.hypot(unscaled, global_norm([e for t, e in zip(ts, es) if t is not None]))
  else:
    eps_norm = global_norm(es)
  for (i, _, w, _), e in zip(chosen, es):
    out[i] = e.astype(jnp.result_type(w))
  return treedef.unflatten(out), eps_norm
