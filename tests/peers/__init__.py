"""Float64 NumPy ports of the peers' update rules, and the naming bridge to pytrees.

Each module ports one peer's update rule from that peer's own source, in our
own words, as plain functions over ``dict[str, np.ndarray]`` named like
PyTorch's ``named_parameters()`` (``"conv1.weight"``, ``"bn1.weight"``,
``"fc.bias"``), in float64. Nothing here imports ``asam_jax``. The modules:

* :mod:`peers.official_asam`: SamsungLabs/ASAM, the official ASAM and SAM.
* :mod:`peers.davda54_sam`: davda54/sam, SAM with the ``adaptive`` flag.
* :mod:`peers.big_vision_gsam`: google-research/big_vision, GSAM and its trainer.
* :mod:`peers.msam`: MarlonBecker/MSAM, MSAM, AdamW_MSAM and LookSAM.
* :mod:`peers.pytorch_optimizer_looksam`: kozistr/pytorch_optimizer, LookSAM.
* :mod:`peers.fisher_sam`: johnjaejunlee95/torch-unified-SAM-optimization, Fisher SAM.
* :mod:`peers.friendly_sam`: nblt/F-SAM, F-SAM, and the paper's order beside it.
* :mod:`peers.esam`: dydjw9/Efficient_SAM, ESAM, with a closed-form softmax regression.
* :mod:`peers.bayesian_sam`: team-approx-bayes/bayesian-sam, bSAM.
* :mod:`peers.google_sam`: google-research/sam, the data-parallel SAM gradient.

This module holds what they share: :func:`to_named` and :func:`from_named`,
which carry the same weights between a Flax/Equinox pytree and a PyTorch-named
dict, the global norm, and ``torch.optim.SGD``'s step as a base optimizer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

Named = dict[str, np.ndarray]

# The leaf names Flax gives the parameters that PyTorch calls ``weight``:
# Dense/Conv kernels, normalization scales, Embed tables.
FLAX_WEIGHT_NAMES = frozenset({"kernel", "scale", "embedding"})


def _key_name(key: Any) -> str:
  """One path entry as the segment of a dotted PyTorch name."""
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  raise TypeError(f"no PyTorch name for the path entry {key!r}")


def _torch_name(path: tuple[Any, ...]) -> str:
  parts = [_key_name(k) for k in path]
  if parts and parts[-1] in FLAX_WEIGHT_NAMES:
    parts[-1] = "weight"
  return ".".join(parts)


def leaf_names(params: Any) -> list[str]:
  """The PyTorch name of every leaf of ``params``, in the pytree's leaf order.

  ``{"Conv_0": {"kernel": k, "bias": b}}`` gives ``["Conv_0.bias",
  "Conv_0.weight"]``: the path joined by dots, with a last ``kernel``, ``scale``
  or ``embedding`` renamed ``weight``. Equinox modules (attribute paths, whose
  leaves are already called ``weight`` and ``bias``) and lists (indices) work
  the same way. Raises ``ValueError`` when two leaves would get one name.
  """
  names = [_torch_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  if len(set(names)) != len(names):
    raise ValueError(f"two leaves map to one PyTorch name: {sorted(names)}")
  return names


def to_named(params: Any) -> Named:
  """A Flax/Equinox pytree as ``{"Conv_0.weight": float64 array, ...}``.

  Only names change: arrays keep their layout (Flax's ``(h, w, in, out)``
  kernel is not transposed to PyTorch's ``(out, in, h, w)``). Every port's rule
  is element-wise apart from global sums, so the layout does not matter to it.
  """
  leaves = jax.tree.leaves(params)
  return {n: np.asarray(x, np.float64) for n, x in zip(leaf_names(params), leaves)}


def from_named(named: Mapping[str, np.ndarray], like: Any) -> Any:
  """The inverse of :func:`to_named`: ``named``'s arrays in the structure and dtypes of ``like``."""
  names = leaf_names(like)
  if set(names) != set(named):
    raise ValueError(f"names differ: {sorted(set(names) ^ set(named))}")
  leaves, treedef = jax.tree.flatten(like)
  return treedef.unflatten([np.asarray(named[n], np.result_type(x)) for n, x in zip(names, leaves)])


def global_norm(named: Mapping[str, np.ndarray | None]) -> float:
  """``torch.norm(torch.stack([t.norm(p=2) for t in ...]), p=2)``: the l2 norm over every tensor."""
  return float(np.sqrt(sum(np.sum(np.square(t)) for t in named.values() if t is not None)))


def torch_sgd_init(params: Named) -> dict[str, Any]:
  """``torch.optim.SGD``'s state: no momentum buffer until the first step."""
  return {"momentum_buffer": dict.fromkeys(params)}


def torch_sgd(
  params: Named,
  grads: Mapping[str, np.ndarray | None],
  state: dict[str, Any],
  *,
  lr: float,
  momentum: float = 0.0,
  weight_decay: float = 0.0,
  dampening: float = 0.0,
  nesterov: bool = False,
) -> tuple[Named, dict[str, Any]]:
  """One step of ``torch.optim.SGD`` (the base optimizer the PyTorch peers wrap).

  ``d = g + wd w``; ``buf = d`` on the first step, else ``mu buf + (1 - dampening) d``;
  ``d = d + mu buf`` (Nesterov) or ``buf``; ``w <- w - lr d``. Parameters whose
  gradient is ``None`` are skipped, as PyTorch skips them.
  """
  params, bufs = dict(params), dict(state["momentum_buffer"])
  for n, g in grads.items():
    if g is None:
      continue
    d = g + weight_decay * params[n] if weight_decay != 0 else g
    if momentum != 0:
      buf = bufs[n]
      buf = d.copy() if buf is None else momentum * buf + (1 - dampening) * d
      bufs[n] = buf
      d = d + momentum * buf if nesterov else buf
    params[n] = params[n] - lr * d
  return params, {"momentum_buffer": bufs}
