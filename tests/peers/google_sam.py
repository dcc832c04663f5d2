"""The SAM authors' data-parallel SAM gradient (JAX, pmap), ported to float64 NumPy.

Source: https://github.com/google-research/sam, file
``sam_jax/training_utils/flax_training.py`` (``train_step`` and its
``get_sam_gradient``, ``dual_vector``, ``local_replica_groups``, the flags
``sam_rho``, ``sync_perturbations``, ``inner_group_size``), snapshot commit
dae9904c4cf3a57a304f7b04cecffe371679c702.

``train_step`` runs under ``pmap`` over the axis ``'batch'``, one replica per
device, each with its own slice of the batch. With ``rho = sam_rho > 0``, on
replica ``r`` with gradient function ``grad_r``:

* ``g_r = grad_r(w)``;
* ``sync_perturbations=False`` (the default): ``g_r`` as it is (m-sharpness
  with ``m`` the per-replica batch);
  ``sync_perturbations=True, inner_group_size=None``: ``pmean`` over every
  replica;
  ``sync_perturbations=True, inner_group_size=k``: ``pmean`` within ``r``'s
  group of :func:`local_replica_groups`;
* ``dual_vector``: ``g / ||g||``, the norm over every leaf, no epsilon (NaN
  when ``g = 0``);
* ``h_r = grad_r(w + rho g / ||g||)``;

and the update's gradient is ``pmean`` over every replica of ``h_r``.

``local_replica_groups(k)``: ``k`` must be a power of two from 2 up and divide
the device count ``R``. For ``k <= 4`` the groups are consecutive replica
ids, ``[[o k + i for i in range(k)] for o in range(R // k)]``, whatever the
layout. For ``k > 4`` they follow the TPU torus (trays, rows of hosts) and
depend on ``device.coords`` and ``device.core_on_chip``. The function reads
those attributes of the last device before it looks at ``k``, so where the
devices lack them it raises ``AttributeError`` for every ``k`` (jax's CPU
devices do); the consecutive groups are what ``k <= 4`` gives on a TPU.

Left out: the loss's weight decay ``0.5 l2_reg ||w||^2`` (part of ``grad_r``
in their code, at ``w`` and at the noised weights alike; our ports take
``grad_r`` as given), gradient clipping after the final ``pmean``, the
optimizer (``flax.optim.Momentum``, Nesterov), the learning-rate schedule,
batch-norm state and Shake-Shake's ``true_gradient`` flag.

Departures from the paper (Foret et al., ICLR 2021):

* ``dual_vector`` divides by ``||g||`` with no epsilon.
* ``sync_perturbations=False`` is the paper's m-sharpness with ``m`` the
  per-device batch; ``inner_group_size`` syncs within groups of replicas.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from peers import Named, global_norm

GradFn = Callable[[Named], Named]


def dual_vector(y: Named) -> Named:
  """``y / ||y||``, ``||y||`` over every leaf; no guard against ``||y|| = 0``."""
  norm = global_norm(y)
  return {n: v / norm for n, v in y.items()}


def local_replica_groups(num_replicas: int, inner_group_size: int) -> list[list[int]]:
  """``local_replica_groups(k)`` for ``k <= 4``: consecutive replica ids.

  Raises ``ValueError`` where theirs asserts (``k`` not a power of two from 2
  up, or not dividing ``num_replicas``), ``NotImplementedError`` for ``k > 4``
  (a TPU-torus layout).
  """
  k = inner_group_size
  outer, ragged = divmod(num_replicas, k)
  if ragged:
    raise ValueError("inner group size must evenly divide global device count")
  if k not in [2**i for i in range(1, 15)]:
    raise ValueError("inner group size must be a power of two")
  if k > 4:
    raise NotImplementedError("for inner_group_size > 4 the groups follow the TPU torus")
  return [[o * k + i for i in range(k)] for o in range(outer)]


def pmean(values: Sequence[Named], groups: Sequence[Sequence[int]] | None = None) -> list[Named]:
  """``jax.lax.pmean(values, 'batch', axis_index_groups=groups)``: each replica's group mean."""
  if groups is None:
    groups = [list(range(len(values)))]
  means: dict[int, Named] = {}
  for group in groups:
    mean = {n: np.mean([values[r][n] for r in group], axis=0) for n in values[group[0]]}
    means.update(dict.fromkeys(group, mean))
  if sorted(means) != list(range(len(values))):
    raise ValueError("the groups do not cover every replica")
  return [means[r] for r in range(len(values))]


def ascent_gradients(
  grad_fns: Sequence[GradFn],
  params: Named,
  *,
  sync_perturbations: bool = False,
  inner_group_size: int | None = None,
) -> list[Named]:
  """Each replica's gradient after the optional sync, before ``dual_vector``."""
  grads = [f(params) for f in grad_fns]
  if not sync_perturbations:
    return grads
  if inner_group_size is None:
    return pmean(grads)
  return pmean(grads, local_replica_groups(len(grad_fns), inner_group_size))


def sam_gradient(
  grad_fns: Sequence[GradFn],
  params: Named,
  *,
  rho: float,
  sync_perturbations: bool = False,
  inner_group_size: int | None = None,
) -> Named:
  """The gradient ``train_step`` hands the optimizer (before clipping), ``grad_fns[r]`` replica ``r``'s."""
  ascent = ascent_gradients(
    grad_fns, params, sync_perturbations=sync_perturbations, inner_group_size=inner_group_size
  )
  per_replica = []
  for f, g in zip(grad_fns, ascent):
    unit = dual_vector(g)
    per_replica.append(f({n: w + rho * unit[n] for n, w in params.items()}))
  return pmean(per_replica)[0]
