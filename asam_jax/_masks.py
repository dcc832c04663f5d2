"""Masks that choose which leaves are perturbed and which are scaled by T_w."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

Mask = Any | Callable[[Any], Any]


def kernel_mask(params: Any, *, stacked_axes: Any = None) -> Any:
  """Selects the leaves with two or more dimensions: weight matrices and kernels.

  A shape rule, for ``adaptive_mask``: biases, normalization scales and other
  1-D parameters get ``T = 1``. It is *not* the official ASAM code's
  convention, which selects by name and so also scales BatchNorm's and
  LayerNorm's 1-D ``weight`` (and leaves a 2-D position embedding unscaled);
  :func:`weight_mask` reproduces that. The two agree on models without
  normalization layers or free-standing 2-D parameters. The default of
  :func:`asam_jax.asam` scales every leaf, which is the paper's
  ``T_w = diag(|w| + eta)`` and the only choice that keeps the perturbed loss
  invariant when a neuron's incoming weights *and bias* are rescaled.

  Layers stacked for ``lax.scan`` (``nn.scan``, ``nnx.scan``, ``nnx.vmap``)
  carry a leading layer axis, so a stacked bias is 2-D: say how many leading
  axes are layer axes with ``stacked_axes``, and only the dimensions after
  them count. A leaf named ``bias`` or ``scale`` with two or more dimensions
  is refused while ``stacked_axes`` is not given, since it is either stacked
  or a multi-dimensional bias (``nn.DenseGeneral``'s), which the caller must
  tell apart.

  Args:
    params: a pytree of arrays.
    stacked_axes: the number of leading layer axes: an int for every leaf, or
      a pytree prefix of ``params`` with an int per subtree (``{"embed": 0,
      "blocks": 1}``). ``None`` (the default) means 0 and refuses the
      ambiguous leaves above.

  Returns:
    A pytree of Python bools with the structure of ``params``.

  Raises:
    ValueError: a ``bias`` or ``scale`` leaf with two or more dimensions and no
      ``stacked_axes``.

  Example:
    >>> import functools, jax.numpy as jnp, asam_jax
    >>> asam_jax.kernel_mask({"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)})
    {'bias': False, 'kernel': True}
    >>> stacked = {"kernel": jnp.ones((4, 3, 2)), "bias": jnp.ones((4, 2))}  # 4 scanned layers
    >>> asam_jax.kernel_mask(stacked, stacked_axes=1)
    {'bias': False, 'kernel': True}
    >>> adaptive_mask = functools.partial(asam_jax.kernel_mask, stacked_axes=1)  # for asam

  References:
    Kwon et al., ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks, ICML 2021.
  """
  if stacked_axes is None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
      if _leaf_name(path) in ("bias", "scale") and np.ndim(leaf) >= 2:
        raise ValueError(
          f"kernel_mask found {jax.tree_util.keystr(path)} with shape {np.shape(leaf)}: a "
          f"{_leaf_name(path)} with two or more dimensions, which its shape rule would scale "
          "as a kernel. If the params are layers stacked for lax.scan (nn.scan, nnx.scan, "
          "nnx.vmap), say how many leading axes are layer axes: "
          "functools.partial(asam_jax.kernel_mask, stacked_axes=1) (or a pytree prefix, "
          "{'embed': 0, 'blocks': 1}). If it is a genuinely multi-dimensional bias to be "
          "scaled as a kernel, pass stacked_axes=0."
        )
    stacked_axes = 0
  try:
    counts = jax.tree.map(
      lambda n, sub: jax.tree.map(lambda _: n, sub), stacked_axes, params, is_leaf=_is_count
    )
  except ValueError as e:
    raise ValueError(
      "stacked_axes must be an int or a pytree prefix of params with an int per subtree.\n"
      f"  stacked_axes: {jax.tree.structure(stacked_axes)}\n"
      f"  params: {jax.tree.structure(params)}"
    ) from e
  return jax.tree.map(lambda x, n: np.ndim(x) - n >= 2, params, counts)


def _is_count(x: Any) -> bool:
  return isinstance(x, int)


# The names Flax (Linen and NNX) and Equinox give the parameters that PyTorch
# calls ``weight``: dense and conv kernels, normalization scales, embeddings.
WEIGHT_NAMES = frozenset({"kernel", "scale", "embedding", "weight"})
# Wrappers whose leaf is the parameter itself (NNX's Variable, in a State).
_WRAPPER_NAMES = frozenset({"value", "raw_value"})


def _leaf_name(path: tuple[Any, ...]) -> str | None:
  """The name of the parameter a key path ends at: its last named key, past wrappers."""
  for key in reversed(path):
    name = getattr(key, "key", getattr(key, "name", None))
    if isinstance(name, str) and name not in _WRAPPER_NAMES:
      return name
  return None


def weight_mask(params: Any) -> Any:
  """Selects the leaves PyTorch would name ``weight``: the official ASAM code's convention.

  The official ASAM code (SamsungLabs/ASAM) scales a parameter by
  ``|w| + eta`` when ``'weight' in name``: the weights of linear and
  convolution layers, and the 1-D ``weight`` of BatchNorm and LayerNorm;
  biases and free-standing parameters (a ViT's position embedding or class
  token) get ``T = 1``. Flax and Equinox name those leaves differently, so
  this mask selects a leaf by the last name on its path:

  * ``kernel`` (Flax Dense and Conv), ``scale`` (Flax BatchNorm, LayerNorm,
    GroupNorm, RMSNorm), ``embedding`` (Flax Embed), ``weight`` (Equinox
    Linear, Conv, LayerNorm, BatchNorm, Embedding): selected;
  * everything else, ``bias`` and names such as ``pos_embedding`` or ``cls``:
    not selected.

  Pass it as ``adaptive_mask``. Where the names differ from these (a custom
  module), build the mask yourself: any pytree of bools, or a callable of
  params, works.

  Args:
    params: a pytree of arrays whose paths end in parameter names: dicts (Flax
      Linen), ``nnx.State`` (NNX) or Equinox modules.

  Returns:
    A pytree of Python bools with the structure of ``params``.

  Example:
    >>> import jax.numpy as jnp, asam_jax
    >>> params = {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)},
    ...           "LayerNorm_0": {"scale": jnp.ones(2), "bias": jnp.ones(2)},
    ...           "pos_embedding": jnp.ones((4, 2))}
    >>> asam_jax.weight_mask(params)
    {'Dense_0': {'bias': False, 'kernel': True}, 'LayerNorm_0': {'bias': False, 'scale': True}, 'pos_embedding': False}

  References:
    Kwon et al., ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks, ICML 2021; the official
    code, https://github.com/SamsungLabs/ASAM (``asam.py``).
  """
  return jax.tree_util.tree_map_with_path(lambda path, _: _leaf_name(path) in WEIGHT_NAMES, params)


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
