"""The maximizer of ``eps^T g`` over the ball ``||T^-1 eps||_p <= rho``, leaf by leaf.

The first-order solution of ``max_{||T^-1 eps||_p <= rho} eps^T g`` is, with
``u = T g`` the gradient in the ball's coordinates,

* p = 2:        ``eps = rho T u / ||u||_2``
* p = inf:      ``eps = rho T sign(g)``
* 1 < p < inf:  ``eps = rho T sign(u) |u|^(q-1) / ||u||_q^(q-1)``, q = p/(p-1)
* p = 1:        all of ``rho`` on the coordinates where ``|u|`` is largest,

with ``T = diag(|w| + eta)`` on ASAM's leaves and ``T = 1`` elsewhere (Kwon et
al., ICML 2021, eq. 4 and Foret et al., ICLR 2021, eq. 2); other geometries
(Fisher SAM's) only change ``T``, and other directions (Friendly SAM's, random
SAM's) only change the vector ``g`` stands for.

What it costs: one reduction pass over ``g`` (ASAM: over ``g`` and ``w``) for
the dual norm, and one element-wise pass that XLA fuses into ``w + eps``.
Each leaf's ``T`` is a function of the array it reads (:class:`Leaf`), so that
each pass computes ``T g`` where it reads it instead of writing it out once
for both.

A complex leaf is its real and imaginary parts: two real coordinates each, on
which ``T``, the norms and the maximizer act, and along which JAX's complex
gradient ``g`` points as ``conj(g)`` (``x - lr conj(g)`` is gradient descent).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp

from asam_jax._layout import Layout
from asam_jax._norms import largest, power_sum


class Leaf(NamedTuple):
  """One perturbed leaf: the vector the ascent follows, and the ball's ``T`` on it.

  Attributes:
    direction: ``d``, the vector followed on this leaf (the gradient, for
      SAM), a real array.
    scale: ``operand -> T`` in the accumulation dtype, or ``None`` where ``T``
      is the identity. A function rather than an array, so that each pass
      computes ``T`` where it reads it instead of reading it from memory.
    operand: what ``scale`` reads (``w`` for ASAM, ``g`` for Fisher SAM).
    in_ball: ``d`` is already in the ball's coordinates (``u = d``, not
      ``T d``): a direction drawn on the sphere, as random SAM's.
  """

  direction: chex.Array
  scale: Callable[[chex.Array], chex.Array] | None = None
  operand: chex.Array | None = None
  in_ball: bool = False

  def t(self) -> Any:
    """``T`` on this leaf, or 1."""
    return 1 if self.scale is None else self.scale(self.operand)

  def u(self, dtype: Any, s: Any = None) -> chex.Array:
    """``T (d s)``: ``d`` in the ball's coordinates, scaled before ``T`` multiplies."""
    d = self.direction.astype(dtype)
    d = d if s is None else d * s
    return d if self.in_ball or self.scale is None else self.t() * d


def _ball_vector(leaves, dtype, reduce, layout, indices, post):
  """``reduce`` (``power_sum`` or ``largest``) over the leaves' ``u = T d``."""
  terms = [(x.direction, None if x.in_ball else x.scale, x.operand) for x in leaves]
  return reduce(terms, layout, indices, dtype, post)


def _l2(leaves, rho, floor, layout, indices, dtype):
  def post(total, s):
    n = jnp.sqrt(total)
    denominator = jnp.maximum(n, floor * s)
    divisor = jnp.where(denominator > 0, denominator, 1)  # a zero gradient stays zero
    r = jnp.where(jnp.isfinite(n), rho, jnp.nan)  # a non-finite one makes eps NaN
    return s, divisor, r, r * n / divisor

  s, divisor, rho, reached = _ball_vector(
    leaves, dtype, functools.partial(power_sum, power=2), layout, indices, post
  )
  # T (u s / n) rho: each factor stays in range whatever g's magnitude, and
  # SAM's eps is g / ||g|| * rho, as optax's normalize() then sgd(rho).
  return [x.u(dtype, s) / divisor * rho * x.t() for x in leaves], reached


def _lq(leaves, rho, floor, layout, indices, dtype, q):
  def post(total, s):
    n = total ** (1 / q)
    denominator = jnp.maximum(n, floor * s)
    divisor = jnp.where(denominator > 0, denominator, 1)
    r = jnp.where(jnp.isfinite(n), rho, jnp.nan)
    return s, divisor, r, r * (n / divisor) ** (q - 1)

  s, divisor, rho, reached = _ball_vector(
    leaves, dtype, functools.partial(power_sum, power=q), layout, indices, post
  )
  eps = []
  for x in leaves:
    u = x.u(dtype, s)
    eps.append(rho * jnp.sign(u) * (jnp.abs(u) / divisor) ** (q - 1) * x.t())
  return eps, reached


def _top(leaves, rho, layout, indices, dtype):
  """``max |u|``, and ``rho`` (NaN for a non-finite ``u``) with the radius it reaches."""

  def post(top):
    # Non-finite gradients make every eps NaN, so that apply_if_finite skips the
    # step. (A where, not a product with NaN: XLA may turn that into a select.)
    r = jnp.where(jnp.isfinite(top), rho, jnp.nan)
    return top, r, jnp.where(top > 0, r, 0)

  return _ball_vector(leaves, dtype, largest, layout, indices, post)


def _linf(leaves, rho, layout, indices, dtype):
  _, rho, reached = _top(leaves, rho, layout, indices, dtype)
  return [rho * x.t() * jnp.sign(x.direction).astype(dtype) for x in leaves], reached


def _l1(leaves, rho, layout, indices, dtype):
  top, rho, reached = _top(leaves, rho, layout, indices, dtype)
  # All of rho on the largest |u|, split evenly over ties so that ||T^-1 eps||_1 = rho.
  tops = [(jnp.abs(x.u(dtype)) == top) & (top > 0) for x in leaves]
  count = jnp.maximum(layout.sum([jnp.sum(t, dtype=dtype) for t in tops], indices), 1)
  eps = [
    jnp.where(
      jnp.isnan(rho), jnp.nan, jnp.where(t, (rho / count) * x.t() * jnp.sign(x.direction), 0)
    )
    for x, t in zip(leaves, tops)
  ]
  return eps, reached


def maximizer(
  leaves: Sequence[Leaf],
  *,
  rho: Any,
  p: float,
  floor: float,
  layout: Layout,
  indices: Sequence[int],
  dtype: Any,
) -> tuple[list[chex.Array], chex.Array]:
  """The maximizer of ``eps^T d`` over ``||T^-1 eps||_p <= rho``, leaf by leaf, and its radius.

  Args:
    leaves: the perturbed leaves, at least one.
    rho: the radius, already guarded (NaN where invalid).
    p: the ball's norm.
    floor: norms below it are divided by it instead (``eps=`` of the constructors).
    layout: sums over the shards of sharded leaves.
    indices: each leaf's index among the flattened params.
    dtype: the accumulation dtype.

  Returns:
    ``eps`` per leaf, in ``dtype``, and ``||T^-1 eps||_p``: ``rho`` for a
    nonzero finite ``d``, 0 for a zero one, NaN for a non-finite one.
  """
  if p == 2:
    return _l2(leaves, rho, floor, layout, indices, dtype)
  if p == math.inf:
    return _linf(leaves, rho, layout, indices, dtype)
  if p == 1:
    return _l1(leaves, rho, layout, indices, dtype)
  return _lq(leaves, rho, floor, layout, indices, dtype, p / (p - 1))


# --- leaves of a pytree: checks, complex parts ---


def as_real(x: chex.Array) -> chex.Array:
  """A complex array as its real and imaginary parts (a last axis of 2); a real one as it is."""
  return jnp.stack([x.real, x.imag], -1) if jnp.iscomplexobj(x) else x


def real_gradient(g: chex.Array) -> chex.Array:
  """JAX's gradient of a real loss as the gradient over the real coordinates of :func:`as_real`."""
  return jnp.stack([g.real, -g.imag], -1) if jnp.iscomplexobj(g) else g


def from_real(x: chex.Array, like: Any) -> chex.Array:
  """The inverse of :func:`as_real`, in ``like``'s dtype."""
  dtype = jnp.result_type(like)
  if jnp.issubdtype(dtype, jnp.complexfloating):
    return jax.lax.complex(x[..., 0], x[..., 1]).astype(dtype)
  return x.astype(dtype)


def flatten(grads: Any, params: Any) -> tuple[list[tuple[Any, chex.Array]], Any, list[Any]]:
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


def check_perturbable(path: Any, w: Any) -> None:
  """Refuses a perturbed leaf that is not a float or complex array, saying how to leave it out."""
  if not jnp.issubdtype(jnp.result_type(w), jnp.inexact):
    raise TypeError(
      f"params leaf {jax.tree_util.keystr(path)} has dtype {jnp.result_type(w)}: it cannot be "
      "perturbed. Leave it out with perturb_mask (its gradient may then be the float0 of "
      "jax.grad(..., allow_int=True)), or take it out of the params you differentiate: "
      "eqx.partition(model, eqx.is_inexact_array) in Equinox, an nnx filter such as "
      "nnx.Param in NNX, or a separate argument of the loss."
    )
