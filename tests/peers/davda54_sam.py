"""davda54/sam's SAM (and its ``adaptive=True`` ASAM), ported to float64 NumPy.

Source: https://github.com/davda54/sam, file ``sam.py`` (class ``SAM``:
``first_step``, ``second_step``, ``_grad_norm``), snapshot commit
3c3afdbd71cff2462ec91c734b3d1170bd0f3707.

The rule, over the parameters with a gradient (``p.grad is None``: skipped),
``g`` the gradient at ``w``:

* ``norm = || (|w| if adaptive else 1) * g ||_2``, global over every parameter
  group;
* ``eps = rho (w^2 if adaptive else 1) g / (norm + 1e-12)``;
* ``first_step`` stores ``w`` and moves to ``w + eps``; after the second
  backward pass ``second_step`` restores the stored ``w`` (not ``w + eps -
  eps``) and steps the base optimizer with the gradient at ``w + eps``.

Departures from the paper (Kwon et al., ICML 2021, ``T_w = diag(|w|) + eta``):

* ``adaptive=True`` has no ``eta``: ``T = |w|`` on every parameter, biases and
  normalization weights included (a zero weight is never perturbed).
* ``1e-12`` is added to the norm rather than taken as its floor.
* ``rho`` is per parameter group (one group here), the norm is not.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from peers import Named, global_norm


def perturbation(
  params: Mapping[str, np.ndarray],
  grads: Mapping[str, np.ndarray | None],
  *,
  rho: float,
  adaptive: bool = False,
) -> dict[str, np.ndarray | None]:
  """``e_w`` of ``first_step`` by name; ``None`` where the gradient is ``None``."""
  norm = global_norm(
    {n: (np.abs(params[n]) if adaptive else 1.0) * g for n, g in grads.items() if g is not None}
  )
  scale = rho / (norm + 1e-12)
  return {
    n: None if g is None else (np.square(params[n]) if adaptive else 1.0) * g * scale
    for n, g in grads.items()
  }


def first_step(
  params: Named, grads: Mapping[str, np.ndarray | None], *, rho: float, adaptive: bool = False
) -> tuple[Named, Named]:
  """``(w + e_w, old_p)``: the climb to the local maximum and the weights to come back to."""
  e_w = perturbation(params, grads, rho=rho, adaptive=adaptive)
  old_p = {n: w.copy() for n, w in params.items() if e_w.get(n) is not None}
  return {n: (w + e_w[n] if e_w.get(n) is not None else w) for n, w in params.items()}, old_p


def second_step(
  perturbed: Named,
  old_p: Named,
  grads_at_perturbed: Mapping[str, np.ndarray | None],
  base_step: Callable[[Named, Mapping[str, np.ndarray | None]], Named],
) -> Named:
  """Back to the stored ``w`` (where the gradient is not ``None``), then the base step."""
  back = {
    n: (old_p[n] if grads_at_perturbed.get(n) is not None else w) for n, w in perturbed.items()
  }
  return base_step(back, grads_at_perturbed)


def step(
  params: Named,
  grad_fn: Callable[[Named], Mapping[str, np.ndarray | None]],
  base_step: Callable[[Named, Mapping[str, np.ndarray | None]], Named],
  *,
  rho: float,
  adaptive: bool = False,
) -> Named:
  """``SAM.step(closure)``: first step, the closure's backward pass, second step."""
  perturbed, old_p = first_step(params, grad_fn(params), rho=rho, adaptive=adaptive)
  return second_step(perturbed, old_p, grad_fn(perturbed), base_step)
