"""alternating: the closure-free form, against chain(tx, optimizer), optax's transparent mode
and in Flax's stock train loops."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import W0, X, Y, f32, ls_loss, scan_steps, tiered

import asam_jax

LOSS = lambda p: ls_loss(p, X, Y)


@functools.partial(jax.jit, static_argnums=(0, 2))
def calls(tx, params, n):
  """n closure-free calls: update(grads, state, params), the gradient taken at the params held."""
  return scan_steps(tx, params, LOSS, n, closure=False)[0]


@functools.partial(jax.jit, static_argnums=(0, 2))
def closure_steps(tx, params, n):
  return scan_steps(tx, params, LOSS, n)[0]


CASES = {
  "sam_sgd": (lambda: asam_jax.sam(rho=0.2), lambda: optax.sgd(0.1, momentum=0.9)),
  "asam_adamw": (
    lambda: asam_jax.asam(rho=optax.linear_schedule(0.5, 0.1, 4), eta=0.01),
    lambda: optax.adamw(1e-2, weight_decay=1e-2),
  ),
  "sam_two_ascent_steps_projected": (
    lambda: asam_jax.sam(rho=0.2, ascent_steps=2, ascent_projection=True),
    lambda: optax.sgd(0.1),
  ),
}


@pytest.mark.parametrize("case", tiered(list(CASES), ["sam_sgd", "asam_adamw"]))
def test_calls_equal_steps_of_the_chain(case):
  make_tx, make_opt = CASES[case]
  period = 3 if "two_ascent" in case else 2
  params, state = calls(asam_jax.alternating(make_tx(), make_opt()), f32(W0), 4 * period)
  want, want_state = closure_steps(optax.chain(make_tx(), make_opt()), f32(W0), 4)
  chex.assert_trees_all_close(params, want, rtol=2e-6, atol=2e-7)
  assert int(state.count) == 4 * period
  np.testing.assert_allclose(state.perturbation_norm, want_state[0].perturbation_norm, rtol=1e-5)


def test_equals_optax_transparent_sam():
  base = optax.sgd(0.1, momentum=0.9)
  ours, _ = calls(asam_jax.alternating(asam_jax.sam(rho=0.2), base), f32(W0), 8)
  theirs = optax.contrib.sam(
    base, optax.chain(optax.contrib.normalize(), optax.sgd(0.2)), sync_period=2, opaque_mode=False
  )
  theirs_params, _ = calls(theirs, f32(W0), 8)
  chex.assert_trees_all_close(ours, theirs_params, rtol=1e-6, atol=1e-7)


def test_odd_calls_ascend_and_leave_the_optimizer_state_alone():
  tx = asam_jax.alternating(asam_jax.asam(rho=0.5, eta=0.01), optax.adam(1e-2))
  params, state = f32(W0), tx.init(f32(W0))
  updates, state = tx.update(jax.grad(LOSS)(params), state, params)
  eps = asam_jax.perturbation(jax.grad(LOSS)(params), params, rho=0.5, eta=0.01, adaptive=True)
  chex.assert_trees_all_close(updates, eps, rtol=1e-6)
  chex.assert_trees_all_equal(state.inner_state, tx.init(params).inner_state)
  chex.assert_trees_all_equal(state.weights, params)


def test_with_flax_stock_train_state():
  from flax.training import train_state

  tx = asam_jax.alternating(asam_jax.sam(rho=0.2), optax.sgd(0.1, momentum=0.9))
  state = train_state.TrainState.create(apply_fn=None, params=f32(W0), tx=tx)

  @jax.jit
  def train_step(state):  # Flax's own apply_gradients: no way to pass a closure
    return state.apply_gradients(grads=jax.grad(LOSS)(state.params))

  for _ in range(6):
    state = train_step(state)
  want, _ = closure_steps(
    optax.chain(asam_jax.sam(rho=0.2), optax.sgd(0.1, momentum=0.9)), f32(W0), 3
  )
  chex.assert_trees_all_close(state.params, want, rtol=2e-6, atol=2e-7)
  assert int(state.step) == 6


def test_with_nnx_optimizer_update_without_keywords():
  from flax import nnx

  class Model(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.asarray(W0["w"], jnp.float32))
      self.b = nnx.Param(jnp.asarray(W0["b"], jnp.float32))

    def __call__(self, x):
      return x @ self.w + self.b

  model = Model()
  optimizer = nnx.Optimizer(
    model, asam_jax.alternating(asam_jax.asam(rho=0.5), optax.adam(1e-2)), wrt=nnx.Param
  )
  mse = lambda model: 0.5 * jnp.mean(jnp.sum((model(X) - Y) ** 2, axis=-1))

  @nnx.jit
  def train_step(model, optimizer):
    optimizer.update(model, nnx.grad(mse)(model))

  for _ in range(6):
    train_step(model, optimizer)
  want, _ = closure_steps(optax.chain(asam_jax.asam(rho=0.5), optax.adam(1e-2)), f32(W0), 3)
  np.testing.assert_allclose(model.w[...], want["w"], rtol=2e-6, atol=2e-7)
  np.testing.assert_allclose(model.b[...], want["b"], rtol=2e-6, atol=2e-7)


def test_global_sam_under_pmap_and_refusals():
  n = jax.local_device_count()
  xs, ys = X.reshape(n, -1, 5), Y.reshape(n, -1, 3)
  tx = asam_jax.alternating(
    asam_jax.sam(rho=0.2, axis_name="i", sync_perturbation=True), optax.sgd(0.1)
  )

  @functools.partial(jax.pmap, axis_name="i", in_axes=(None, 0, 0))
  def two_calls(params, x, y):
    state = tx.init(params)
    for _ in range(2):
      loss_fn = lambda p: ls_loss(p, x, y)
      updates, state = tx.update(jax.grad(loss_fn)(params), state, params)
      params = optax.apply_updates(params, updates)
    return params

  got = jax.tree.map(lambda a: a[0], two_calls(f32(W0), xs, ys))
  want, _ = closure_steps(optax.chain(asam_jax.sam(rho=0.2), optax.sgd(0.1)), f32(W0), 1)
  chex.assert_trees_all_close(got, want, rtol=2e-6, atol=2e-7)

  with pytest.raises(ValueError, match="sync_perturbation=True"):
    asam_jax.alternating(asam_jax.sam(axis_name="i"), optax.sgd(0.1))
  with pytest.raises(TypeError, match=r"built by asam_jax\.sam, asam_jax\.asam or"):
    asam_jax.alternating(optax.chain(asam_jax.sam(), optax.sgd(0.1)), optax.sgd(0.1))
  with pytest.raises(TypeError, match=r"built by asam_jax\.sam, asam_jax\.asam or"):
    asam_jax.alternating(asam_jax.gsam(), optax.sgd(0.1))
