"""fisher_sam against the paper's maximizer in float64 and a port of the reproduction's code."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference
from helpers import W0, X, Y, assert_close, f32, ls_grad64, ls_loss, one_update, sgd_base
from peers import fisher_sam as port

import asam_jax


@pytest.mark.parametrize("p", [2, math.inf, 3])
@pytest.mark.parametrize("eta", [0.2, 50.0])
def test_update_is_the_gradient_at_the_fisher_maximizer(p, eta):
  """eps maximizes eps^T g over eps^T f eps <= rho^2 (p = 2), f = 1 + eta g^2, and its p-norm kin."""
  g, state = one_update(asam_jax.fisher_sam(rho=0.1, eta=eta, p=p), f32(W0), X, Y)
  clean = ls_grad64(W0, X, Y)
  leaves, w = [clean["b"], clean["w"]], [W0["b"], W0["w"]]
  e = reference.perturbation(leaves, w, rho=0.1, p=p, t=reference.fisher_t(leaves, eta))
  assert_close(g, ls_grad64({"b": W0["b"] + e[0], "w": W0["w"] + e[1]}, X, Y))
  np.testing.assert_allclose(state.perturbation_norm, 0.1, rtol=1e-5)
  if p == 2:  # the paper's form: rho f^-1 g / sqrt(g^T f^-1 g)
    f = 1 + eta * reference.flat(leaves) ** 2
    want = (
      0.1
      * reference.flat(leaves)
      / f
      / np.sqrt(reference.flat(leaves) @ (reference.flat(leaves) / f))
    )
    np.testing.assert_allclose(reference.flat(e), want, rtol=1e-12)


def test_matches_the_reproduction_with_sgd_momentum_weight_decay_and_a_schedule():
  """Five steps of FisherSAM + torch SGD(momentum, weight_decay) under a cosine learning rate."""
  lr = optax.cosine_decay_schedule(0.1, 5)
  tx = optax.chain(
    asam_jax.fisher_sam(rho=0.1, eta=0.2),
    optax.add_decayed_weights(5e-4),
    optax.sgd(lr, momentum=0.9),
  )
  params, state = f32(W0), tx.init(f32(W0))
  w, base = dict(W0), sgd_base(lambda t: float(lr(t)), momentum=0.9, weight_decay=5e-4)
  loss_fn = lambda p: ls_loss(p, X, Y)
  for _ in range(5):
    updates, state = tx.update(jax.grad(loss_fn)(params), state, params, loss_fn=loss_fn)
    params = optax.apply_updates(params, updates)
    w = port.step(w, lambda v: ls_grad64(v, X, Y), base, gamma=0.1, eta=0.2)
  assert_close(params, w, rtol=2e-5, atol=2e-6)


def test_eta_zero_is_sam_bit_for_bit():
  sam, _ = one_update(asam_jax.sam(rho=0.1), f32(W0), X, Y)
  fisher, _ = one_update(asam_jax.fisher_sam(rho=0.1, eta=0.0), f32(W0), X, Y)
  chex.assert_trees_all_equal(fisher, sam)


def test_alternating_takes_the_fisher_ball_and_refuses_several_steps_there():
  params = f32(W0)
  loss_fn = lambda p: ls_loss(p, X, Y)
  tx = asam_jax.alternating(asam_jax.fisher_sam(rho=0.1, eta=1.0), optax.sgd(0.1))
  state = tx.init(params)
  for _ in range(2):
    updates, state = tx.update(jax.grad(loss_fn)(params), state, params)
    params = optax.apply_updates(params, updates)
  closure = optax.chain(asam_jax.fisher_sam(rho=0.1, eta=1.0), optax.sgd(0.1))
  want, _ = one_update(closure, f32(W0), X, Y)
  assert_close(params, optax.apply_updates(f32(W0), want), rtol=1e-5)
  with pytest.raises(ValueError, match="from the gradient at the perturbed point"):
    asam_jax.alternating(asam_jax.fisher_sam(ascent_steps=2), optax.sgd(0.1))


def test_a_huge_gradient_keeps_the_radius_and_the_direction():
  """f = 1 + eta g^2 overflows float32 from |g| ~ 2e19; T is taken scaled by max(sqrt(eta)|g|, 1)."""
  g = np.array([3e30, -4e30, 1.0])
  tx = asam_jax.fisher_sam(rho=0.5, eta=1.0)
  params = {"w": jnp.zeros(3)}
  loss_fn = lambda p: 0.5 * jnp.sum(p["w"] ** 2)  # its gradient at w + eps is eps
  updates, state = tx.update(
    {"w": jnp.asarray(g, jnp.float32)}, tx.init(params), params, loss_fn=loss_fn
  )
  # float64 reference: T = (1 + g^2)^-1/2 = 1/(|g| sqrt(1 + g^-2)), u = T g, eps = rho T u / ||u||.
  t = 1 / (np.abs(g) * np.sqrt(1 + g**-2.0))
  u = t * g
  eps = 0.5 * t * u / np.linalg.norm(u)
  np.testing.assert_allclose(updates["w"], eps, rtol=1e-5)
  np.testing.assert_allclose(state.perturbation_norm, 0.5, rtol=1e-5)
