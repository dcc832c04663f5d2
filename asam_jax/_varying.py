"""Which device axes a value varies over inside ``jax.shard_map``.

With its default ``check_vma=True``, ``shard_map`` types every value as varying
or invariant over each mesh axis, and ``jax.grad`` with respect to an
invariant (replicated) value returns the gradient already summed over the
devices. These helpers let the SAM update notice that and avoid it.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp


def varying_axes(x: Any) -> frozenset[Any]:
  """The manual axes a value (or a ``jax.ShapeDtypeStruct``) varies over; none outside ``shard_map``."""
  kind = (
    x.manual_axis_type if isinstance(x, jax.ShapeDtypeStruct) else jax.typeof(x).manual_axis_type
  )
  return frozenset() if kind is None else kind.varying


def cast_varying(x: chex.Array, axes: Any) -> chex.Array:
  """``x`` cast to vary over each of ``axes`` it does not vary over yet."""
  missing = tuple(a for a in axes if a not in varying_axes(x))
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def tracked_axes(axis_name: Any) -> tuple[Any, ...]:
  """The names in ``axis_name`` over which ``shard_map`` tracks variance here.

  Args:
    axis_name: one axis name or a tuple of them, as ``jax.lax.pmean`` takes.

  Returns:
    The names that are manual axes of the current ``shard_map`` with
    ``check_vma=True``. Empty outside ``shard_map``, under ``pmap`` and
    ``vmap``, and with ``check_vma=False``, where ``jax.grad`` returns the
    device's own gradient anyway.
  """
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  manual = jax.sharding.get_abstract_mesh().manual_axes
  # pcast is a no-op exactly where variance is not tracked, so a probe tells
  # the two apart through public API only.
  return tuple(
    name
    for name in names
    if name in manual
    and name
    in jax.typeof(jax.lax.pcast(jnp.zeros(()), name, to="varying")).manual_axis_type.varying
  )


def invariant_axes(tree: chex.ArrayTree, axis_name: Any) -> tuple[Any, ...]:
  """The tracked names in ``axis_name`` over which some leaf of ``tree`` is invariant."""
  leaves = jax.tree.leaves(tree)
  return tuple(
    name
    for name in tracked_axes(axis_name)
    if any(name not in varying_axes(leaf) for leaf in leaves)
  )


def to_varying(tree: chex.ArrayTree, axis_name: Any) -> chex.ArrayTree:
  """Casts the leaves of ``tree`` that are invariant over ``axis_name`` to varying.

  Inside ``jax.shard_map`` (default ``check_vma=True``) with replicated params,
  ``jax.grad(loss)(to_varying(params, axis_name))`` is each device's own
  gradient, the one that mSAM perturbs with, rather than the sum over the
  devices that ``jax.grad(loss)(params)`` returns. It is
  ``jax.lax.pcast(..., to="varying")`` applied only where needed, and a no-op
  where variance is not tracked (``pmap``, ``vmap``, ``check_vma=False``).

  Args:
    tree: a pytree of arrays, typically the parameters.
    axis_name: a ``shard_map`` mesh axis name or a tuple of them.

  Returns:
    ``tree`` with every leaf varying over the tracked names in ``axis_name``.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, asam_jax
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ("data",))
    >>> x = jax.device_put(jnp.array([[1.0, 2.0]]), NamedSharding(mesh, P("data")))
    >>> def local_grad(w, x):
    ...   return jax.grad(lambda w: jnp.sum(x * w))(asam_jax.to_varying(w, "data"))
    >>> f = jax.shard_map(local_grad, mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data"))
    >>> print(np.asarray(f(jnp.ones(2), x)))
    [1. 2.]

  References:
    Foret et al., Sharpness-Aware Minimization for Efficiently Improving
    Generalization, ICLR 2021, Section 4.1 (m-sharpness).
  """
  names = tracked_axes(axis_name)
  return jax.tree.map(lambda leaf: cast_varying(leaf, names), tree)


def barrier(tree: Any) -> Any:
  """``jax.lax.optimization_barrier`` over ``tree``, keeping each leaf's variance.

  Inside ``shard_map`` one barrier over values that vary over different axes
  makes every output vary over all of them, so the leaves go through one
  barrier per distinct set of axes.
  """
  leaves, treedef = jax.tree.flatten(tree)
  groups: dict[frozenset[Any], list[int]] = {}
  for i, x in enumerate(leaves):
    groups.setdefault(varying_axes(x), []).append(i)
  out = list(leaves)
  for positions in groups.values():
    for i, x in zip(positions, jax.lax.optimization_barrier([leaves[i] for i in positions])):
      out[i] = x
  return jax.tree.unflatten(treedef, out)
