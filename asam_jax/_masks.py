"""Masks that choose which leaves are perturbed and which are scaled by T_w."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

Mask = Any | Callable[[Any], Any]


def kernel_mask(params: Any) -> Any:
  """Selects weight matrices and kernels: the official ASAM code's convention.

  The reference PyTorch ASAM (Kwon et al., 2021) scales the perturbation by
  ``|w| + eta`` only for weights, so biases and other 1-D parameters get
  T = 1. This mask reproduces that: a leaf is selected when it has two or more
  dimensions. Pass it as ``adaptive_mask``. The default of
  :func:`asam_jax.asam` instead scales every leaf, which is the paper's
  T_w = diag(|w| + eta) and the only choice that keeps the perturbed loss
  invariant when a neuron's incoming weights *and bias* are rescaled.

  Args:
    params: a pytree of arrays.

  Returns:
    A pytree of Python bools with the structure of ``params``.

  Example:
    >>> import jax.numpy as jnp, asam_jax
    >>> asam_jax.kernel_mask({"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)})
    {'bias': False, 'kernel': True}

  References:
    Kwon et al., ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks, ICML 2021.
  """
  return jax.tree.map(lambda x: np.ndim(x) >= 2, params)


def resolve_mask(mask: Mask | None, params: Any, name: str) -> Any:
  """Expands a mask to one Python bool per leaf of ``params``.

  Args:
    mask: ``None`` (every leaf), a pytree of bools with the structure of
      ``params`` or a prefix of it, or a callable ``params -> such a pytree``,
      as ``optax.masked`` takes.
    params: the parameters the mask refers to.
    name: the argument's name, for the error messages.

  Returns:
    A pytree of Python bools with exactly the structure of ``params``.

  Raises:
    ValueError: the mask's structure does not match ``params``.
    TypeError: a mask leaf is not a bool.
  """
  if mask is None:
    return jax.tree.map(lambda _: True, params)
  if callable(mask):
    mask = mask(params)
  try:
    full = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: m, sub), mask, params)
  except ValueError as e:
    raise ValueError(
      f"{name} must be a pytree of bools with the structure of params (or a "
      f"prefix of it), or a callable params -> such a pytree.\n"
      f"  {name}: {jax.tree.structure(mask)}\n"
      f"  params: {jax.tree.structure(params)}"
    ) from e
  for path, leaf in jax.tree_util.tree_leaves_with_path(full):
    if not isinstance(leaf, (bool, np.bool_)):
      raise TypeError(
        f"{name} leaves must be Python bools known before tracing, got "
        f"{type(leaf).__name__} at {jax.tree_util.keystr(path)}."
      )
  return jax.tree.map(bool, full)


def resolve_masks(
  params: Any, *, adaptive: bool, adaptive_mask: Mask | None, perturb_mask: Mask | None
) -> tuple[Any, Any]:
  """Both masks of a perturbation, one Python bool per leaf of ``params``.

  Args:
    params: the parameters the masks refer to.
    adaptive: whether ``T_w`` scales any leaf; without it no leaf is scaled.
    adaptive_mask: which leaves ``T_w`` scales, in any form :func:`resolve_mask` takes.
    perturb_mask: which leaves are perturbed, likewise.

  Returns:
    ``(perturbed, scaled)``, two pytrees of bools with the structure of ``params``.
  """
  perturbed = resolve_mask(perturb_mask, params, "perturb_mask")
  if adaptive:
    scaled = resolve_mask(adaptive_mask, params, "adaptive_mask")
  else:
    scaled = jax.tree.map(lambda _: False, params)
  return perturbed, scaled
