"""momentum_sam against Becker et al.'s Algorithm 1 in float64 NumPy."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import W0, W0_FLAT, X, Y, f32, flat, grad64, ls_loss

import asam_jax


def msam64(steps, *, lr, rho, mu, wd):
  """Algorithm 1: gradient at w~, back to w, momentum SGD step, out to w~ = w - rho v/||v||.

  Weight decay wd w~ is added to the gradient, as the paper's code does.
  """
  w, v = W0_FLAT.copy(), np.zeros_like(W0_FLAT)
  w_tilde = w.copy()
  for t in range(steps):
    g = grad64(w_tilde) + wd * w_tilde
    v = mu * v + g
    w = w - lr(t) * v
    w_tilde = w - rho * v / np.linalg.norm(v)
  return w_tilde, w, v


@jax.jit
def train(params):
  lr = optax.linear_schedule(0.1, 0.02, 6)
  tx = optax.chain(
    optax.add_decayed_weights(0.01), asam_jax.momentum_sam(lr, rho=0.2, momentum=0.9)
  )

  def body(carry, _):
    params, state = carry
    grads = jax.grad(lambda p: ls_loss(p, X, Y))(params)
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), None

  params, state = jax.lax.scan(body, (params, tx.init(params)), None, length=6)[0]
  return params, state, asam_jax.momentum_sam_weights(params, state)


def test_six_steps_match_the_paper_algorithm():
  held, state, unperturbed = train(f32(W0))
  lr = lambda t: 0.1 + (0.02 - 0.1) * t / 6
  w_tilde, w, v = msam64(6, lr=lr, rho=0.2, mu=0.9, wd=0.01)
  np.testing.assert_allclose(flat(held), w_tilde, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(flat(unperturbed), w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(flat(state[1].momentum), v, rtol=1e-5, atol=1e-6)
  # The weights held sit exactly rho away from the unperturbed ones.
  np.testing.assert_allclose(np.linalg.norm(flat(held) - flat(unperturbed)), 0.2, rtol=1e-5)


def test_rho_zero_is_sgd_with_momentum():
  tx = asam_jax.momentum_sam(0.05, rho=0.0, momentum=0.8)
  base = optax.sgd(0.05, momentum=0.8)
  loss_fn = lambda p: ls_loss(p, X, Y)

  @jax.jit
  def both(params):
    def body(carry, _):
      (p1, s1), (p2, s2) = carry
      u1, s1 = tx.update(jax.grad(loss_fn)(p1), s1, p1)
      u2, s2 = base.update(jax.grad(loss_fn)(p2), s2, p2)
      return ((optax.apply_updates(p1, u1), s1), (optax.apply_updates(p2, u2), s2)), None

    init = ((params, tx.init(params)), (params, base.init(params)))
    return jax.lax.scan(body, init, None, length=5)[0]

  (p1, _), (p2, _) = both(f32(W0))
  chex.assert_trees_all_close(p1, p2, rtol=1e-6, atol=1e-7)


def test_weights_need_exactly_one_momentum_sam_state():
  params = {"w": jnp.ones(2)}
  with pytest.raises(ValueError, match="exactly one MomentumSAMState"):
    asam_jax.momentum_sam_weights(params, optax.sgd(0.1).init(params))
  with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
    asam_jax.momentum_sam(0.1, momentum=1.0)
