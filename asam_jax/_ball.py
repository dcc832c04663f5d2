"""The ball of one update: ``||T^-1 eps||_p <= rho`` around the unperturbed weights.

A :class:`Ball` is built once per update at ``w`` (:func:`make_ball`) and
holds what every pass of the ascent reads: which leaves are perturbed, the
geometry's ``T`` on each (as a thunk, so that each pass computes it where it
reads it), the radius, ``p`` and the devices. Three geometries cover the family:

* ``"euclidean"``: ``T = 1`` (SAM and most variants);
* ``"adaptive"``: ``T = |w| + eta`` (ASAM, Kwon et al., ICML 2021);
* ``"fisher"``: ``T = (1 + eta g^2)^-1/2`` with ``g`` the clean gradient, so
  that ``T^2`` is the inverse diagonal empirical Fisher (Fisher SAM, Kim et
  al., ICML 2022);
* ``"precision"``: ``T = s^-1/2`` with ``s`` a posterior precision (Bayesian
  SAM, Möllenhoff and Khan, ICLR 2023), whose step is not normalized:
  :meth:`Ball.scaled`.

Perturbations are handed around per perturbed leaf, in real coordinates
(:mod:`asam_jax._maximizer`); :meth:`Ball.tree` and :meth:`Ball.shift` turn
them back into params pytrees.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp

from asam_jax import _validation
from asam_jax._layout import Layout
from asam_jax._masks import Mask, resolve_masks
from asam_jax._maximizer import (
  Leaf,
  as_real,
  check_perturbable,
  flatten,
  from_real,
  maximizer,
  real_gradient,
)
from asam_jax._norms import accumulation_dtype, chunk_leaves, largest, power_sum

GEOMETRIES = ("euclidean", "adaptive", "fisher", "precision")


class Ball(NamedTuple):
  """The ball of one update, built at the unperturbed weights ``w``.

  Attributes:
    treedef: the params' tree structure.
    params: the flattened params ``w``.
    chosen: the indices of the perturbed leaves.
    scales: for each chosen leaf, ``(operand -> T, operand)``, or ``None``
      where ``T`` is the identity; the operand is a tuple of the array ``T``
      reads and its scalars.
    rho: the radius this update, guarded (NaN where invalid).
    p: the ball's norm.
    floor: norms below it are divided by it instead.
    layout: the devices.
    dtype: the accumulation dtype.
  """

  treedef: Any
  params: list[Any]
  chosen: list[int]
  scales: list[tuple[Callable[[Any], chex.Array], tuple[Any, ...]] | None]
  rho: Any
  p: float
  floor: float
  layout: Layout
  dtype: Any

  def maximizer(
    self, directions: Sequence[chex.Array], *, in_ball: bool = False, rho: Any = None
  ) -> tuple[list[chex.Array], chex.Array]:
    """``eps`` (per chosen leaf, real coordinates) along ``directions``, and its radius.

    Args:
      directions: the vector to follow on each chosen leaf, in real coordinates.
      in_ball: the directions are already in the ball's coordinates (``u = d``).
      rho: the radius of this step, default the ball's.
    """
    if not self.chosen:
      return [], jnp.zeros([], self.dtype)
    return maximizer(
      [self._leaf(d, k, in_ball) for k, d in enumerate(directions)],
      rho=self.rho if rho is None else rho,
      p=self.p,
      floor=self.floor,
      layout=self.layout,
      indices=self.chosen,
      dtype=self.dtype,
    )

  def scaled(self, directions: Sequence[chex.Array]) -> list[chex.Array]:
    """``rho T^2 d`` per chosen leaf: a step in the ball's metric, not normalized (bSAM's)."""
    return [self.rho * self.t(k) * self._leaf(d, k).u(self.dtype) for k, d in enumerate(directions)]

  def _leaf(self, direction: chex.Array, k: int, in_ball: bool = False) -> Leaf:
    scale, operand = self.scales[k] or (None, None)
    return Leaf(direction, scale, operand, in_ball)

  def t(self, k: int) -> Any:
    """``T`` on the ``k``-th chosen leaf, or 1."""
    return self._leaf(jnp.zeros([]), k).t()

  def radius(self, eps: Sequence[chex.Array]) -> chex.Array:
    """``||T^-1 eps||_p`` of a perturbation given per chosen leaf in real coordinates."""

    def inverse(scale):
      # T^-1, 0 where T = 0 (ASAM's eta = 0 at a zero weight, where eps is 0 too).
      def t_inverse(operand):
        t = scale(operand)
        return jnp.where(t > 0, 1 / jnp.where(t > 0, t, 1), 0)

      return t_inverse

    inverses = {id(s[0]): inverse(s[0]) for s in self.scales if s is not None}
    terms = [
      (e, None, None) if s is None else (e, inverses[id(s[0])], s[1])
      for e, s in zip(eps, self.scales)
    ]
    if self.p == math.inf:
      return largest(terms, self.layout, self.chosen, self.dtype, lambda top: top)
    return power_sum(
      terms,
      self.layout,
      self.chosen,
      self.dtype,
      lambda total, s: total ** (1 / self.p) / s,
      power=self.p,
    )

  def project(self, eps: list[chex.Array]) -> tuple[list[chex.Array], chex.Array]:
    """``eps`` back onto the ball (exact for p = 2, radially, and p = inf, by clipping)."""
    if self.p == math.inf:
      bound = [self.rho * self.t(k) for k in range(len(eps))]
      eps = [jnp.clip(e, -b, b) for e, b in zip(eps, bound)]
      return eps, self.radius(eps)
    norm = self.radius(eps)
    shrink = jnp.minimum(1.0, self.rho / jnp.maximum(norm, jnp.finfo(norm.dtype).tiny))
    return [e * shrink for e in eps], norm * shrink

  def tree(self, eps: Sequence[chex.Array]) -> Any:
    """A perturbation given per chosen leaf as a params pytree, zero elsewhere, in the params' dtypes."""
    out = [jnp.zeros_like(w) for w in self.params]
    for i, e in zip(self.chosen, eps):
      out[i] = from_real(e, self.params[i])
    return jax.tree.unflatten(self.treedef, out)

  def random_directions(self, key: chex.PRNGKey) -> list[chex.Array]:
    """Normal numbers for each chosen leaf (real coordinates): a direction uniform on the sphere.

    Drawn by :func:`normals` from ``key``: under explicit sharding each
    device its shard of a sharded leaf's numbers; inside ``shard_map`` each
    shard of a sharded leaf its own.
    """
    xs = [as_real(self.params[i]) for i in self.chosen]
    shardings = [
      _explicit_sharding(self.params[i]) if jnp.shape(x) == jnp.shape(self.params[i]) else None
      for i, x in zip(self.chosen, xs)
    ]
    return normals(key, xs, self.dtype, self.layout, self.chosen, shardings)

  def shift(self, eps: Sequence[chex.Array]) -> Any:
    """``w + eps`` as a params pytree, each leaf rounded once to its dtype."""
    out = list(self.params)
    for i, e in zip(self.chosen, eps):
      out[i] = from_real(as_real(self.params[i]).astype(self.dtype) + e, self.params[i])
    return jax.tree.unflatten(self.treedef, out)

  def reached(self, perturbed: Any) -> chex.Array:
    """``||T^-1 (round(w + eps) - w)||_p``: the radius that survived rounding to the params' dtype."""
    leaves = jax.tree.leaves(perturbed)
    return self.radius(
      [
        as_real(leaves[i]).astype(self.dtype) - as_real(self.params[i]).astype(self.dtype)
        for i in self.chosen
      ]
    )


def normals(
  key: chex.PRNGKey,
  xs: Sequence[chex.Array],
  dtype: Any,
  layout: Layout | None = None,
  leaves: Sequence[int] | None = None,
  shardings: Sequence[Any] | None = None,
) -> list[chex.Array]:
  """Normal numbers shaped as each of ``xs``: one draw per chunk of the norms' slow path.

  Small leaves share a draw of their chunk's total size, cut per leaf: one
  random-number kernel where a draw per leaf made one per leaf (on a model of
  a thousand leaves, five to nine times optax's SAM compile). A large leaf
  draws alone, so that no chunk's draw is written out beside it.

  Args:
    key: split over the chunks.
    xs: the arrays whose shapes the numbers take.
    dtype: the numbers' dtype.
    layout: a chunk of leaves sharded inside ``shard_map`` folds in the
      device's index along their axes, so that each shard draws its own
      (default: none).
    leaves: the indices of ``xs`` among the params (for ``layout``).
    shardings: each leaf's explicit sharding, or ``None``: its numbers are
      the unsharded ones, resharded (a leaf drawn alone: each device draws
      its shard).

  Returns:
    A list like ``xs``.
  """
  leaves = range(len(xs)) if leaves is None else leaves
  shardings = shardings or [None] * len(xs)
  # The chunks do not depend on explicit shardings, so that a sharded jit draws the numbers
  # one device does.
  chunks = chunk_leaves(layout or Layout(), leaves, xs, sharded_alone=False)
  out: list[Any] = [None] * len(xs)
  for chunk_key, (axes, positions) in zip(jax.random.split(key, len(chunks)), chunks):
    if axes:
      chunk_key = jax.random.fold_in(chunk_key, jax.lax.axis_index(axes))
    if len(positions) == 1:
      (k,) = positions
      shape = jnp.shape(xs[k])
      out[k] = jax.random.normal(chunk_key, shape, dtype, out_sharding=shardings[k])
      continue
    sizes = [math.prod(jnp.shape(xs[k])) for k in positions]
    flat = jax.random.normal(chunk_key, (sum(sizes),), dtype)
    start = 0
    for k, size in zip(positions, sizes):
      x = flat[start : start + size].reshape(jnp.shape(xs[k]))
      out[k] = x if shardings[k] is None else jax.sharding.reshard(x, shardings[k])
      start += size
  return out


def _explicit_sharding(x: chex.Array) -> Any:
  """``x``'s sharding where jax's explicit sharding mode gives it one, else ``None``."""
  sharding = jax.typeof(x).sharding
  mesh = getattr(sharding, "mesh", None)
  explicit = mesh is not None and any(
    t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ())
  )
  return sharding if explicit else None


def is_low_precision(w: Any) -> bool:
  """Whether a leaf is stored below float32, where ``w + eps`` loses bits of ``eps``."""
  return jnp.finfo(jnp.result_type(w)).bits < 32


def make_ball(
  params: Any,
  grads: Any,
  *,
  rho: Any,
  eta: Any = 0.0,
  geometry: str = "euclidean",
  p: float = 2,
  floor: float = 0.0,
  adaptive_mask: Mask | None = None,
  perturb_mask: Mask | None = None,
  layout: Layout,
  precision: Any = None,
) -> Ball:
  """The ball at ``params``; Fisher SAM's ``T`` comes from ``grads``, the clean gradient.

  Args:
    params: the weights ``w``.
    grads: the clean gradient, checked against ``params`` leaf by leaf.
    rho: the radius this update (checked, or guarded to NaN where invalid).
    eta: the geometry's coefficient this update.
    geometry: one of :data:`GEOMETRIES`.
    precision: for the ``"precision"`` geometry, the posterior precision ``s``
      (a pytree like ``params``), with ``T = s^-1/2``.
    p: the ball's norm.
    floor: norms below it are divided by it instead.
    adaptive_mask: which leaves the geometry scales (``None``: every perturbed one).
    perturb_mask: which leaves are perturbed.
    layout: the devices.

  Returns:
    The :class:`Ball`.
  """
  paths_and_w, treedef, g_leaves = flatten(grads, params)
  perturbed, scaled = resolve_masks(
    params,
    adaptive=geometry != "euclidean",
    adaptive_mask=adaptive_mask,
    perturb_mask=perturb_mask,
  )
  chosen = [i for i, on in enumerate(jax.tree.leaves(perturbed)) if on]
  for i in chosen:
    check_perturbable(*paths_and_w[i])
  ws = [w for _, w in paths_and_w]
  dtype = jnp.result_type(*[accumulation_dtype(ws[i]) for i in chosen] or [jnp.float32])
  eta = _validation.guard(eta, dtype)
  flags = jax.tree.leaves(scaled)

  # One function per geometry, shared by its leaves: the slow path of the norms
  # applies it once to their concatenation.
  # Each operand carries the scalars its T reads (see asam_jax._norms.Term).
  operands: list[tuple[Any, ...]]
  if geometry == "adaptive":
    t = lambda op: jnp.abs(op[0]).astype(dtype) + op[1]
    operands = [(as_real(w), eta) for w in ws]
  elif geometry == "fisher":
    # (1 + a^2)^-1/2 with a = sqrt(eta) |g|, as (1/b) ((1/b)^2 + (a/b)^2)^-1/2 with
    # b = max(a, 1), which neither overflows nor underflows. Its 1 is an operand, as
    # eta is: XLA:CPU's reductions take a scalar operand but not a broadcast literal,
    # and jnp.hypot's selects not at all, either of which would write T out.
    def t(op):
      g, eta, one = op
      a = jnp.sqrt(eta) * jnp.abs(g.astype(dtype))
      inverse = one / jnp.maximum(a, one)
      return inverse * jax.lax.rsqrt(jnp.square(inverse) + jnp.square(a * inverse))

    operands = [(real_gradient(g), eta, jnp.ones([], dtype)) for g in g_leaves]
  else:
    t = lambda op: jax.lax.rsqrt(op[0].astype(dtype))
    operands = [(s, None) for s in jax.tree.leaves(precision)]

  def scale(i):
    return (t, operands[i]) if flags[i] else None

  return Ball(
    treedef,
    ws,
    chosen,
    [scale(i) for i in chosen],
    _validation.guard(rho, dtype),
    p,
    floor,
    layout,
    dtype,
  )
