"""Fisher SAM: SAM in the geometry of the diagonal empirical Fisher (Kim et al., ICML 2022)."""

from __future__ import annotations

from typing import Any

import optax

from asam_jax._ascent import ScalarOrSchedule, make_ascent
from asam_jax._masks import Mask
from asam_jax._sam import transformation


def fisher_sam(
  rho: ScalarOrSchedule = 0.1,
  eta: ScalarOrSchedule = 1.0,
  *,
  p: float = 2,
  eps: float = 0.0,
  perturb_mask: Mask | None = None,
  axis_name: Any = None,
  sync_perturbation: Any = False,
  has_aux: bool = False,
  ascent_steps: int = 1,
  ascent_projection: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Fisher SAM: the ascent in the ball whose metric is the diagonal empirical Fisher.

  With ``g`` the clean gradient and ``f = 1 + eta g^2`` per coordinate (the
  diagonal empirical Fisher of the batch gradient, damped by 1), the ball is
  ``eps^T f eps <= rho^2`` and its first-order maximizer

  ``eps = rho f^-1 g / sqrt(g^T f^-1 g)``:

  the ball of :func:`asam_jax.asam` with ``T = f^-1/2`` instead of
  ``|w| + eta``, so ``p``, the masks, the devices and ``ascent_steps`` work as
  there (every step in the metric of the clean gradient). Returns
  ``grad L(w + eps)``; put it first in an ``optax.chain``. It costs SAM plus
  the element-wise ``f^-1``. There is no official code; this follows the
  reproduction in johnjaejunlee95/torch-unified-SAM-optimization
  (``FisherSAM.py``), whose radius is ``gamma`` and whose denominator adds
  ``1e-12``, where this divides by the exact norm.

  Args:
    rho: the radius, >= 0, or a schedule (the reproduction's ``gamma``).
    eta: the Fisher's weight in ``f = 1 + eta g^2``, >= 0, or a schedule;
      ``eta = 0`` is SAM.
    p: the norm of the ball: 2, ``float('inf')`` or any real number >= 1.
    eps: as in :func:`asam_jax.sam`.
    perturb_mask: which leaves are perturbed at all.
    axis_name: as in :func:`asam_jax.sam`; ``f`` is each device's own (or the
      synced group's).
    sync_perturbation: as in :func:`asam_jax.sam`.
    has_aux: as in :func:`asam_jax.sam`.
    ascent_steps: as in :func:`asam_jax.sam`.
    ascent_projection: as in :func:`asam_jax.sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``loss_fn=``; its state is a :class:`asam_jax.SAMState`.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, optax, asam_jax
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> loss_fn = lambda p: jnp.sum(p["w"] ** 2)
    >>> tx = optax.chain(asam_jax.fisher_sam(rho=0.1, eta=1.0), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.grad(loss_fn)(params), state, params, loss_fn=loss_fn)
    >>> print(np.asarray(optax.apply_updates(params, updates)["w"]).round(4))
    [ 0.7939 -1.5964]

  References:
    Kim, Li, Hu and Hospedales, Fisher SAM: Information Geometry and
    Sharpness Aware Minimisation, ICML 2022, eq. 5.
  """
  return transformation(
    make_ascent(
      "fisher_sam",
      rho,
      eta,
      geometry="fisher",
      p=p,
      eps=eps,
      perturb_mask=perturb_mask,
      axis_name=axis_name,
      sync_perturbation=sync_perturbation,
      has_aux=has_aux,
      ascent_steps=ascent_steps,
      ascent_projection=ascent_projection,
    )
  )
