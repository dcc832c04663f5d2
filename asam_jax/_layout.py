"""Where an update runs: its data-parallel axes, its sharded parameters, and their collectives.

Every transformation resolves one :class:`Layout` per ``update`` call, at trace
time, from its ``axis_name`` and ``sync_perturbation`` and from the types of
``params`` and ``grads``:

* an axis in ``axis_name`` is a data-parallel axis: params are replicated over
  it, each device brings its own gradient, and the results are averaged over
  it (per-device mSAM, or global SAM with ``sync_perturbation``);
* a ``shard_map`` axis (``check_vma=True``) that a params leaf *varies* over
  shards that leaf (FSDP, tensor parallelism): the leaf's part of every norm
  and inner product is summed over the axis, so the perturbation is the global
  one, and its gradient is never averaged with other shards.

Layouts that cannot be told apart from the types, or that cannot mean what
was asked, are refused with an error that says what to change.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp

from asam_jax._varying import invariant_axes, to_varying, tracked_axes


def axis_names(axis_name: Any) -> tuple[Any, ...]:
  """``axis_name`` as a tuple of names: ``()`` for ``None``."""
  if axis_name is None:
    return ()
  return axis_name if isinstance(axis_name, tuple) else (axis_name,)


class Layout(NamedTuple):
  """The devices one update runs on, resolved at trace time.

  Attributes:
    data_axes: the data-parallel axes (``axis_name`` as a tuple).
    sync: whether the gradient is averaged over ``data_axes`` before it is
      used (global SAM) rather than after (per-device mSAM).
    shard_axes: for each leaf of ``params`` (flattened), the ``shard_map`` axes
      it is sharded over.
  """

  data_axes: tuple[Any, ...] = ()
  sync: bool = False
  shard_axes: tuple[tuple[Any, ...], ...] | None = None

  def _reduce(
    self,
    partials: Sequence[chex.Array],
    leaves: Sequence[int],
    op: Callable[[Any, Any], Any],
    collective: Callable[[Any, Any], Any],
  ) -> chex.Array:
    # One collective per distinct set of shard axes, not one per leaf.
    groups: dict[tuple[Any, ...], list[chex.Array]] = {}
    for i, x in zip(leaves, partials):
      groups.setdefault(self.shard_axes[i] if self.shard_axes else (), []).append(x)
    totals = [
      collective(functools.reduce(op, xs), axes) if axes else functools.reduce(op, xs)
      for axes, xs in groups.items()
    ]
    return functools.reduce(op, totals)

  def sum(self, partials: Sequence[chex.Array], leaves: Sequence[int]) -> chex.Array:
    """The sum of per-leaf partial sums, each summed over the shards of its leaf.

    Args:
      partials: one scalar per leaf, at least one.
      leaves: the indices, among the flattened params, of the leaves the
        partials belong to.
    """
    return self._reduce(partials, leaves, jnp.add, jax.lax.psum)

  def max(self, partials: Sequence[chex.Array], leaves: Sequence[int]) -> chex.Array:
    """The maximum of per-leaf partial maxima, each over the shards of its leaf."""
    return self._reduce(partials, leaves, jnp.maximum, jax.lax.pmax)

  def mean(self, tree: Any) -> Any:
    """``tree`` averaged over the data-parallel axes."""
    return jax.lax.pmean(tree, self.data_axes) if self.data_axes else tree

  def ascent_gradient(self, grads: Any) -> Any:
    """The gradient the perturbation is computed from: averaged first with ``sync``."""
    return self.mean(grads) if self.sync else grads

  def perturbed_gradient(self, grads: Any) -> Any:
    """A gradient at the perturbed weights, averaged now with ``sync``, later otherwise."""
    return self.mean(grads) if self.sync else grads

  def finish(self, tree: Any) -> Any:
    """Averages what was computed from each device's own gradients; global values pass.

    With ``sync`` every input was averaged already, so the outputs are equal on
    every device, bit for bit, with no further collective.
    """
    return tree if self.sync else self.mean(tree)

  def local(self, params: Any) -> Any:
    """``params`` at which ``jax.grad`` gives this device's gradient, not the devices' sum."""
    return to_varying(params, self.data_axes) if self.data_axes else params


def _fsdp_message(who: str, path: str, axes: tuple[Any, ...]) -> str:
  name = axes[0] if len(axes) == 1 else axes
  return (
    f"params leaf {path} varies over the shard_map axis {name!r}, so it reads as sharded over "
    f"it (FSDP or tensor parallelism), but {who} was built with axis_name naming {name!r}, "
    "which makes it a data-parallel axis: params replicated, each device's own gradient "
    "averaged. If the params are replicated, give update() the params as they are (only the "
    f"gradient is taken at asam_jax.to_varying(params, {name!r})). If they are sharded, "
    "there is no per-device full gradient, so mSAM is impossible over that axis: drop "
    f"{name!r} from axis_name, and the library sums the norms over the shards itself "
    "(global SAM over that axis; take the gradient of the pmean'd loss with respect to "
    "params as they are)."
  )


def _unnamed_message(who: str, axes: tuple[Any, ...]) -> str:
  return (
    f"{who}.update runs inside pmap or shard_map(check_vma=False) over the axes {axes}, "
    "which axis_name does not name. There jax does not type which values vary over an "
    "axis, so the library cannot tell replicated params from sharded ones, nor each "
    "device's gradient from an averaged one. For data parallelism, build with "
    f"axis_name={axes[0] if len(axes) == 1 else axes!r} (mSAM; add "
    "sync_perturbation=True for global SAM). For params sharded over a shard_map axis, "
    "use shard_map's default check_vma=True, under which the library sees the sharding."
  )


def _summed_gradient_message(who: str, names: tuple[Any, ...]) -> str:
  name = names[0] if len(names) == 1 else names
  return (
    f"The gradient passed to {who}.update is invariant over the shard_map axis {name!r}: "
    "jax.grad with respect to replicated params inside shard_map (check_vma=True) "
    "returns the gradient already summed over the devices, so each device's own "
    "gradient, which mSAM perturbs with, is lost and the step would silently be "
    "global SAM with an n-times gradient. Take the gradient with respect to params "
    f"cast to varying: grads = jax.grad(loss_fn)(asam_jax.to_varying(params, {name!r})) "
    f"(that is jax.lax.pcast(params, {name!r}, to='varying')), and pass that local "
    "gradient; update averages over the axis itself."
  )


def _unbound_message(who: str, axis_name: Any, name: Any) -> str:
  return (
    f"{who}(axis_name={axis_name!r}) averages over the device axis {name!r}, but update is "
    f"not running under an axis of that name (under plain jit, say). Call update inside "
    f"jax.pmap(..., axis_name={name!r}), jax.shard_map over a mesh with an axis {name!r}, or "
    f"jax.vmap(..., axis_name={name!r}) (as asam_jax.grouped_update does). Under plain jit "
    "with the batch sharded by NamedSharding, build without axis_name: that is global SAM."
  )


def shard_axes_of(params: Any) -> tuple[tuple[Any, ...], ...] | None:
  """For each leaf of ``params``, the ``shard_map`` axes it is sharded over; ``None`` if none is.

  Only axes whose variance jax tracks (``check_vma=True``) can be seen.
  """
  tracked = tracked_axes(tuple(jax.sharding.get_abstract_mesh().manual_axes))
  if not tracked:
    return None
  axes = tuple(
    tuple(a for a in tracked if a in jax.typeof(leaf).manual_axis_type.varying)
    for leaf in jax.tree.leaves(params)
  )
  return axes if any(axes) else None


def resolve(who: str, axis_name: Any, sync: bool, params: Any, grads: Any = None) -> Layout:
  """The :class:`Layout` of one update, or an error that says how to fix the call.

  Args:
    who: the constructor's name, for the messages.
    axis_name: the transformation's ``axis_name``.
    sync: its ``sync_perturbation``.
    params: the parameters ``update`` was given.
    grads: the gradient it was given, checked for a devices' sum where each
      device's own is needed; ``None`` to skip that check.

  Returns:
    The layout.

  Raises:
    ValueError: an axis name is unbound, names a sharding axis, or a device
      axis is left unnamed where jax does not type variance; or the gradient
      is already summed over a data-parallel axis.
  """
  names = axis_names(axis_name)
  for name in names:
    try:
      jax.lax.axis_index(name)
    except NameError as error:
      raise ValueError(_unbound_message(who, axis_name, name)) from error
  manual = tuple(jax.sharding.get_abstract_mesh().manual_axes)
  tracked = tracked_axes(manual)
  if untyped := tuple(a for a in manual if a not in tracked and a not in names):
    raise ValueError(_unnamed_message(who, untyped))
  shard_axes = shard_axes_of(params)
  if shard_axes is not None:
    paths = jax.tree_util.tree_flatten_with_path(params)[0]
    for (path, _), axes in zip(paths, shard_axes):
      if clash := tuple(a for a in axes if a in names):
        raise ValueError(_fsdp_message(who, jax.tree_util.keystr(path), clash))
  if grads is not None and (summed := invariant_axes(grads, names)):
    raise ValueError(_summed_gradient_message(who, summed))
  return Layout(names, sync, shard_axes)


def check_sync(axis_name: Any, sync: bool) -> None:
  """Refuses ``sync_perturbation`` without an axis to synchronize over."""
  if sync and axis_name is None:
    raise ValueError(
      "sync_perturbation=True averages the gradient over a device axis, so "
      "it needs axis_name, the name given to pmap or shard_map."
    )
