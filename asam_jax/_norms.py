"""Sums of squares and inner products over pytrees that neither overflow nor underflow.

Every normalization in the library divides by a norm, and a sum of squares in
float32 overflows once an entry passes ~1.8e19 and underflows below ~1e-19,
where SAM's perturbation would silently collapse to zero. The sums here are
taken directly (the fast path, one pass per sum) and checked; only when a
check fails are they retaken, under ``lax.cond``, from vectors rescaled by a
power of two of their largest entry, which is exact. So the common case costs
what an unguarded sum costs, and the rare one stays right.

Under ``vmap`` with a batched predicate ``lax.cond`` becomes a select, so
there both paths run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp

from asam_jax._layout import Layout


def accumulation_dtype(x: Any) -> jnp.dtype:
  """The dtype sums are taken in: at least float32, float64 under x64 for float64 leaves."""
  return jnp.promote_types(jnp.result_type(x), jnp.float32)


def lowest_safe_sum(dtype: Any) -> float:
  """The smallest sum of squares (or of ``|x|^q``) the fast path accepts.

  Terms below the smallest normal number flush to zero; above this bound,
  the ``n`` lost terms change the sum by less than ``n * 2**-66``.
  """
  return float(jnp.finfo(dtype).tiny) * 2.0**66


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


def safe(*sums: chex.Array) -> chex.Array:
  """Whether sums of squares are finite and far enough above underflow to trust."""
  ok = jnp.array(True)
  for s in sums:
    ok = ok & jnp.isfinite(s) & (s >= lowest_safe_sum(s.dtype))
  return ok


def _varying(x: Any) -> frozenset[Any]:
  """The manual axes a value (or a ``jax.ShapeDtypeStruct``) varies over."""
  kind = (
    x.manual_axis_type if isinstance(x, jax.ShapeDtypeStruct) else jax.typeof(x).manual_axis_type
  )
  return frozenset() if kind is None else kind.varying


def _vary(x: chex.Array, axes: frozenset[Any]) -> chex.Array:
  missing = tuple(axes - _varying(x))
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def guarded(ok: chex.Array, fast: Any, slow: Any, operands: Any) -> Any:
  """``fast`` where ``ok``, else ``slow(operands)``, which only runs then.

  Inside ``shard_map`` both must vary over the same axes, so each output is
  cast to vary over every axis that either of its two versions varies over.
  """
  slow_types = jax.eval_shape(slow, operands)
  axes = jax.tree.map(lambda x, t: _varying(x) | _varying(t), fast, slow_types)
  fast = jax.tree.map(_vary, fast, axes)
  return jax.lax.cond(
    ok, lambda _: fast, lambda ops: jax.tree.map(_vary, slow(ops), axes), operands
  )


def _sums(vectors, scales, pairs, layout, leaves):
  def product(x, y, i, j, tag):
    # Rescaled, x and y are expressions that XLA would write out once for all
    # the sums that read them, and a scale it would broadcast to full size:
    # through a barrier per sum, each sum stays one pass that reads x and y.
    x, y, sx, sy, _ = jax.lax.optimization_barrier((x, y, scales[i], scales[j], jnp.int32(tag)))
    return jnp.sum((x.astype(sx.dtype) * sx) * (y.astype(sy.dtype) * sy))

  return [
    layout.sum(
      [product(x, y, i, j, tag) for x, y in zip(vectors[i], vectors[j])],
      leaves,
    )
    for tag, (i, j) in enumerate(pairs)
  ]


def inner_products(
  vectors: Sequence[Sequence[chex.Array]],
  pairs: Sequence[tuple[int, int]],
  layout: Layout,
  leaves: Sequence[int],
) -> tuple[list[chex.Array], list[chex.Array]]:
  """Inner products of pytree vectors as ``<x, y> = s_x s_y S_xy``, safely.

  Args:
    vectors: each a list of leaves, all with the same shapes.
    pairs: the ``(i, j)`` whose inner products are wanted. The sums of
      squares among them (``i == j``) must be in the normal range for the
      fast path to be taken; the others must be finite.
    layout: sums each leaf's part over the shards of that leaf.
    leaves: the indices of the vectors' leaves among the flattened params.

  Returns:
    ``(S, s)``: the inner products of the rescaled vectors, one per pair, and
    each vector's scale (1 on the fast path, a power of two otherwise), so
    that ``<x, y> = S_xy / (s_x s_y)``. Form ratios from ``S`` and ``s``
    rather than that product, which can overflow where a ratio does not.
  """
  dtype = jnp.result_type(*[accumulation_dtype(x) for v in vectors for x in v])
  ones = [jnp.ones([], dtype)] * len(vectors)
  fast = _sums(vectors, ones, pairs, layout, leaves)
  ok = safe(*[s for s, (i, j) in zip(fast, pairs) if i == j])
  for s, (i, j) in zip(fast, pairs):
    if i != j:
      ok = ok & jnp.isfinite(s)

  def slow(vectors):
    scales = [
      pow2_inverse(layout.max([jnp.max(jnp.abs(x), initial=0).astype(dtype) for x in v], leaves))
      for v in vectors
    ]
    return _sums(vectors, scales, pairs, layout, leaves), scales

  return guarded(ok, (fast, ones), slow, vectors)
