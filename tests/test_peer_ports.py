"""By-hand checks of the float64 ports in tests/peers/ that tests/test_peers.py does not cover.

Each test works a small case out by hand (closed forms on quadratics and a
softmax regression) and compares the port with it, so that the ports can be
trusted as references for asam_jax. Nothing here imports asam_jax.
"""

import math

import numpy as np
import pytest
from peers import (
  fisher_sam,
  torch_sgd,
  torch_sgd_init,
)


def sgd_base(**kw):
  """torch.optim.SGD as the ports' base_step, with its state kept in a closure."""
  state = [None]

  def base_step(params, grads):
    if state[0] is None:
      state[0] = torch_sgd_init(params)
    params, state[0] = torch_sgd(params, grads, state[0], **kw)
    return params

  return base_step


def quadratic(a, c=0.0):
  """The gradient of 0.5 a w^2 + c w on one tensor named fc.weight."""
  return lambda p: {"fc.weight": a * p["fc.weight"] + c}


# --- Fisher SAM (torch-unified-SAM-optimization) --------------------------------------


def test_fisher_sam_port_by_hand():
  """eps = gamma (g / f) / (sqrt(g^T f^-1 g) + 1e-12), f = 1 + eta g^2; None gradients skipped."""
  grads = {"fc.weight": np.array([1.0, -2.0]), "fc.bias": np.array([0.0]), "unused": None}
  # f = [1.5, 3], g / f = [2/3, -2/3], g^T f^-1 g = 1/1.5 + 4/3 = 2.
  assert fisher_sam.denominator(grads, eta=0.5) == pytest.approx(math.sqrt(2), rel=1e-15)
  e = fisher_sam.perturbation(grads, gamma=0.1, eta=0.5)
  np.testing.assert_allclose(e["fc.weight"], 0.1 * np.array([2, -2]) / 3 / math.sqrt(2), rtol=1e-12)
  np.testing.assert_array_equal(e["fc.bias"], [0.0])
  assert e["unused"] is None
  # eta = 0 is SAM with radius gamma.
  e = fisher_sam.perturbation(grads, gamma=0.1, eta=0.0)
  np.testing.assert_allclose(e["fc.weight"], 0.1 * np.array([1, -2]) / math.sqrt(5), rtol=1e-12)
  # A large Fisher coefficient flattens the direction toward sign(g): (g / f) ~ 1 / (eta g).
  e = fisher_sam.perturbation({"w": np.array([1.0, -2.0])}, gamma=1.0, eta=1e8)["w"]
  np.testing.assert_allclose(e / np.linalg.norm(e), np.array([2.0, -1.0]) / math.sqrt(5), rtol=1e-6)

  # One step: back to a copy of w, then SGD with weight decay and momentum at w.
  w = {"fc.weight": np.array([1.0, -2.0, 0.5]), "unused": np.array([3.0])}
  a, gamma, eta, lr, wd = np.array([1.0, 3.0, -2.0]), 0.2, 0.7, 0.1, 0.01

  def grad_fn(p):
    return {"fc.weight": a * p["fc.weight"], "unused": None}

  base = sgd_base(lr=lr, momentum=0.9, weight_decay=wd)
  w1 = fisher_sam.step(w, grad_fn, base, gamma=gamma, eta=eta)
  g = a * w["fc.weight"]
  f = 1 + eta * g**2
  eps = gamma * (g / f) / (np.sqrt(np.sum(g**2 / f)) + 1e-12)
  d1 = a * (w["fc.weight"] + eps) + wd * w["fc.weight"]
  np.testing.assert_allclose(w1["fc.weight"], w["fc.weight"] - lr * d1, rtol=1e-12)
  assert w1["unused"] is w["unused"]  # no gradient: neither perturbed nor stepped
  # Step 2: momentum buffer 0.9 d1 + d2.
  w2 = fisher_sam.step(w1, grad_fn, base, gamma=gamma, eta=eta)
  g = a * w1["fc.weight"]
  f = 1 + eta * g**2
  eps = gamma * (g / f) / (np.sqrt(np.sum(g**2 / f)) + 1e-12)
  d2 = a * (w1["fc.weight"] + eps) + wd * w1["fc.weight"]
  np.testing.assert_allclose(w2["fc.weight"], w1["fc.weight"] - lr * (0.9 * d1 + d2), rtol=1e-12)
  # second_step restores the stored copy exactly, not w + eps - eps.
  perturbed, old_p = fisher_sam.first_step(w, grad_fn(w), gamma=gamma, eta=eta)
  back = fisher_sam.second_step(perturbed, old_p, grad_fn(perturbed), lambda p, g: p)
  np.testing.assert_array_equal(back["fc.weight"], w["fc.weight"])
