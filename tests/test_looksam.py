"""looksam against Liu et al.'s Algorithm 1 in float64 NumPy, and its skipped passes."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference
from helpers import W0, W0_FLAT, X, Y, f32, flat, grad64, ls_loss, ops_inside_conditionals, run

import asam_jax


def looksam_trajectory64(steps, *, lr, rho, k, alpha, eta=0.0, adaptive=False):
  """The paper's Algorithm 1 with plain SGD: every update direction, in float64."""
  v, g_v, directions = W0_FLAT, None, []
  for t in range(steps):
    g = grad64(v)
    if t % k == 0:
      (e,) = reference.perturbation([g], [v], rho=rho, eta=eta, adaptive=[adaptive])
      g_s = grad64(v + e)
      # g_v = g_s - ||g_s|| cos(theta) g / ||g||, theta the angle between g and g_s.
      cos = g @ g_s / (np.linalg.norm(g) * np.linalg.norm(g_s))
      g_v = g_s - np.linalg.norm(g_s) * cos * g / np.linalg.norm(g)
    else:
      g_s = g + alpha * np.linalg.norm(g) / np.linalg.norm(g_v) * g_v
    directions.append(g_s)
    v = v - lr * g_s
  return directions


@pytest.mark.parametrize("adaptive", [False, True])
def test_seven_steps_match_the_paper_formula(adaptive):
  kw = dict(rho=0.3, k=3, alpha=0.7, eta=0.01, adaptive=adaptive)
  _, state, updates = run(optax.chain(asam_jax.looksam(**kw), optax.sgd(0.1)), f32(W0), 7)
  want = looksam_trajectory64(7, lr=0.1, **kw)
  for step in range(7):
    got = flat({name: u[step] for name, u in updates.items()})
    np.testing.assert_allclose(got, -0.1 * want[step], rtol=3e-5, atol=2e-6)
  assert int(state[0].sam.count) == 7


def test_k_one_is_sam():
  base = optax.sgd(0.1, momentum=0.9)
  with_look, _, _ = run(optax.chain(asam_jax.looksam(rho=0.2, k=1), base), f32(W0), 5)
  with_sam, _, _ = run(optax.chain(asam_jax.sam(rho=0.2), base), f32(W0), 5)
  chex.assert_trees_all_close(with_look, with_sam, rtol=1e-6, atol=1e-7)


def test_skipped_steps_do_not_evaluate_the_loss():
  """loss_fn counts its own calls: under jit, 10 steps with k = 5 evaluate it twice."""
  calls = []
  tx = optax.chain(asam_jax.looksam(rho=0.1, k=5), optax.sgd(0.1))

  def counted_loss(params):
    jax.debug.callback(lambda: calls.append(1))
    return ls_loss(params, X, Y)

  @jax.jit
  def train(params):
    def body(carry, _):
      params, state = carry
      grads = jax.grad(lambda p: ls_loss(p, X, Y))(params)
      updates, state = tx.update(grads, state, params, loss_fn=counted_loss)
      return (optax.apply_updates(params, updates), state), None

    return jax.lax.scan(body, (params, tx.init(params)), None, length=10)[0]

  train(f32(W0))
  jax.effects_barrier()
  assert len(calls) == 2
  # And the compiled program branches rather than selects.
  assert " conditional(" in train.lower(f32(W0)).compile().as_text()


def test_bad_arguments_fail_with_instructions():
  with pytest.raises(ValueError, match="k must be an int >= 1"):
    asam_jax.looksam(k=0)
  with pytest.raises(ValueError, match="alpha must be finite and >= 0"):
    asam_jax.looksam(alpha=float("nan"))
  with pytest.raises(TypeError, match="loss as a closure"):
    tx = asam_jax.looksam()
    params = {"w": jnp.ones(2)}
    tx.update(params, tx.init(params), params)


def test_static_full_step_equals_the_cond_and_compiles_no_conditional():
  """Two compiled steps, the full one every k-th, give the lax.cond version's trajectory."""
  tx = optax.chain(asam_jax.looksam(rho=0.3, k=3, alpha=0.7), optax.sgd(0.1))

  @functools.partial(jax.jit, static_argnames="full_step")
  def step(params, state, full_step=None):
    loss_fn = lambda p: ls_loss(p, X, Y)
    grads = jax.grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params, loss_fn=loss_fn, full_step=full_step)
    return optax.apply_updates(params, updates), state

  params, state = f32(W0), tx.init(f32(W0))
  want, want_state = params, state
  for t in range(7):
    params, state = step(params, state, full_step=t % 3 == 0)
    want, want_state = step(want, want_state)
  chex.assert_trees_all_close((params, state), (want, want_state), rtol=1e-6, atol=1e-7)
  # The loss's dot runs inside a conditional branch only in the lax.cond version.
  assert "dot" in ops_inside_conditionals(step.lower(params, state).compile().as_text())
  for full_step in (True, False):
    compiled = step.lower(params, state, full_step=full_step).compile().as_text()
    assert "dot" not in ops_inside_conditionals(compiled)
  with pytest.raises(TypeError, match="full_step must be a Python bool"):
    tx.update(params, state, params, loss_fn=lambda p: ls_loss(p, X, Y), full_step=jnp.array(1))


def test_bf16_params_with_float32_gradients_keep_one_state_type():
  """Both branches return the incoming gradient's dtype, and g_v stays in the params' dtype."""
  params = {"w": jnp.linspace(-1, 1, 6, dtype=jnp.bfloat16)}
  tx = asam_jax.looksam(rho=0.1, k=2)
  loss_fn = lambda p: jnp.sum(jnp.sin(p["w"].astype(jnp.float32)))

  @jax.jit
  def run(params):
    def body(carry, _):
      params, state = carry
      grads = jax.tree.map(lambda g: g.astype(jnp.float32), jax.grad(loss_fn)(params))
      updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
      assert updates["w"].dtype == jnp.float32
      return (optax.apply_updates(params, updates), state), None

    return jax.lax.scan(body, (params, tx.init(params)), None, length=4)[0]

  params, state = run(params)
  assert params["w"].dtype == jnp.bfloat16 and state.orthogonal["w"].dtype == jnp.bfloat16
  assert np.all(np.isfinite(np.asarray(params["w"], np.float32)))
