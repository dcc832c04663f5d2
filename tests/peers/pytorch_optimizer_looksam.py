"""pytorch_optimizer's LookSAM, ported to float64 NumPy.

Source: https://github.com/kozistr/pytorch_optimizer, file
``pytorch_optimizer/optimizer/sam.py`` (class ``LookSAM``: ``get_step``,
``first_step``, ``second_step``, ``step``; and ``get_global_gradient_norm``),
snapshot commit 7a076d2f8f09735e82f9ec1d2d389ec2526bbdbb.

``step`` below is the number of base-optimizer steps taken so far (``get_step``
reads it from the base optimizer); a step is full when ``step % k == 0``, so
the first step is full. With ``g`` the gradient at ``w``:

* full step, ``first_step``: ``norm = ||(|w| if adaptive else 1) g|| + perturb_eps``
  over every parameter, ``e = rho (w^2 if adaptive else 1) g / norm``; the
  weights move to ``w + e`` and ``g`` is stored. ``second_step``, with ``g_s``
  the gradient at ``w + e``, *per tensor*:
  ``g_v = g_s - ||g_s|| <g/||g||, g_s/||g_s||> g/||g|| = g_s - (<g, g_s>/||g||^2) g``;
  the base optimizer gets ``g_s``;
* other steps, ``first_step`` does nothing and ``second_step`` gives the base
  optimizer, *per tensor*, ``g + alpha ||g|| g_v / (||g_v|| + 1e-8)``, with the
  norms of that tensor alone.

Departures from the paper (Liu et al., CVPR 2022, Algorithm 1, where ``g``,
``g_s`` and ``g_v`` are whole-model vectors):

* the projection and the rescaling are per tensor: each tensor's ``g_v`` is
  orthogonal to that tensor's ``g`` (not only the whole ``g_v`` to the whole
  ``g``), and each tensor's added term has length ``alpha ||g_tensor||``
  rather than ``alpha ||g|| ||g_v_tensor|| / ||g_v||``: the same total length
  ``alpha ||g||``, spread over the tensors differently. The perturbation's
  norm is still global.
* ``adaptive`` is davda54's: ``T = |w|``, no ``eta``.
* The projection divides by ``||g||`` and ``||g_s||`` of each tensor unguarded
  (a tensor with zero gradient gives NaN); the reuse adds ``1e-8`` to ``||g_v||``.
* Usage, not the rule: on reuse steps ``first_step`` returns before its
  ``zero_grad``, so in the documented loops (``loss.backward()`` then
  ``first_step(zero_grad=True)``, a second ``backward()``, ``second_step``; or
  ``backward()`` then ``step(closure)``) ``p.grad`` holds two backward passes at
  the same ``w``, ``2 g``, when ``second_step`` reads it. :func:`train_step` takes
  ``double_backward_on_reuse`` to reproduce that.
* ``use_gc`` (gradient centralization) is not ported; it defaults to off.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from peers import Named, global_norm


def init() -> dict[str, Any]:
  """No state before the first full step."""
  return {"old_p": {}, "old_grad_p": {}, "gv": {}}


def first_step(
  params: Named,
  grads: Mapping[str, np.ndarray],
  state: dict[str, Any],
  *,
  step: int,
  k: int,
  rho: float = 0.1,
  adaptive: bool = False,
  perturb_eps: float = 1e-12,
) -> tuple[Named, dict[str, Any]]:
  """``first_step``: on full steps the weights ``w + e`` and the stored ``w``, ``g``."""
  if step % k != 0:
    return dict(params), state
  norm = global_norm({n: (np.abs(params[n]) if adaptive else 1.0) * g for n, g in grads.items()})
  scale = rho / (norm + perturb_eps)
  state = {
    **state,
    "old_p": {n: params[n].copy() for n in grads},
    "old_grad_p": {n: g.copy() for n, g in grads.items()},
  }
  perturbed = dict(params)
  for n, g in grads.items():
    perturbed[n] = params[n] + (np.square(params[n]) if adaptive else 1.0) * g * scale
  return perturbed, state


def second_step(
  params: Named,
  grads: Mapping[str, np.ndarray],
  state: dict[str, Any],
  *,
  step: int,
  k: int,
  alpha: float = 0.7,
) -> tuple[Named, Named, dict[str, Any]]:
  """``second_step`` up to the base optimizer: ``(weights, gradient for the base step, state)``.

  On reuse steps ``p.data = old_p`` is a no-op: since the last full step
  ``p``'s storage *is* ``old_p`` (``p.data = old_p`` shares it, and the base
  step updates it in place), so the weights stay as they are.
  """
  out_grads: Named = {}
  gv = dict(state["gv"])
  for n, grad in grads.items():
    grad_norm = np.linalg.norm(grad)
    if step % k == 0:
      old = state["old_grad_p"][n]
      g_unit = old / np.linalg.norm(old)
      g_s_unit = grad / grad_norm
      gv[n] = grad - grad_norm * np.sum(g_unit * g_s_unit) * g_unit
      out_grads[n] = grad
    else:
      out_grads[n] = grad + alpha * (grad_norm / (np.linalg.norm(gv[n]) + 1e-8)) * gv[n]
  if step % k == 0:
    params = {**params, **{n: state["old_p"][n] for n in grads}}
  return dict(params), out_grads, {**state, "gv": gv}


def train_step(
  params: Named,
  state: dict[str, Any],
  grad_fn: Callable[[Named], Named],
  base_step: Callable[[Named, Named], Named],
  *,
  step: int,
  k: int = 10,
  rho: float = 0.1,
  alpha: float = 0.7,
  adaptive: bool = False,
  perturb_eps: float = 1e-12,
  double_backward_on_reuse: bool = False,
) -> tuple[Named, dict[str, Any]]:
  """One training step: ``first_step``, the second backward pass, ``second_step``, the base step.

  ``double_backward_on_reuse`` reproduces the documented usage, where on reuse
  steps ``p.grad`` accumulates both backward passes (``2 g``).
  """
  g = grad_fn(params)
  perturbed, state = first_step(
    params, g, state, step=step, k=k, rho=rho, adaptive=adaptive, perturb_eps=perturb_eps
  )
  if step % k == 0:
    second = grad_fn(perturbed)
  else:
    second = {n: 2 * v for n, v in g.items()} if double_backward_on_reuse else g
  params, grads, state = second_step(perturbed, second, state, step=step, k=k, alpha=alpha)
  return base_step(params, grads), state
