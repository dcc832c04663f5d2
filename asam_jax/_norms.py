"""Sums over pytrees that neither overflow nor underflow, at the cost of plain ones.

Every normalization in the library divides by a norm, and a sum of squares in
float32 overflows once an entry passes ~1.8e19 and underflows below ~1e-19,
where SAM's perturbation would silently collapse to zero. The sums here are
taken directly, one reduction per leaf (the fast path, what an unguarded norm
costs), and checked once for the whole tree; only when the check fails are
they retaken under ``lax.cond``, from every leaf concatenated into one vector
rescaled by a power of two of its largest entry, which is exact. So the common
case costs a plain sum, the compiled program holds each leaf's reduction once,
and the rare case stays right at the price of one copy of the vectors.

Two details keep the compiled program at optax's size. The leaves read by the
fast sums pass through one optimization barrier, so that XLA does not merge
their ``T g`` with the element-wise pass that follows and write it out. And
what every leaf's later pass reads (the norm, the divisor, the radius) comes
out of the conditional, where XLA would otherwise copy its scalar arithmetic
into each leaf's fusion.

Under ``vmap`` with a batched predicate ``lax.cond`` becomes a select, so
there both paths run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from asam_jax._layout import Layout
from asam_jax._varying import barrier, cast_varying, varying_axes

# The fast path accepts a sum at least 2^66 times the smallest normal number:
# terms below that flush to zero, and n of them change the sum by < n 2^-66.
_SAFE_MARGIN = 66


def accumulation_dtype(x: Any) -> jnp.dtype:
  """The real dtype sums are taken in: at least float32, float64 under x64 for float64 leaves
  (and for complex128 ones, whose parts are float64)."""
  return jnp.promote_types(jnp.finfo(jnp.result_type(x)).dtype, jnp.float32)


def pow2_inverse(largest: chex.Array) -> chex.Array:
  """A power of two ``s`` with ``largest * s`` in ``[2, 4)``: an exact rescaling.

  The exponent is clamped so that ``s`` stays a normal number; a zero or
  non-finite ``largest`` gives ``s = 4``, which keeps zeros zero and
  non-finite values non-finite.
  """
  info = jnp.finfo(largest.dtype)
  _, exponent = jnp.frexp(largest)
  exponent = jnp.clip(exponent, info.minexp + 1, info.maxexp)
  return jnp.ldexp(jnp.ones_like(largest), 2 - exponent)


def safe(total: chex.Array) -> chex.Array:
  """Whether a sum of squares (or of ``|x|^q``) is finite and far enough above underflow to trust."""
  return jnp.isfinite(total) & (total >= float(jnp.finfo(total.dtype).tiny) * 2.0**_SAFE_MARGIN)


def guarded(
  ok: chex.Array, fast: Callable[[], Any], slow: Callable[[Any], Any], operands: Any
) -> Any:
  """``fast()`` where ``ok``, else ``slow(operands)``, which only runs then.

  Inside ``shard_map`` both must vary over the same axes, so each output is
  cast to vary over every axis that either of its two versions varies over.
  """
  fast_types = jax.eval_shape(fast)
  slow_types = jax.eval_shape(slow, operands)
  axes = jax.tree.map(lambda x, t: varying_axes(x) | varying_axes(t), fast_types, slow_types)
  return jax.lax.cond(
    ok,
    lambda _: jax.tree.map(cast_varying, fast(), axes),
    lambda ops: jax.tree.map(cast_varying, slow(ops), axes),
    operands,
  )


Term = tuple[chex.Array, Callable[[Any], chex.Array] | None, Any]
"""One leaf of a scaled vector: ``(d, scale, operand)``, the leaf ``scale(operand) d``.

The operand holds the scalars ``scale`` reads as well as the arrays (ASAM's
``(w, eta)``): through the barrier each leaf gets its own copy of them, since one
broadcast of a scalar shared by the leaves of a shape would be written out at
full size, XLA:CPU's reduction kernels taking no broadcast operand.
"""


def _value(term: Term, dtype: Any) -> chex.Array:
  d, scale, operand = term
  d = d.astype(dtype)
  return d if scale is None else scale(operand) * d


# The slow path concatenates leaves in chunks of at most this many entries (a leaf
# larger than that is read on its own): one chunk's copy at a time, so that its
# scratch stays small however large the model.
CHUNK = 1 << 18


def chunk_leaves(
  layout: Layout,
  leaves: Sequence[int],
  xs: Sequence[chex.Array],
  keys: Sequence[Any] | None = None,
  *,
  sharded_alone: bool = True,
) -> list[tuple[Any, list[int]]]:
  """The positions of ``leaves`` packed into chunks, each with the shard axes of its leaves.

  Leaves with the same shard axes (and the same ``keys``: the same scale)
  share a chunk up to ``CHUNK`` entries; a larger leaf is a chunk of its own,
  and so, with ``sharded_alone``, is one sharded by explicit-mode jit (which
  cannot join a concatenation).
  """
  chunks: list[tuple[Any, list[int]]] = []
  open_chunks: dict[Any, tuple[list[int], int]] = {}
  for k, (i, x, key) in enumerate(zip(leaves, xs, keys or [None] * len(leaves))):
    axes = layout.shard_axes[i] if layout.shard_axes else ()
    size = int(np.size(x))
    if size > CHUNK or (sharded_alone and _apart(x)):
      chunks.append((axes, [k]))
      continue
    positions, total = open_chunks.get((axes, key), (None, 0))
    if positions is None or total + size > CHUNK:
      positions, total = [], 0
      chunks.append((axes, positions))
    positions.append(k)
    open_chunks[axes, key] = (positions, total + size)
  return chunks


def _flat(
  arrays: Sequence[chex.Array], positions: Sequence[int], second: bool = False
) -> chex.Array:
  """The arrays at ``positions`` as one vector (the one array, if it is one).

  The second pass over a chunk concatenates in reverse order, so that XLA does
  not take it for the first pass's copy and keep that alive until then.
  """
  if len(positions) == 1:
    return arrays[positions[0]]
  order = positions[::-1] if second else positions
  return jnp.concatenate([jnp.ravel(arrays[k]) for k in order])


def _apart(x: chex.Array) -> bool:
  """Whether ``x`` is sharded under jax's explicit mode, where it cannot join a concatenation."""
  spec = getattr(jax.typeof(x).sharding, "spec", None)
  return spec is not None and any(s is not None for s in spec)


def _over_chunks(chunks, values, reduce, collective, combine):
  """``reduce`` over each chunk's vector, over its shard axes (``collective``), ``combine``d.

  ``values(positions)`` builds a chunk's vector where it is reduced, so that
  each chunk's copy is written and read on its own.
  """
  totals = []
  for axes, positions in chunks:
    total = reduce(values(positions))
    totals.append(collective(total, axes) if axes else total)
  return totals[0] if len(totals) == 1 else combine(jnp.stack(totals))


def _abs_max(x: chex.Array) -> chex.Array:
  return jnp.max(jnp.abs(x), initial=0)


def power_sum(
  terms: Sequence[Term],
  layout: Layout,
  leaves: Sequence[int],
  dtype: Any,
  post: Callable[[chex.Array, chex.Array], Any],
  *,
  power: float,
) -> Any:
  """``post(S, s)`` with ``S = sum |x s|^q`` over a scaled vector's leaves and ``s`` a power of two.

  Args:
    terms: the vector's leaves, each ``(d, scale, operand)`` for
      ``scale(operand) d``: the fast sums read ``d`` and ``operand`` through
      the barrier, and the slow path concatenates the ``d`` and the operands
      of the leaves that share a ``scale`` and applies it once.
    layout: sums each leaf's part over the shards of that leaf.
    leaves: the indices of the vector's leaves among the flattened params.
    dtype: the dtype the sums are taken in.
    post: ``(S, s) -> scalars``, what the later passes read; ``s`` is 1
      unless the plain sum was out of range.
    power: ``q`` > 0.

  Returns:
    ``post(S, s)``.
  """
  reduce = (
    (lambda x: jnp.sum(jnp.square(x))) if power == 2 else lambda x: jnp.sum(jnp.abs(x) ** power)
  )
  arrays = [(d, operand) for d, _, operand in terms]
  read = barrier(arrays)
  fast = layout.sum(
    [reduce(_value((d, t[1], op), dtype)) for (d, op), t in zip(read, terms)], leaves
  )
  chunks = chunk_leaves(layout, leaves, [d for d, _, _ in terms], [id(t[1]) for t in terms])

  def slow(arrays):
    def scaled(arrays, positions, s=None):
      # One copy of the chunk's d (and of the operands its scale reads), scaled as a whole.
      d = _flat([d for d, _ in arrays], positions).astype(dtype)
      scale, operand = terms[positions[0]][1], arrays[positions[0]][1]
      if scale is not None:
        read = _flat([None if op is None else op[0] for _, op in arrays], positions)
        scale = scale((read, *operand[1:]))
      d = d if s is None else d * s
      return d if scale is None else scale * d

    s = pow2_inverse(
      _over_chunks(chunks, lambda c: scaled(arrays, c), _abs_max, jax.lax.pmax, jnp.max)
    )
    # The second pass reads the arrays through a barrier, so that XLA shares nothing
    # (a chunk's copy, its T) with the first pass and keeps nothing alive for it.
    again = barrier(arrays)
    total = _over_chunks(chunks, lambda c: scaled(again, c, s), reduce, jax.lax.psum, jnp.sum)
    return post(total, s)

  return guarded(safe(fast), lambda: post(fast, jnp.ones([], dtype)), slow, arrays)


def largest(
  terms: Sequence[Term],
  layout: Layout,
  leaves: Sequence[int],
  dtype: Any,
  post: Callable[[chex.Array], Any],
) -> Any:
  """``post(max |x|)`` over a scaled vector's leaves; a maximum neither overflows nor underflows."""
  read = barrier([(d, operand) for d, _, operand in terms])
  top = layout.max(
    [_abs_max(_value((d, t[1], op), dtype)) for (d, op), t in zip(read, terms)], leaves
  )
  # Through the barrier too: the later passes read post's scalars, not their arithmetic.
  return barrier(post(top))


def inner_products(
  vectors: Sequence[Sequence[chex.Array]],
  pairs: Sequence[tuple[int, int]],
  layout: Layout,
  leaves: Sequence[int],
  post: Callable[[list[chex.Array], list[chex.Array]], Any] | None = None,
) -> Any:
  """Inner products of pytree vectors as ``<x, y> = S_xy / (s_x s_y)``, safely.

  Args:
    vectors: each a list of leaves, all with the same shapes.
    pairs: the ``(i, j)`` whose inner products are wanted. The sums of
      squares among them (``i == j``) must be in the normal range for the
      fast path to be taken; the others must be finite.
    layout: sums each leaf's part over the shards of that leaf.
    leaves: the indices of the vectors' leaves among the flattened params.
    post: ``(S, s) -> scalars`` to compute in the conditional; by default
      ``(S, s)`` themselves.

  Returns:
    ``post(S, s)``: the inner products of the rescaled vectors, one per pair,
    and each vector's scale (1 on the fast path, a power of two otherwise), so
    that ``<x, y> = S_xy / (s_x s_y)``. Form ratios from ``S`` and ``s`` rather
    than that product, which can overflow where a ratio does not.
  """
  post = post or (lambda sums, scales: (sums, scales))
  dtype = jnp.result_type(*[accumulation_dtype(x) for v in vectors for x in v])

  def widened(x):
    return x.astype(jnp.promote_types(x.dtype, dtype))  # complex leaves stay complex

  def product(x, y):
    # Re(conj(x) y): a complex leaf counts as its real and imaginary parts.
    return jnp.sum(jnp.real(jnp.conj(widened(x)) * widened(y)))

  read = barrier(list(vectors))
  fast = [layout.sum([product(x, y) for x, y in zip(read[i], read[j])], leaves) for i, j in pairs]
  ok = jnp.array(True)
  for total, (i, j) in zip(fast, pairs):
    ok = ok & (safe(total) if i == j else jnp.isfinite(total))
  ones = [jnp.ones([], dtype)] * len(vectors)

  chunks = chunk_leaves(layout, leaves, vectors[0])

  def slow(vectors):
    def scaled(v, positions, s=None):
      flat = widened(_flat(v, positions))
      return flat if s is None else flat * s

    scales = [
      pow2_inverse(
        _over_chunks(chunks, lambda c, v=v: scaled(v, c), _abs_max, jax.lax.pmax, jnp.max)
      )
      for v in vectors
    ]

    def rescaled_sum(i, j):
      # Each pair reads its vectors through a barrier of its own, so that a rescaled
      # vector two pairs share (g_p in <g, g_p> and ||g_p||^2) is not written out for both.
      # The scales go through it too: XLA:CPU's reductions take a scalar operand, not
      # the arithmetic that makes one, which would otherwise be broadcast and written out.
      x, y, s_x, s_y = barrier((vectors[i], vectors[j], scales[i], scales[j]))
      return _over_chunks(
        chunks,
        lambda c: jnp.real(jnp.conj(scaled(x, c, s_x)) * scaled(y, c, s_y)),
        jnp.sum,
        jax.lax.psum,
        jnp.sum,
      )

    sums = [rescaled_sum(i, j) for i, j in pairs]
    return post(sums, scales)

  return guarded(ok, lambda: post(fast, ones), slow, list(vectors))


def inexact_leaves(*trees: Any) -> tuple[list[list[chex.Array]], list[int]]:
  """The float and complex leaves of each tree, and their indices: ``float0`` leaves drop out."""
  flat = [jax.tree.leaves(t) for t in trees]
  keep = [i for i, x in enumerate(flat[0]) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return [[leaves[i] for i in keep] for leaves in flat], keep


def projection(x: Any, onto: Any, layout: Layout) -> chex.Array:
  """``c = <x, onto> / ||onto||^2``: ``c onto`` is ``x``'s projection on ``onto`` (0 if ``onto = 0``).

  GSAM's and LookSAM's decompositions are all this coefficient.
  """
  (xs, os), indices = inexact_leaves(x, onto)

  def coefficient(sums, scales):
    (cross, norm), (s_x, s_o) = sums, scales
    return jnp.where(norm > 0, cross / jnp.where(norm > 0, norm, 1), 0) * (s_o / s_x)

  return inner_products([xs, os], [(0, 1), (1, 1)], layout, indices, coefficient)


def combination(a: chex.Numeric, x: chex.Array, b: chex.Numeric, y: chex.Array) -> chex.Array:
  """``a x + b y`` in ``x``'s dtype; a ``float0`` leaf (an integer parameter's) passes."""
  if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
    return x
  return (a * x + b * y).astype(x.dtype)
