"""The adversarial perturbation of SAM and ASAM, a pure function of pytrees.

The first-order solution of ``max_{||T_w^-1 eps||_p <= rho} eps^T g`` is

* p = 2:        ``eps = rho T^2 g / ||T g||_2``
* p = inf:      ``eps = rho T sign(g)``
* 1 < p < inf:  ``eps = rho T sign(g) |T g|^(q-1) / ||T g||_q^(q-1)``, q = p/(p-1)
* p = 1:        all of ``rho`` on the coordinates where ``|T g|`` is largest,

with ``T = diag(|w| + eta)`` on the adaptive leaves and ``T = 1`` elsewhere
(Kwon et al., ICML 2021, eq. 4 and Foret et al., ICLR 2021, eq. 2).

What it costs: one reduction pass over ``g`` (ASAM: over ``g`` and ``w``) for
the dual norm, and one elementwise pass that XLA fuses into ``w + eps``.
"""

from __future__ import annotations

import math
from typing import Any

import chex
import jax
import jax.numpy as jnp

from asam_jax import _validation
from asam_jax._layout import Layout, shard_axes_of
from asam_jax._masks import Mask, resolve_masks
from asam_jax._norms import accumulation_dtype, guarded, pow2_inverse, safe


def _flatten(grads: Any, params: Any) -> tuple[list[tuple[Any, chex.Array]], Any, list[Any]]:
  """``params`` with their paths, its treedef and ``grads`` flattened alike, checked leaf by leaf."""
  paths_and_w, treedef = jax.tree_util.tree_flatten_with_path(params)
  # jaxlib ships no stub for PyTreeDef, whose != mypy then cannot type.
  if jax.tree.structure(grads) != jax.tree.structure(params):  # type: ignore[operator]
    raise ValueError(
      "grads and params must have the same tree structure.\n"
      f"  grads:  {jax.tree.structure(grads)}\n  params: {treedef}"
    )
  g_leaves = jax.tree.leaves(grads)
  for (path, w), g in zip(paths_and_w, g_leaves):
    if jnp.shape(g) != jnp.shape(w):
      raise ValueError(
        f"grads and params differ in shape at {jax.tree_util.keystr(path)}: the gradient "
        f"has shape {jnp.shape(g)} and the parameter {jnp.shape(w)}. Pass the gradient of "
        "the loss with respect to exactly these params."
      )
  return paths_and_w, treedef, g_leaves


def check_float_leaf(path: Any, w: Any) -> None:
  """Refuses a leaf that cannot be perturbed, saying to take it out of the params."""
  if not jnp.issubdtype(jnp.result_type(w), jnp.floating):
    raise TypeError(
      f"params leaf {jax.tree_util.keystr(path)} has dtype {jnp.result_type(w)}: it can be "
      "neither perturbed nor differentiated. Take it out of the params you differentiate "
      "and pass to update, e.g. with eqx.partition(model, eqx.is_inexact_array) in "
      "Equinox, an nnx filter such as nnx.Param in NNX, or as a separate argument of the "
      "loss; perturb_mask cannot help, since jax.grad refuses integer inputs."
    )


def _scale(w: chex.Array, eta: chex.Array | None, dtype: Any) -> chex.Array | None:
  """``T = |w| + eta`` in ``dtype``, or ``None`` where ``T`` is the identity."""
  return None if eta is None else jnp.abs(w).astype(dtype) + eta


def _t_or_one(w, eta, dtype):
  t = _scale(w, eta, dtype)
  return 1 if t is None else t


def _tg(g, w, eta, dtype, s=1):
  """``T (g s)``: scaled before ``T`` multiplies, so that ``T g`` cannot underflow first."""
  t = _scale(w, eta, dtype)
  g = g.astype(dtype) * s
  return g if t is None else t * g


def _barrier_tg(g, w, eta, dtype, tag=0, s=1):
  """``T (g s)`` for a reduction, through a barrier where ``T`` multiplies.

  XLA would merge this ``T g`` with the one of the eps pass (or of another
  reduction) and write the shared value out, since the fast reduction kernel
  takes no shared input: a full-size temporary and an extra pass. A barrier
  keeps them apart; the tag keeps XLA from merging two barriers. Unscaled
  leaves (SAM's) share nothing, and a barrier there made SAM's step 1.25 x
  optax's on the benchmark's wide MLP, so they go without.
  """
  if eta is None:
    return _tg(g, w, None, dtype, s)
  g, w, eta, s, _ = jax.lax.optimization_barrier((g, w, eta, s, jnp.int32(tag)))
  return _tg(g, w, eta, dtype, s)


def _dual_norm(leaves, q, layout, indices, dtype):
  """``(s, n)`` with ``||T g||_q = n / s``, ``s`` a power of two (1 unless rescaling was needed)."""
  power = (lambda x: jnp.square(x)) if q == 2 else (lambda x: jnp.abs(x) ** q)

  def norm(total):
    return jnp.sqrt(total) if q == 2 else total ** (1 / q)

  fast = layout.sum([jnp.sum(power(_barrier_tg(*leaf, dtype))) for leaf in leaves], indices)
  one = jnp.ones([], dtype)

  def slow(leaves):
    largest = layout.max(
      [jnp.max(jnp.abs(_barrier_tg(*leaf, dtype, tag=1)), initial=0) for leaf in leaves], indices
    )
    s = pow2_inverse(largest)
    total = layout.sum(
      [jnp.sum(power(_barrier_tg(*leaf, dtype, tag=2, s=s))) for leaf in leaves], indices
    )
    return s, norm(total)

  return guarded(safe(fast), (one, norm(fast)), slow, leaves)


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
  wrong value.

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
  eps: float = 0.0,
  adaptive_mask: Mask | None = None,
  perturb_mask: Mask | None = None,
  layout: Layout | None = None,
) -> tuple[Any, chex.Array]:
  """:func:`perturbation` and the radius it reached, ``||T^-1 eps||_p``.

  That radius is ``rho`` for any nonzero finite gradient, 0 for a zero one
  (less than ``rho`` below ``eps``) and NaN for a non-finite one, and it costs
  nothing: it comes from the dual norm that ``eps`` needs anyway. (``||eps||_2``
  would cost ASAM another pass over ``w`` and ``g``.)

  Args:
    grads, params, rho, eta, adaptive, p, eps, adaptive_mask, perturb_mask: as
      in :func:`perturbation`.
    layout: the devices the update runs on (its sharded leaves); by default
      read from the types of ``params``.

  Returns:
    ``(eps, ||T^-1 eps||_p)``.

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
  _validation.check_nonnegative("eps", eps)
  if layout is None:
    layout = Layout(shard_axes=shard_axes_of(params))
  paths_and_w, treedef, g_leaves = _flatten(grads, params)
  perturbed, scaled = resolve_masks(
    params, adaptive=adaptive, adaptive_mask=adaptive_mask, perturb_mask=perturb_mask
  )
  chosen = [
    (i, g, w, s)
    for i, ((_, w), g, on, s) in enumerate(
      zip(paths_and_w, g_leaves, jax.tree.leaves(perturbed), jax.tree.leaves(scaled))
    )
    if on
  ]
  for i, _, w, _ in chosen:
    check_float_leaf(paths_and_w[i][0], w)

  out = [jnp.zeros_like(w) for _, w in paths_and_w]
  if not chosen:
    return jax.tree.unflatten(treedef, out), jnp.zeros([], jnp.float32)

  dtype = jnp.result_type(*[accumulation_dtype(w) for _, _, w, _ in chosen])
  rho = _validation.guard(rho, dtype)
  eta = _validation.guard(eta, dtype)
  indices = [i for i, _, _, _ in chosen]
  leaves = [(g, w, eta if s else None) for _, g, w, s in chosen]

  if p in (1, math.inf):
    largest = layout.max(
      [jnp.max(jnp.abs(_barrier_tg(*leaf, dtype)), initial=0) for leaf in leaves], indices
    )
    # Non-finite gradients make every eps NaN, so that apply_if_finite skips the
    # step. (A where, not a product with NaN: XLA may turn that into a select.)
    finite = jnp.isfinite(largest)
    reached = jnp.where(finite, jnp.where(largest > 0, rho, 0), jnp.nan)
    if p == math.inf:
      es = [rho * _t_or_one(w, e, dtype) * jnp.sign(g).astype(dtype) for g, w, e in leaves]
    else:
      # The maximizer puts all of rho on the largest |T g|, split evenly over
      # ties so that ||T^-1 eps||_1 = rho still holds.
      tops = [(jnp.abs(_tg(*leaf, dtype)) == largest) & (largest > 0) for leaf in leaves]
      count = jnp.maximum(layout.sum([jnp.sum(t, dtype=dtype) for t in tops], indices), 1)
      es = [
        jnp.where(t, (rho / count) * _t_or_one(w, e, dtype) * jnp.sign(g).astype(dtype), 0)
        for (g, w, e), t in zip(leaves, tops)
      ]
    es = [jnp.where(finite, e, jnp.nan) for e in es]
  else:
    q = p / (p - 1)
    s, n = _dual_norm(leaves, q, layout, indices, dtype)
    denominator = jnp.maximum(n, eps * s)
    divisor = jnp.where(denominator > 0, denominator, 1)  # a zero gradient stays zero
    rho = jnp.where(jnp.isfinite(n), rho, jnp.nan)  # a non-finite one makes eps NaN
    if q == 2:
      reached = rho * n / divisor
      # T (T g s / n) rho: each factor stays in range whatever g's magnitude, and
      # SAM's eps is g / ||g|| * rho, as optax's normalize() then sgd(rho).
      es = [_tg(g, w, e, dtype, s) / divisor * rho * _t_or_one(w, e, dtype) for g, w, e in leaves]
    else:
      reached = rho * (n / divisor) ** (q - 1)
      es = []
      for g, w, e in leaves:
        tg = _tg(g, w, e, dtype, s)
        direction = jnp.sign(tg) * (jnp.abs(tg) / divisor) ** (q - 1)
        es.append(rho * direction * _t_or_one(w, e, dtype))

  for (i, _, w, _), e in zip(chosen, es):
    out[i] = e.astype(jnp.result_type(w))
  return jax.tree.unflatten(treedef, out), reached


def ball_scale(
  params: Any,
  *,
  eta: chex.Numeric,
  adaptive: bool,
  adaptive_mask: Mask | None,
  perturb_mask: Mask | None,
) -> Any:
  """``T_w`` leaf by leaf: ``|w| + eta``, ``1``, or ``0`` on leaves never perturbed."""
  on, scaled = resolve_masks(
    params, adaptive=adaptive, adaptive_mask=adaptive_mask, perturb_mask=perturb_mask
  )

  def scale(w, on, s):
    if not on:
      return jnp.zeros_like(w)
    return jnp.abs(w) + jnp.asarray(eta, w.dtype) if s else jnp.ones_like(w)

  return jax.tree.map(scale, params, on, scaled)


def _ball_coordinates(eps: Any, t: Any) -> list[chex.Array]:
  """``T^-1 eps`` leaf by leaf, 0 where ``T = 0`` (leaves never perturbed)."""
  return [
    jnp.where(s > 0, e / jnp.where(s > 0, s, 1), 0).astype(accumulation_dtype(e))
    for e, s in zip(jax.tree.leaves(eps), jax.tree.leaves(t))
  ]


def ball_norm(eps: Any, t: Any, p: float, layout: Layout) -> chex.Array:
  """``||T^-1 eps||_p`` over every leaf (and shard), with ``t`` from :func:`ball_scale`."""
  u = _ball_coordinates(eps, t)
  indices = list(range(len(u)))
  if p == math.inf:
    return layout.max([jnp.max(jnp.abs(x), initial=0) for x in u], indices)
  return layout.sum([jnp.sum(jnp.abs(x) ** p) for x in u], indices) ** (1 / p)


def project(
  eps: Any, t: Any, rho: chex.Numeric, p: float, layout: Layout
) -> tuple[Any, chex.Array]:
  """``eps`` back onto ``||T^-1 eps||_p <= rho``, and its radius after: exact for p = 2 and inf.

  For p = 2 the projection is radial, for p = inf a clip of each coordinate
  to ``[-rho T, rho T]``.
  """
  if p == math.inf:
    eps = jax.tree.map(lambda e, s: jnp.clip(e, -rho * s, rho * s).astype(e.dtype), eps, t)
    return eps, ball_norm(eps, t, p, layout)
  norm = ball_norm(eps, t, p, layout)
  shrink = jnp.minimum(1.0, rho / jnp.maximum(norm, jnp.finfo(norm.dtype).tiny))
  return jax.tree.map(lambda e: (e * shrink).astype(e.dtype), eps), norm * shrink
