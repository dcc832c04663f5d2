"""By-hand checks of the float64 ports in tests/peers/ that tests/test_peers.py does not cover.

Each test works a small case out by hand (closed forms on quadratics and a
softmax regression) and compares the port with it, so that the ports can be
trusted as references for asam_jax. Nothing here imports asam_jax.
"""

import math

import jax
import numpy as np
import pytest
from peers import (
  bayesian_sam,
  esam,
  fisher_sam,
  friendly_sam,
  global_norm,
  google_sam,
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


# --- F-SAM (nblt/F-SAM) ---------------------------------------------------------------


def test_friendly_sam_port_by_hand():
  """Step 1 is SAM and sets m = g; then d = g - sigma m with the previous m, m <- lmbda m + (1 - lmbda) g."""
  w = {"fc.weight": np.array([1.0, -2.0]), "fc.bias": np.array([0.5])}
  g1 = {"fc.weight": np.array([0.3, -0.4]), "fc.bias": np.array([1.2])}
  g2 = {"fc.weight": np.array([0.1, 0.2]), "fc.bias": np.array([-0.3])}
  rho, sigma, lmbda = 0.2, 0.8, 0.6
  kw = dict(rho=rho, sigma=sigma, lmbda=lmbda)
  p1, old_p, state = friendly_sam.first_step(w, g1, friendly_sam.init(), **kw)
  for n in w:
    np.testing.assert_allclose(p1[n], w[n] + rho * g1[n] / 1.3, rtol=1e-12)  # ||g1|| = 1.3
    np.testing.assert_array_equal(state["momentum"][n], g1[n])
    np.testing.assert_array_equal(old_p[n], w[n])
  p2, _, state = friendly_sam.first_step(w, g2, state, **kw)
  d = {n: g2[n] - sigma * g1[n] for n in w}
  for n in w:
    np.testing.assert_allclose(p2[n], w[n] + rho * d[n] / global_norm(d), rtol=1e-12)
    np.testing.assert_allclose(
      state["momentum"][n], lmbda * g1[n] + (1 - lmbda) * g2[n], rtol=1e-12
    )
  # adaptive: eps = rho w^2 d / || |w| d ||.
  _, _, state = friendly_sam.first_step(w, g1, friendly_sam.init(), **kw)
  p2, _, _ = friendly_sam.first_step(w, g2, state, adaptive=True, **kw)
  norm = global_norm({n: np.abs(w[n]) * d[n] for n in w})
  for n in w:
    np.testing.assert_allclose(p2[n], w[n] + rho * w[n] ** 2 * d[n] / norm, rtol=1e-12)

  # The full step: weight decay comes from the base SGD at w, after the perturbation.
  a, lr, wd = np.array([1.0, 3.0]), 0.1, 1e-3
  x = {"fc.weight": np.array([1.0, -2.0])}
  x1, state = friendly_sam.step(
    x, friendly_sam.init(), quadratic(a), sgd_base(lr=lr, momentum=0.9, weight_decay=wd), **kw
  )
  g = a * x["fc.weight"]
  eps = rho * g / np.linalg.norm(g)
  want = x["fc.weight"] - lr * (a * (x["fc.weight"] + eps) + wd * x["fc.weight"])
  np.testing.assert_allclose(x1["fc.weight"], want, rtol=1e-12)
  np.testing.assert_array_equal(state["momentum"]["fc.weight"], g)


def test_friendly_sam_paper_order_by_hand():
  """The paper's m_t = lmbda m_{t-1} + (1 - lmbda) g_t from 0, then d = g - sigma m_t.

  Over one gradient history, with sigma = 1 the paper's d is lmbda (d_code +
  lmbda^(t-1) g_1): the code's direction plus the trace of m's first value.
  """
  rng = np.random.default_rng(0)
  w = {"a": rng.normal(size=3), "b": rng.normal(size=2)}
  gs = [{n: rng.normal(size=v.shape) for n, v in w.items()} for _ in range(6)]
  rho, lmbda = 0.3, 0.9
  code, paper = friendly_sam.init(), friendly_sam.paper_init(w)
  for t, g in enumerate(gs, 1):
    m_before = code["momentum"]
    pc, _, code = friendly_sam.first_step(w, g, code, rho=rho, sigma=1.0, lmbda=lmbda)
    pp, _, paper = friendly_sam.paper_first_step(w, g, paper, rho=rho, sigma=1.0, lmbda=lmbda)
    d_code = {n: g[n] - m_before.get(n, 0.0) for n in w}
    v = {n: d_code[n] + lmbda ** (t - 1) * gs[0][n] for n in w}
    for n in w:
      np.testing.assert_allclose(pc[n] - w[n], rho * d_code[n] / global_norm(d_code), rtol=1e-9)
      np.testing.assert_allclose(pp[n] - w[n], rho * v[n] / global_norm(v), rtol=1e-9)
      # The two momenta differ by lmbda^t g_1.
      want = code["momentum"][n] - lmbda**t * gs[0][n]
      np.testing.assert_allclose(paper["momentum"][n], want, rtol=1e-9, atol=1e-15)
    if t == 1:  # d = (1 - (1 - lmbda)) g_1: SAM's direction, as the code's first step.
      for n in w:
        np.testing.assert_allclose(pp[n], pc[n], rtol=1e-12)
  # paper_step runs the same loop from m = 0.
  x = {"fc.weight": np.array([1.0, -2.0])}
  x1, state = friendly_sam.paper_step(
    x, friendly_sam.paper_init(x), quadratic(np.array([1.0, 3.0])), sgd_base(lr=0.1), rho=rho
  )
  g = np.array([1.0, -6.0])
  np.testing.assert_allclose(state["momentum"]["fc.weight"], 0.1 * g, rtol=1e-12)
  eps = rho * g / np.linalg.norm(g)
  want = x["fc.weight"] - 0.1 * np.array([1.0, 3.0]) * (x["fc.weight"] + eps)
  np.testing.assert_allclose(x1["fc.weight"], want, rtol=1e-12)


# --- ESAM (dydjw9/Efficient_SAM) ------------------------------------------------------


def test_esam_data_selection_by_hand():
  """Their count keeps strictly above the int(n gamma)-th largest sharpness; the paper's int(n gamma)."""
  s = np.array([0.3, -0.1, 0.5, 0.2, 0.4, 0.0])
  # position 3: cutoff 0.3, kept > 0.3.
  np.testing.assert_array_equal(esam.code_kept(s, 0.5), [2, 4])
  np.testing.assert_array_equal(esam.paper_kept(s, 0.5), [0, 2, 4])
  # position int(5.88) = 5: cutoff 0.0.
  np.testing.assert_array_equal(esam.code_kept(s, 0.98), [0, 2, 3, 4])
  np.testing.assert_array_equal(esam.paper_kept(s, 0.98), [0, 2, 3, 4, 5])
  # gamma >= 0.99 keeps everything in their code.
  np.testing.assert_array_equal(esam.code_kept(s, 0.99), np.arange(6))
  np.testing.assert_array_equal(esam.paper_kept(s, 1.0), np.arange(6))
  # position 1: the maximum is the cutoff, nothing is strictly above it.
  assert esam.code_kept(s, 1 / 6).size == 0
  np.testing.assert_array_equal(esam.paper_kept(s, 1 / 6), [2])
  # Ties: none kept when all are equal; the paper's count breaks ties by index.
  assert esam.code_kept(np.ones(4), 0.5).size == 0
  np.testing.assert_array_equal(esam.paper_kept(np.ones(4), 0.5), [0, 1])
  with pytest.raises(ValueError, match="IndexError"):
    esam.code_kept(s, 0.1)


def test_esam_weight_selection_by_hand():
  """A tensor is off where random() > beta; eps over the selected tensors, scaled by 1 / beta."""

  class Draws:
    def __init__(self, values):
      self.values = iter(values)

    def random(self):
      return next(self.values)

  names = ["fc.weight", "fc.bias", "out.weight"]
  got = esam.draw_selection(names, beta=0.5, rng=Draws([0.7, 0.2, 0.5]))
  assert got == {"fc.weight": False, "fc.bias": True, "out.weight": True}
  assert esam.first_selection(names) == dict.fromkeys(names, True)

  w = {"fc.weight": np.array([1.0, -2.0]), "fc.bias": np.array([0.5]), "out.weight": np.ones(2)}
  g = {
    "fc.weight": np.array([5.0, 5.0]),
    "fc.bias": np.array([3.0]),
    "out.weight": np.array([0, 4.0]),
  }
  rho, beta = 0.2, 0.5
  e = esam.perturbation(w, g, got, rho=rho, beta=beta)
  np.testing.assert_array_equal(e["fc.weight"], [0.0, 0.0])
  scale = rho / (5.0 + 1e-7) / beta  # the norm of (3, 0, 4), fc.weight left out
  np.testing.assert_allclose(e["fc.bias"], 3 * scale, rtol=1e-15)
  np.testing.assert_allclose(e["out.weight"], [0.0, 4 * scale], rtol=1e-15)
  assert global_norm(e) == pytest.approx(rho / beta, rel=1e-7)
  # adaptive: rho w^2 g / (|| |w| g || + 1e-7) / beta over the selected tensors.
  e = esam.perturbation(w, g, got, rho=rho, beta=beta, adaptive=True)
  scale = rho / (math.sqrt(1.5**2 + 4**2) + 1e-7) / beta  # |w| g on the selected: (1.5, 0, 4)
  np.testing.assert_allclose(e["fc.bias"], 0.25 * 3 * scale, rtol=1e-15)
  np.testing.assert_allclose(e["out.weight"], [0.0, 4 * scale], rtol=1e-15)
  # Nothing selected: no perturbation (their first backward pass would fail).
  e = esam.perturbation(w, g, dict.fromkeys(names, False), rho=rho, beta=beta)
  assert all(not v.any() for v in e.values())


def test_esam_softmax_regression_by_hand():
  """Closed-form cross-entropy and its gradient over a subset, against by-hand values and differences."""
  x, y = np.array([[2.0], [1.0], [-1.0]]), np.array([0, 1, 1])
  zero = {"fc.weight": np.zeros((2, 1)), "fc.bias": np.zeros(2)}
  losses, grad = esam.softmax_regression(x, y)
  np.testing.assert_allclose(losses(zero), np.full(3, math.log(2)), rtol=1e-15)
  # p = (1/2, 1/2): example 0 gives (p - e_0) x = (-1, 1), example 2 gives (p - e_1) x = (-1/2, 1/2).
  g = grad(zero, np.array([0, 2]))
  np.testing.assert_allclose(g["fc.weight"], [[-0.75], [0.75]], rtol=1e-15)
  np.testing.assert_allclose(g["fc.bias"], [0.0, 0.0], atol=1e-16)
  g = grad(zero, np.array([], dtype=int))
  assert all(not v.any() for v in g.values())
  # Central differences of the mean loss on a random problem.
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(7, 3)), rng.integers(0, 4, size=7)
  p = {"fc.weight": rng.normal(size=(4, 3)), "fc.bias": rng.normal(size=4)}
  losses, grad = esam.softmax_regression(x, y)
  idx = np.array([1, 4, 5])
  g = grad(p, idx)
  for n in p:
    for i in np.ndindex(p[n].shape):
      hi, lo = {k: v.copy() for k, v in p.items()}, {k: v.copy() for k, v in p.items()}
      hi[n][i] += 1e-6
      lo[n][i] -= 1e-6
      fd = (losses(hi)[idx].mean() - losses(lo)[idx].mean()) / 2e-6
      assert g[n][i] == pytest.approx(fd, rel=1e-6, abs=1e-9)


def test_esam_step_by_hand():
  """Sharpness from the per-example losses, the kept examples' gradient at w + eps, SGD at w."""
  rng = np.random.default_rng(2)
  x, y = rng.normal(size=(10, 3)), rng.integers(0, 3, size=10)
  w = {"fc.weight": rng.normal(size=(3, 3)), "fc.bias": rng.normal(size=3)}
  losses, grad = esam.softmax_regression(x, y)
  rho, beta, gamma, lr, wd = 0.3, 0.5, 0.5, 0.1, 1e-3
  selected = {"fc.weight": True, "fc.bias": False}
  w1, info = esam.step(
    w,
    losses,
    grad,
    sgd_base(lr=lr, momentum=0.9, weight_decay=wd),
    selected=selected,
    rho=rho,
    beta=beta,
    gamma=gamma,
  )
  g = grad(w, np.arange(10))["fc.weight"]
  eps = rho / (np.linalg.norm(g) + 1e-7) / beta * g
  np.testing.assert_allclose(info["perturbation"]["fc.weight"], eps, rtol=1e-15)
  np.testing.assert_array_equal(info["perturbation"]["fc.bias"], 0.0)
  perturbed = {"fc.weight": w["fc.weight"] + eps, "fc.bias": w["fc.bias"]}
  sharpness = losses(perturbed) - losses(w)
  np.testing.assert_allclose(info["sharpness"], sharpness, rtol=1e-15)
  order = np.argsort(-sharpness)
  np.testing.assert_array_equal(info["kept"], np.sort(order[:4]))  # int(10 * 0.5) - 1
  g2 = grad(perturbed, info["kept"])
  for n in w:
    np.testing.assert_allclose(w1[n], w[n] - lr * (g2[n] + wd * w[n]), rtol=1e-12)
  # beta = gamma = 1: SAM with 1e-7 on the mean loss over every example.
  w1, info = esam.step(w, losses, grad, sgd_base(lr=lr), selected=esam.first_selection(w), rho=rho)
  g = grad(w, np.arange(10))
  scale = rho / (global_norm(g) + 1e-7)
  g2 = grad({n: w[n] + scale * g[n] for n in w}, np.arange(10))
  for n in w:
    np.testing.assert_allclose(w1[n], w[n] - lr * g2[n], rtol=1e-12)
  # The paper's count: int(10 * 0.5) = 5 examples.
  _, info = esam.step(
    w,
    losses,
    grad,
    sgd_base(lr=lr),
    selected=selected,
    rho=rho,
    beta=beta,
    gamma=gamma,
    keep=esam.paper_kept,
  )
  assert len(info["kept"]) == 5


# --- bSAM (team-approx-bayes/bayesian-sam) --------------------------------------------


def test_bayesian_sam_port_by_hand():
  """One step on a quadratic by hand: noise, unnormalized eps = rho g / s, the mean with the old s."""
  a, c = np.array([2.0, -1.0]), np.array([0.5, 0.3])
  w = {"fc.weight": np.array([1.0, -2.0])}
  noise = {"fc.weight": np.array([0.4, -1.5])}
  lr, lrf, rho, n_data, b1, b2, wd, damping, s0 = 0.5, 0.7, 0.05, 40.0, 0.9, 0.999, 0.01, 0.1, 2.0
  state = bayesian_sam.init(w, s_init=s0)
  kw = dict(learning_rate=lr, lrfactor=lrf, rho=rho, num_data=n_data, b1=b1, b2=b2)
  w1, state1 = bayesian_sam.step(
    w, state, [quadratic(a, c)], [noise], weight_decay=wd, damping=damping, **kw
  )
  x = w["fc.weight"]
  theta = x + noise["fc.weight"] / math.sqrt(n_data * s0)
  g = a * theta + c
  g_eps = a * (x + rho * g / s0) + c
  gm = (1 - b1) * (g_eps + wd * x)
  np.testing.assert_allclose(state1["gm"]["fc.weight"], gm, rtol=1e-13)
  np.testing.assert_allclose(w1["fc.weight"], x - lr * lrf * gm / s0, rtol=1e-13)
  s1 = b2 * s0 + (1 - b2) * (math.sqrt(s0) * np.abs(g) + damping + wd)
  np.testing.assert_allclose(state1["s"]["fc.weight"], s1, rtol=1e-13)
  # Step 2 divides by s1 (the s updated after step 1), then updates s again.
  noise2 = {"fc.weight": np.array([-0.2, 0.9])}
  w2, state2 = bayesian_sam.step(
    w1, state1, [quadratic(a, c)], [noise2], weight_decay=wd, damping=damping, **kw
  )
  x = w1["fc.weight"]
  g = a * (x + noise2["fc.weight"] / np.sqrt(n_data * s1)) + c
  gm = b1 * gm + (1 - b1) * (a * (x + rho * g / s1) + c + wd * x)
  np.testing.assert_allclose(w2["fc.weight"], x - lr * lrf * gm / s1, rtol=1e-13)
  s2 = b2 * s1 + (1 - b2) * (np.sqrt(s1) * np.abs(g) + damping + wd)
  np.testing.assert_allclose(state2["s"]["fc.weight"], s2, rtol=1e-13)

  # m = 2 groups: each its own noise and eps; g_eps and sqrt(s g^2) averaged.
  fns, noises = [quadratic(a, c), quadratic(2 * a, -c)], [noise, noise2]
  w1, st = bayesian_sam.step(w, state, fns, noises, **kw)
  each = [
    bayesian_sam.group_gradients(w, state, f, n, rho=rho, num_data=n_data)
    for f, n in zip(fns, noises)
  ]
  g_eps = (each[0][1]["fc.weight"] + each[1][1]["fc.weight"]) / 2
  gs = (each[0][0]["fc.weight"] + each[1][0]["fc.weight"]) / 2
  np.testing.assert_allclose(
    w1["fc.weight"], w["fc.weight"] - lr * lrf * 0.1 * g_eps / s0, rtol=1e-13
  )
  np.testing.assert_allclose(st["s"]["fc.weight"], b2 * s0 + (1 - b2) * (gs + 0.1), rtol=1e-13)
  with pytest.raises(ValueError, match="noise"):
    bayesian_sam.step(w, state, fns, [noise], **kw)


def test_bayesian_sam_schedule_and_noise():
  """train.py's lrfactor, and the authors' key splits for the noise."""
  assert bayesian_sam.lrfactor(0, warmup=5, epochs=180) == pytest.approx(0.2)
  assert bayesian_sam.lrfactor(4, warmup=5, epochs=180) == pytest.approx(1.0)
  assert bayesian_sam.lrfactor(5, warmup=5, epochs=180) == 1.0
  want = 0.5 * (1 + math.cos(math.pi * 175 / 176))
  assert bayesian_sam.lrfactor(180, warmup=5, epochs=180) == pytest.approx(want, rel=1e-12)

  tree = {"b": np.zeros(2), "a": np.zeros((2, 3))}
  key = jax.random.PRNGKey(0)
  draws, next_key = bayesian_sam.noise_like_tree(tree, key, 2)
  keys = jax.random.split(key, 3)
  np.testing.assert_array_equal(next_key, keys[2])
  assert len(draws) == 2
  for k, draw in enumerate(draws):
    leaf_keys = jax.random.split(keys[k], 3)  # leaves "a", "b" in the tree's order
    np.testing.assert_array_equal(draw["a"], jax.random.normal(leaf_keys[1], (2, 3)))
    np.testing.assert_array_equal(draw["b"], jax.random.normal(leaf_keys[2], (2,)))


# --- google-research/sam --------------------------------------------------------------


def test_google_sam_replica_groups_and_pmean():
  """Consecutive groups for k <= 4; pmean averages within each group."""
  assert google_sam.local_replica_groups(8, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
  assert google_sam.local_replica_groups(8, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
  for k, error in ((3, ValueError), (1, ValueError), (8, NotImplementedError)):
    with pytest.raises(error):
      google_sam.local_replica_groups(8, k)
  with pytest.raises(ValueError, match="divide"):
    google_sam.local_replica_groups(6, 4)
  values = [{"w": np.array([float(r)])} for r in range(4)]
  got = google_sam.pmean(values, [[0, 1], [2, 3]])
  assert [v["w"][0] for v in got] == [0.5, 0.5, 2.5, 2.5]
  assert [v["w"][0] for v in google_sam.pmean(values)] == [1.5] * 4


def test_google_sam_port_by_hand():
  """The three sync modes on four quadratic replicas, g_r(w) = a_r w + c_r, by hand."""
  a = [np.array([1.0, 2.0]), np.array([3.0, -1.0]), np.array([0.5, 0.5]), np.array([2.0, 1.0])]
  c = [np.array([0.1, -0.2]), np.array([0.0, 0.3]), np.array([-0.4, 0.2]), np.array([0.2, 0.0])]
  fns = [quadratic(ar, cr) for ar, cr in zip(a, c)]
  x, rho = np.array([1.0, -2.0]), 0.1
  w = {"fc.weight": x}
  g = [ar * x + cr for ar, cr in zip(a, c)]

  def unit(v):
    return v / np.linalg.norm(v)

  def outer_mean(directions):
    return np.mean([a[r] * (x + rho * directions[r]) + c[r] for r in range(4)], axis=0)

  want = {
    (False, None): outer_mean([unit(g[r]) for r in range(4)]),
    (True, None): outer_mean([unit(np.mean(g, axis=0))] * 4),
    (True, 2): outer_mean([unit((g[0] + g[1]) / 2)] * 2 + [unit((g[2] + g[3]) / 2)] * 2),
    (True, 4): outer_mean([unit(np.mean(g, axis=0))] * 4),
  }
  for (sync, k), v in want.items():
    got = google_sam.sam_gradient(fns, w, rho=rho, sync_perturbations=sync, inner_group_size=k)
    np.testing.assert_allclose(got["fc.weight"], v, rtol=1e-13)
  # inner_group_size has no effect without sync_perturbations.
  got = google_sam.sam_gradient(fns, w, rho=rho, inner_group_size=2)
  np.testing.assert_allclose(got["fc.weight"], want[False, None], rtol=1e-13)
  # dual_vector has no epsilon: a zero gradient gives NaN.
  with np.errstate(invalid="ignore"):
    assert np.isnan(google_sam.dual_vector({"w": np.zeros(2)})["w"]).all()
