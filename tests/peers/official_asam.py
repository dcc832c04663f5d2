"""The official ASAM code's SAM and ASAM, ported to float64 NumPy.

Source: https://github.com/SamsungLabs/ASAM, file ``asam.py`` (classes ``ASAM``
and ``SAM``, methods ``ascent_step`` and ``descent_step``), snapshot commit
f156a680171db16d551c0d85cba2514fa3bff6a2.

The rule, for the parameters with a gradient (``p.grad is None``: skipped,
neither perturbed nor in the norm), ``g`` their gradient at ``w``:

* ASAM: ``T = |w| + eta`` where ``'weight' in name``, ``T = 1`` elsewhere;
  ``eps = rho T^2 g / (||T g||_2 + 1e-16)``, the norm global over every
  parameter with a gradient.
* SAM: ``eps = rho g / (||g||_2 + 1e-16)``.
* ``ascent_step`` adds ``eps`` to ``w`` (and zeroes the gradients); after the
  caller's second backward pass, ``descent_step`` subtracts the stored ``eps``
  and steps the base optimizer with the gradient taken at ``w + eps``.

Departures from the paper (Kwon et al., ICML 2021, ``T_w = diag(|w|) + eta`` on
every parameter):

* ``T`` is chosen by name, ``'weight' in n``: BatchNorm's and LayerNorm's 1-D
  ``weight`` (Flax's ``scale``) are scaled; biases, and any parameter whose name
  lacks ``weight`` (a ViT's ``pos_embedding``, ``cls_token``), get ``T = 1``, so
  neither ``|b|`` nor ``eta`` enters their perturbation.
* ``eta`` is added inside ``T`` before squaring: ``eps ~ (|w| + eta)^2 g``.
* ``1e-16`` is added to the norm (our ``asam_jax`` divides by ``max(norm, eps)``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from peers import Named, global_norm


def _scaled(name: str, adaptive: bool) -> bool:
  """Whether ``T = |w| + eta`` applies: the official selection by name."""
  return adaptive and "weight" in name


def perturbation(
  params: Mapping[str, np.ndarray],
  grads: Mapping[str, np.ndarray | None],
  *,
  rho: float,
  eta: float = 0.01,
  adaptive: bool = True,
) -> dict[str, np.ndarray | None]:
  """``eps`` of ``ASAM.ascent_step`` (``adaptive``) or ``SAM.ascent_step``.

  Returns ``eps`` by name; ``None`` where the gradient is ``None``.
  """
  # First loop: T g in place of the gradient, and the per-tensor norms.
  t_w = {
    n: np.abs(params[n]) + eta for n, g in grads.items() if g is not None and _scaled(n, adaptive)
  }
  tg = {n: (g * t_w[n] if n in t_w else g) for n, g in grads.items() if g is not None}
  norm = global_norm(tg) + 1e-16
  # Second loop: T (T g) on the weights, then eps = rho / norm times it.
  out: dict[str, np.ndarray | None] = {}
  for n, g in grads.items():
    if g is None:
      out[n] = None
      continue
    out[n] = (tg[n] * t_w[n] if n in t_w else tg[n]) * (rho / norm)
  return out


def ascent_step(
  params: Named,
  grads: Mapping[str, np.ndarray | None],
  *,
  rho: float,
  eta: float = 0.01,
  adaptive: bool = True,
) -> tuple[Named, dict[str, Any]]:
  """``w + eps``, and the state ``descent_step`` needs (the stored ``eps``)."""
  eps = perturbation(params, grads, rho=rho, eta=eta, adaptive=adaptive)
  perturbed = {n: (w + eps[n] if eps.get(n) is not None else w) for n, w in params.items()}
  return perturbed, {"eps": eps}


def descent_step(
  perturbed: Named,
  grads_at_perturbed: Mapping[str, np.ndarray | None],
  state: dict[str, Any],
  base_step: Callable[[Named, Mapping[str, np.ndarray | None]], Named],
) -> Named:
  """Subtracts the stored ``eps`` and applies ``base_step(params, grads)``, the base optimizer."""
  back = {
    n: (w - state["eps"][n] if grads_at_perturbed.get(n) is not None else w)
    for n, w in perturbed.items()
  }
  return base_step(back, grads_at_perturbed)


def step(
  params: Named,
  grad_fn: Callable[[Named], Mapping[str, np.ndarray | None]],
  base_step: Callable[[Named, Mapping[str, np.ndarray | None]], Named],
  *,
  rho: float,
  eta: float = 0.01,
  adaptive: bool = True,
) -> Named:
  """One training step as the repository's ``example_cifar.py`` runs it: ascent, backward, descent."""
  perturbed, state = ascent_step(params, grad_fn(params), rho=rho, eta=eta, adaptive=adaptive)
  return descent_step(perturbed, grad_fn(perturbed), state, base_step)
