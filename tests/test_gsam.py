"""gsam against Zhuang et al.'s Algorithm 1, in float64 NumPy."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference
from helpers import W0, W0_FLAT, f32, flat, grad64, run

import asam_jax


def gsam_direction64(v, *, rho, alpha, eta=0.0, adaptive=False):
  """d = g_p - alpha g_perp with g_perp = g - (<g, g_p> / ||g_p||^2) g_p (the paper's Alg. 1)."""
  g = grad64(v)
  # The reference perturbation works leaf by leaf; one flat leaf is the same ball.
  (e,) = reference.perturbation([g], [v], rho=rho, eta=eta, adaptive=[adaptive])
  g_p = grad64(v + e)
  g_perp = g - (g @ g_p) / (g_p @ g_p) * g_p
  return g_p - alpha * g_perp


@pytest.mark.parametrize("adaptive", [False, True])
def test_three_steps_match_the_paper_formula(adaptive):
  lr, rho, alpha, eta = 0.1, 0.3, 0.4, 0.01
  kw = dict(rho=rho, alpha=alpha, eta=eta, adaptive=adaptive)
  _, _, updates = run(optax.chain(asam_jax.gsam(**kw), optax.sgd(lr)), f32(W0), 3)
  v = W0_FLAT
  for step in range(3):
    d = gsam_direction64(v, **kw)
    got = flat({name: u[step] for name, u in updates.items()})
    np.testing.assert_allclose(got, -lr * d, rtol=2e-5, atol=1e-7)
    v = v - lr * d


def test_alpha_zero_with_constant_rho_is_exactly_sam():
  base = optax.sgd(0.1, momentum=0.9)
  with_gsam, state_g, _ = run(optax.chain(asam_jax.gsam(rho=0.2, alpha=0.0), base), f32(W0), 6)
  with_sam, state_s, _ = run(optax.chain(asam_jax.sam(rho=0.2), base), f32(W0), 6)
  chex.assert_trees_all_equal(with_gsam, with_sam)
  chex.assert_trees_all_equal(state_g[0], state_s[0])


def test_rho_follows_the_learning_rate():
  lr = optax.warmup_cosine_decay_schedule(0.0, 0.2, 2, 8, end_value=0.02)
  rho = asam_jax.gsam_rho_schedule(lr, rho_max=0.3, rho_min=0.1, lr_max=0.2, lr_min=0.02)
  counts = np.arange(9)
  lrs = np.array([lr(c) for c in counts], np.float64)
  want = np.clip(0.1 + 0.2 * (lrs - 0.02) / (0.2 - 0.02), 0.1, 0.3)
  np.testing.assert_allclose([rho(c) for c in counts], want, rtol=1e-6)
  # In the transformation: SAM's perturbation has norm rho_t, step after step.
  tx = optax.chain(asam_jax.gsam(rho=rho, alpha=0.1), optax.sgd(lr))
  loss_fn = lambda p: 0.5 * jnp.sum(p["w"] ** 2) + jnp.sum(p["b"] ** 2)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss_fn)(params), state, params, loss_fn=loss_fn)
    return optax.apply_updates(params, updates), state

  norms, params, state = [], f32(W0), tx.init(f32(W0))
  for _ in range(4):
    params, state = step(params, state)
    norms.append(float(state[0].perturbation_norm))
  np.testing.assert_allclose(norms, want[:4], rtol=1e-5)


def test_rho_schedule_is_rho_max_for_a_constant_lr_and_clamped_through_a_warm_up():
  constant = asam_jax.gsam_rho_schedule(
    optax.constant_schedule(0.1), rho_max=0.3, rho_min=0.1, lr_max=0.1, lr_min=0.1
  )
  np.testing.assert_allclose([constant(c) for c in range(3)], 0.3)
  # A warm-up from 0 passes below lr_min: rho stays at rho_min, so gsam can be built.
  lr = optax.warmup_cosine_decay_schedule(0.0, 0.2, 4, 10, end_value=0.05)
  rho = asam_jax.gsam_rho_schedule(lr, rho_max=0.3, rho_min=0.1, lr_max=0.2, lr_min=0.05)
  values = np.array([rho(c) for c in range(12)])
  assert values.min() >= 0.1 and values.max() <= 0.3 + 1e-7
  np.testing.assert_allclose(values[:2], 0.1)
  np.testing.assert_allclose(values[4], 0.3, rtol=1e-6)
  asam_jax.gsam(rho=rho)


def test_bad_arguments_fail_with_instructions():
  lr = optax.linear_schedule(0.1, 0.0, 10)
  with pytest.raises(ValueError, match="lr_max must be >= lr_min"):
    asam_jax.gsam_rho_schedule(lr, rho_max=0.1, rho_min=0.0, lr_max=0.0, lr_min=0.1)
  with pytest.raises(ValueError, match="rho_min must be <= rho_max"):
    asam_jax.gsam_rho_schedule(lr, rho_max=0.1, rho_min=0.2, lr_max=0.1, lr_min=0.0)
  with pytest.raises(ValueError, match="alpha must be finite and >= 0"):
    asam_jax.gsam(alpha=-0.1)
  with pytest.raises(TypeError, match="loss as a closure"):
    tx = asam_jax.gsam()
    params = {"w": jnp.ones(2)}
    tx.update(params, tx.init(params), params)
