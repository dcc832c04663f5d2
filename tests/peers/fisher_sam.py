"""Fisher SAM as torch-unified-SAM-optimization writes it, ported to float64 NumPy.

Source: https://github.com/johnjaejunlee95/torch-unified-SAM-optimization, file
``src/sam_optim/FisherSAM.py`` (class ``FisherSAM``: ``first_step``,
``second_step``, ``_compute_denominator``), with ``main.py``,
``src/utils/training_utils.py`` (``build_base_optimizer``,
``build_optimizer_and_scheduler``, ``train_one_epoch``) and
``src/sam_optim/__init__.py`` (the factory that filters the keyword
arguments) for how it is built and called; snapshot commit
db62e4c178958fe82557f4fe7cf82de93a9137e0. Kim et al. (ICML 2022) published no
code; this reproduction is the reference.

The rule, over the parameters with a gradient (``p.grad is None``: skipped,
neither perturbed nor in the sum), ``g`` their gradient at ``w``:

* ``f = 1 + eta g^2`` per coordinate (the squared mini-batch gradient as the
  Fisher diagonal);
* ``denom = sqrt(sum over every parameter of g^2 / f)``, global over every
  parameter group;
* ``eps = gamma (g / f) / (denom + 1e-12)``: ``gamma`` is the radius,
  ``eta`` the Fisher coefficient;
* ``first_step`` stores ``w`` and moves to ``w + eps``; after the second
  backward pass ``second_step`` restores the stored ``w`` (a copy, not
  ``w + eps - eps``) and steps the base optimizer with the gradient taken at
  ``w + eps``.

How ``main.py`` builds it: the base optimizer is ``torch.optim.SGD(lr,
momentum, weight_decay)`` (``--optimizer sgd``, the default; ``momentum=0.9``,
``weight_decay=5e-4``, no dampening, no Nesterov), or ``torch.optim.Adam(lr,
weight_decay)`` with ``--optimizer adam``; the weight decay is the base
optimizer's, ``d = g + wd w`` at the restored ``w``. ``gamma`` and ``eta``
come from ``--gamma`` (default 0.1) and ``--eta`` (default 0.2; the class
default is 1.0); ``--rho`` does not reach Fisher SAM. The learning rate
follows a per-epoch cosine schedule with warmup on the base optimizer.

Departures from the paper (Kim et al., "Fisher SAM: Information Geometry and
Sharpness Aware Minimization", ICML 2022,
``eps = gamma f^-1 g / sqrt(g^T f^-1 g)``, ``f = 1 + eta g^2``):

* ``1e-12`` is added to ``sqrt(g^T f^-1 g)`` (no effect unless ``g`` is about 0).
* The radius is ``gamma`` per parameter group, the Fisher coefficient ``eta``
  per group too, the sum under the square root is global.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from peers import Named

GradFn = Callable[[Named], Mapping[str, np.ndarray | None]]
BaseStep = Callable[[Named, Mapping[str, np.ndarray | None]], Named]


def denominator(grads: Mapping[str, np.ndarray | None], *, eta: float) -> float:
  """``_compute_denominator``: ``sqrt(sum g^2 / (1 + eta g^2))`` over the gradients that exist."""
  total = sum(
    float(np.sum(g * (1.0 / (1.0 + eta * g**2)) * g)) for g in grads.values() if g is not None
  )
  return float(np.sqrt(total))


def perturbation(
  grads: Mapping[str, np.ndarray | None], *, gamma: float, eta: float
) -> dict[str, np.ndarray | None]:
  """``e_w`` of ``first_step`` by name; ``None`` where the gradient is ``None``."""
  scale = gamma / (denominator(grads, eta=eta) + 1e-12)
  return {
    n: None if g is None else (1.0 / (1.0 + eta * g**2)) * g * scale for n, g in grads.items()
  }


def first_step(
  params: Named, grads: Mapping[str, np.ndarray | None], *, gamma: float, eta: float
) -> tuple[Named, Named]:
  """``(w + e_w, old_p)``: the perturbed weights and the weights to come back to."""
  e_w = perturbation(grads, gamma=gamma, eta=eta)
  old_p = {n: w.copy() for n, w in params.items() if e_w.get(n) is not None}
  return {n: (w + e_w[n] if e_w.get(n) is not None else w) for n, w in params.items()}, old_p


def second_step(
  perturbed: Named,
  old_p: Named,
  grads_at_perturbed: Mapping[str, np.ndarray | None],
  base_step: BaseStep,
) -> Named:
  """Back to the stored ``w`` (where the gradient is not ``None``), then the base step."""
  back = {
    n: (old_p[n] if grads_at_perturbed.get(n) is not None else w) for n, w in perturbed.items()
  }
  return base_step(back, grads_at_perturbed)


def step(
  params: Named, grad_fn: GradFn, base_step: BaseStep, *, gamma: float = 0.1, eta: float = 1.0
) -> Named:
  """``FisherSAM.step(closure)``: first step, the closure's backward pass, second step.

  ``grad_fn`` is the batch's gradient at given weights; ``base_step`` the base
  optimizer's step (``peers.torch_sgd`` with ``momentum`` and ``weight_decay``
  as ``main.py`` builds it, its state kept by the caller).
  """
  perturbed, old_p = first_step(params, grad_fn(params), gamma=gamma, eta=eta)
  return second_step(perturbed, old_p, grad_fn(perturbed), base_step)
