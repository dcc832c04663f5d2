"""The ESAM authors' ESAM, ported to float64 NumPy, with a softmax regression to drive it.

Source: https://github.com/dydjw9/Efficient_SAM, file ``utils/Esam.py`` (class
``ESAM``: ``first_step``, ``second_step``, ``step``, ``_grad_norm``) and
``train.py`` (how it is built and called), snapshot commit
1e06840c466beaebfafb049096d6a1733cb77a8c.

One step, ``g`` the gradient of the batch's mean loss at ``w``:

* Stochastic weight perturbation, per *tensor*: only the tensors whose
  ``requires_grad`` is on get a gradient in the first backward pass. The
  norm is over those tensors, ``norm = || (|w| if adaptive else 1) g ||``;
  ``scale = rho / (norm + 1e-7) / beta``; ``eps = (w^2 if adaptive else 1) g
  scale`` on them and 0 on the others (not perturbed).
* Which tensors those are is drawn at the end of the *previous* step: after
  moving back, ``second_step`` switches ``requires_grad`` off for each tensor
  with ``random.random() > beta`` (Python's ``random``, one draw per tensor in
  ``named_parameters()`` order), and ``first_step`` switches every tensor back
  on before the second pass. On the very first step no draw has happened yet
  and every tensor is selected (the model's default ``requires_grad=True``),
  but the scale is still divided by ``beta``, so the first perturbation has
  length ``rho / beta``, as every later one has over the selected tensors.
* Sharpness-sensitive data selection: per-example losses ``l_before`` at ``w``
  (the first forward pass) and ``l_after`` at ``w + eps``;
  ``sharpness = l_after - l_before``. With ``gamma >= 0.99`` every example is
  kept; otherwise ``position = int(n gamma)``, ``cutoff`` the
  ``position``-th largest sharpness (``topk(sharpness, position)[-1]``), and
  the examples with sharpness *strictly greater* than ``cutoff`` are kept:
  ``position - 1`` of them when there are no ties (:func:`code_kept`).
* The second gradient is that of the mean loss over the kept examples, at
  ``w + eps``, over every tensor. ``second_step`` subtracts ``eps``
  (``w + eps - eps``, not a stored copy) and steps the base optimizer.

How ``train.py`` builds it: the base optimizer is
``torch.optim.SGD(lr, momentum=0.9, weight_decay)`` (weight decay at the
restored ``w``, all tensors), the loss ``CrossEntropyLoss(reduction="none")``;
``run.sh`` uses ``beta=0.5, gamma=0.5, rho=0.1`` (or ``beta=0.6``,
``rho=0.05``), ``lr=0.05``, ``wd=1e-3``, a per-epoch cosine schedule.

The port takes the per-step selection as an input (``selected``, name ->
bool) instead of drawing it; :func:`first_selection` is step 1's,
:func:`draw_selection` the authors' draw from a ``random.Random``. The
problem is given as two functions (:data:`LossesFn`, :data:`SubsetGradFn`);
:func:`softmax_regression` builds them for ``nn.Linear`` + cross-entropy in
closed form.

Departures from the paper (Du et al., "Efficient Sharpness-aware Minimization
for Improved Training of Neural Networks", ICLR 2022: SWP perturbs by
``(rho / beta) m * g / ||g||`` with a Bernoulli(``beta``) mask ``m`` per weight;
SDS keeps the ``gamma n`` examples of largest sharpness):

* SWP selects whole tensors, not individual weights, and the selection used at
  step ``t`` is drawn at the end of step ``t - 1``; every tensor is selected
  on the first step.
* The norm is over the selected tensors' gradient only (the others are not
  computed), not the whole gradient's, so ``||eps|| = rho / beta`` (without
  ``adaptive``) whatever is selected.
* ``1e-7`` is added to the norm.
* SDS keeps the examples strictly above the ``int(n gamma)``-th largest
  sharpness: ``int(n gamma) - 1`` examples without ties (fewer with ties, none
  when all are equal, and ``n gamma < 1`` fails), not ``int(n gamma)``; and
  every example once ``gamma >= 0.99``. :func:`paper_kept` is the paper's count.
* With no tensor selected (probability ``(1 - beta)^k`` for ``k`` tensors) their
  first backward pass fails (the loss does not require grad); the port gives
  ``eps = 0``.
* With no example kept the mean loss is NaN and PyTorch's gradient is 0 on
  every tensor, so the step is the base optimizer's decay and momentum alone.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from peers import Named, global_norm

LossesFn = Callable[[Named], np.ndarray]
"""Per-example losses at given weights, shape ``(n,)``, for the whole batch."""

SubsetGradFn = Callable[[Named, np.ndarray], Named]
"""The gradient of the mean loss over the examples ``idx`` (an index array into the batch)."""

BaseStep = Callable[[Named, Mapping[str, np.ndarray]], Named]


# --- the problem ------------------------------------------------------------------


def softmax_regression(x: np.ndarray, y: np.ndarray) -> tuple[LossesFn, SubsetGradFn]:
  """``nn.Linear(d, c)`` + ``CrossEntropyLoss(reduction="none")`` on ``(x, y)``, in closed form.

  ``x`` is ``(n, d)``, ``y`` integer labels ``(n,)``; the parameters are
  ``{"fc.weight": (c, d), "fc.bias": (c,)}`` (PyTorch's layout, logits
  ``x W^T + b``). Per-example loss ``logsumexp(z) - z_y``; the gradient of the
  mean over ``idx`` is ``(p - onehot)^T x / |idx|`` and ``sum(p - onehot) / |idx|``
  with ``p = softmax(z)``, and 0 for an empty ``idx`` (PyTorch's gradient of
  the NaN mean over no examples).
  """
  x = np.asarray(x, np.float64)
  y = np.asarray(y)

  def logits(params: Named, rows: np.ndarray) -> np.ndarray:
    return x[rows] @ params["fc.weight"].T + params["fc.bias"]

  def losses(params: Named) -> np.ndarray:
    z = logits(params, np.arange(len(x)))
    zmax = z.max(axis=1, keepdims=True)
    lse = np.log(np.sum(np.exp(z - zmax), axis=1)) + zmax[:, 0]
    return lse - z[np.arange(len(x)), y]

  def grad(params: Named, idx: np.ndarray) -> Named:
    idx = np.asarray(idx, dtype=np.int64)
    if idx.size == 0:
      return {n: np.zeros_like(w) for n, w in params.items()}
    z = logits(params, idx)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(idx)), y[idx]] -= 1.0
    p /= len(idx)
    return {"fc.weight": p.T @ x[idx], "fc.bias": p.sum(axis=0)}

  return losses, grad


# --- stochastic weight perturbation ---------------------------------------------


def first_selection(names: Iterable[str]) -> dict[str, bool]:
  """Step 1's selection: every tensor (no draw has happened yet)."""
  return dict.fromkeys(names, True)


def draw_selection(names: Iterable[str], *, beta: float, rng: random.Random) -> dict[str, bool]:
  """``second_step``'s draw for the next step: off where ``rng.random() > beta``, one draw per name."""
  return {n: not rng.random() > beta for n in names}


def perturbation(
  params: Named,
  grads: Mapping[str, np.ndarray],
  selected: Mapping[str, bool],
  *,
  rho: float,
  beta: float,
  adaptive: bool = False,
) -> Named:
  """``e_w`` of ``first_step``: over the selected tensors, 0 on the others."""
  on = [n for n in params if selected[n]]
  norm = global_norm({n: (np.abs(params[n]) if adaptive else 1.0) * grads[n] for n in on})
  scale = rho / (norm + 1e-7) / beta
  return {
    n: ((np.square(w) if adaptive else 1.0) * grads[n] * scale if selected[n] else np.zeros_like(w))
    for n, w in params.items()
  }


# --- sharpness-sensitive data selection -----------------------------------------


def code_kept(sharpness: np.ndarray, gamma: float) -> np.ndarray:
  """The indices ``step`` keeps, ascending: all if ``gamma >= 0.99``, else strictly above the cutoff."""
  sharpness = np.asarray(sharpness)
  n = len(sharpness)
  if gamma >= 0.99:
    return np.arange(n)
  position = int(n * gamma)
  if position < 1:
    raise ValueError(f"int(n * gamma) = {position}: their topk(..., 0)[-1] raises IndexError")
  cutoff = np.sort(sharpness)[::-1][position - 1]
  return np.nonzero(sharpness > cutoff)[0]


def paper_kept(sharpness: np.ndarray, gamma: float) -> np.ndarray:
  """The paper's count: the ``int(n gamma)`` largest sharpness values (ties: lower index first), ascending."""
  sharpness = np.asarray(sharpness)
  k = int(len(sharpness) * gamma)
  order = np.argsort(-sharpness, kind="stable")
  return np.sort(order[:k])


# --- the step --------------------------------------------------------------------


def step(
  params: Named,
  losses_fn: LossesFn,
  grad_fn: SubsetGradFn,
  base_step: BaseStep,
  *,
  selected: Mapping[str, bool],
  rho: float = 0.05,
  beta: float = 1.0,
  gamma: float = 1.0,
  adaptive: bool = False,
  keep: Callable[[np.ndarray, float], np.ndarray] = code_kept,
) -> tuple[Named, dict[str, Any]]:
  """``ESAM.step()`` with this step's tensor selection given: ``(new weights, what it used)``.

  The second element holds ``"perturbation"`` (``e_w`` by name),
  ``"sharpness"`` (per example) and ``"kept"`` (the kept indices). ``keep``
  picks the examples (:func:`code_kept`, or :func:`paper_kept` for the
  paper's count); ``base_step`` is the base optimizer's step
  (``peers.torch_sgd`` with ``momentum=0.9`` and ``weight_decay``).
  """
  all_examples = np.arange(len(losses_fn(params)))
  l_before = losses_fn(params)
  grads = grad_fn(params, all_examples)
  e_w = perturbation(params, grads, selected, rho=rho, beta=beta, adaptive=adaptive)
  perturbed = {n: w + e_w[n] for n, w in params.items()}
  sharpness = losses_fn(perturbed) - l_before
  kept = keep(sharpness, gamma)
  grads_at_perturbed = grad_fn(perturbed, kept)
  back = {n: w - e_w[n] for n, w in perturbed.items()}
  info = {"perturbation": e_w, "sharpness": sharpness, "kept": kept}
  return base_step(back, grads_at_perturbed), info
