"""m-sharpness on any number of devices: one SAM perturbation per group of examples.

The SAM paper computes the perturbation per accelerator, on m examples each,
and averages the resulting gradients (m-sharpness); smaller m generalizes
better. :func:`grouped_update` gives any m, on one device too, by running the
transformation's ``axis_name`` machinery under ``vmap`` over groups of the
batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax

from asam_jax._varying import tracked_axes


def split_batch(batch: chex.ArrayTree, num_groups: int) -> chex.ArrayTree:
  """Splits every leaf's leading (batch) axis into ``num_groups`` equal groups.

  Args:
    batch: a pytree of arrays with a common leading batch axis.
    num_groups: the number of groups, which must divide the batch size.

  Returns:
    The batch with leaves of shape ``(num_groups, batch_size // num_groups, ...)``;
    group ``i`` holds consecutive examples, as a device's shard of the batch does.

  Example:
    >>> import jax.numpy as jnp, asam_jax
    >>> asam_jax.split_batch({"x": jnp.zeros((8, 3))}, 4)["x"].shape
    (4, 2, 3)
  """
  if not isinstance(num_groups, int) or num_groups < 1:
    raise ValueError(f"num_groups must be a positive int, got {num_groups!r}.")
  leaves = jax.tree.leaves(batch)
  sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in leaves}
  (size,) = sizes if len(sizes) == 1 else (None,)
  if size is None or size % num_groups:
    raise ValueError(
      f"num_groups={num_groups} must divide a batch axis that every leaf shares; got "
      f"leading sizes {sorted(map(str, sizes))}. Use a batch size that is a multiple "
      "of num_groups."
    )
  return jax.tree.map(lambda x: x.reshape(num_groups, -1, *x.shape[1:]), batch)


def grouped_update(
  tx: optax.GradientTransformationExtraArgs,
  state: optax.OptState,
  params: optax.Params,
  batch: chex.ArrayTree,
  *,
  loss_fn: Callable[..., Any],
  num_groups: int,
  axis_name: Any,
  has_aux: bool = False,
) -> tuple[optax.Updates, optax.OptState, Any]:
  """One m-sharpness (mSAM) step: one perturbation per group of the batch.

  Splits ``batch`` into ``num_groups`` groups of ``m = batch_size / num_groups``
  examples, and for each group takes the clean gradient and calls
  ``tx.update`` under ``jax.vmap(..., axis_name=axis_name)``. Built with
  ``sam(axis_name=axis_name)`` (or ``asam``), ``tx`` perturbs each group with
  its own gradient and averages the perturbed gradients over the groups, so
  the clean pass costs nothing extra and the step is exactly what the SAM
  paper's m-sharpness computes on ``num_groups`` accelerators. Everything
  chained after ``sam`` sees the averaged gradient once.

  Inside ``pmap`` or ``shard_map(..., check_vma=False)`` build ``tx`` with
  both axes, ``sam(axis_name=("devices", "groups"))``, for ``num_groups``
  perturbations per device. (jax 0.10.2 cannot type ``vmap`` collectives under
  shard_map's default ``check_vma=True``.)

  Args:
    tx: the transformation, ``sam``/``asam`` built with ``axis_name`` (first in
      a chain, if chained).
    state: ``tx``'s state.
    params: the parameters.
    batch: a pytree of arrays with a common leading batch axis.
    loss_fn: ``loss_fn(params, group) -> scalar loss`` (mean over the group),
      or ``(loss, aux)`` with ``has_aux=True`` (then ``tx`` too needs
      ``has_aux=True``).
    num_groups: the number of groups; it must divide the batch size.
    axis_name: the name ``tx`` was built with, bound here to the groups.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    ``(updates, state, loss)``: ``tx``'s updates and new state, and the clean
    loss averaged over the groups; with ``has_aux``, ``loss`` is
    ``(loss, aux)`` with each aux leaf stacked over the groups.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, optax, asam_jax
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> batch = {"x": jnp.arange(8.0).reshape(4, 2)}
    >>> loss_fn = lambda p, b: jnp.mean((b["x"] @ p["w"]) ** 2)
    >>> tx = optax.chain(asam_jax.sam(rho=0.05, axis_name="groups"), optax.sgd(0.01))
    >>> updates, state, loss = asam_jax.grouped_update(
    ...   tx, tx.init(params), params, batch, loss_fn=loss_fn, num_groups=2, axis_name="groups")
    >>> print(float(loss), int(state[0].count))
    30.0 1

  References:
    Foret et al., Sharpness-Aware Minimization for Efficiently Improving
    Generalization, ICLR 2021, Section 4.1 (m-sharpness).
  """
  if tracked := tracked_axes(tuple(jax.sharding.get_abstract_mesh().manual_axes)):
    raise ValueError(
      f"grouped_update inside shard_map (axes {tracked}) needs check_vma=False: jax "
      "cannot yet type the vmap collective over the groups under check_vma. With "
      "check_vma=False jax.grad gives each device's own gradient, so pass params as "
      "they are."
    )
  groups = split_batch(batch, num_groups)

  def one_group(group):
    group_loss = lambda p: loss_fn(p, group)
    value, grads = jax.value_and_grad(group_loss, has_aux=has_aux)(params)
    updates, new_state = tx.update(grads, state, params, loss_fn=group_loss)
    return updates, new_state, value

  try:
    # out_axes=None: the updates and state must come out the same for every
    # group, which is what averaging over axis_name guarantees.
    updates, new_state, values = jax.vmap(one_group, axis_name=axis_name, out_axes=(None, None, 0))(
      groups
    )
  except ValueError as error:
    if "out_axes is None" not in str(error):
      raise
    raise ValueError(
      f"tx.update returned different updates or state for different groups. Build "
      f"sam/asam with axis_name={axis_name!r} and put it first in the chain, so that "
      "it averages the perturbed gradients over the groups."
    ) from error
  if has_aux:
    return updates, new_state, (values[0].mean(), values[1])
  return updates, new_state, values.mean()
