"""bayesian_sam against a port of the authors' JAX code (team-approx-bayes/bayesian-sam)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import W0, X, Y, assert_close, f32, ls_grad64, ls_loss
from peers import bayesian_sam as port

import asam_jax

N, STEPS, NUM_DATA = 4, 5, 1000.0


def noise_of(key, params, state):
  """The noise a step draws: recovered from bayesian_sam_sample with the step's key."""
  theta = asam_jax.bayesian_sam_sample(key, params, state, NUM_DATA)
  s = state.precision
  return jax.tree.map(
    lambda t, w, s: np.asarray((t - w) * np.sqrt(NUM_DATA * s), np.float64), theta, params, s
  )


@pytest.mark.parametrize("weight_decay, damping", [(0.0, 0.1), (1e-3, 1e-3)])
def test_matches_the_authors_step_under_a_learning_rate_schedule(weight_decay, damping):
  lr = optax.warmup_cosine_decay_schedule(0.0, 0.05, 2, STEPS)
  key = jax.random.key(7)
  kwargs = dict(weight_decay=weight_decay, damping=damping)
  tx = asam_jax.bayesian_sam(lr, 0.02, NUM_DATA, key=key, **kwargs)
  params, state = f32(W0), tx.init(f32(W0))
  w, port_state = dict(W0), port.init(W0)
  loss_fn = lambda p: ls_loss(p, X, Y)
  for t in range(STEPS):
    _, draw = jax.random.split(state.key)
    noise = noise_of(draw, params, state)
    w, port_state = port.step(
      w, port_state, [lambda v: ls_grad64(v, X, Y)], [noise], learning_rate=float(lr(t)), rho=0.02,
      num_data=NUM_DATA, **kwargs,
    )  # fmt: skip
    # The incoming gradient is not used: params stand for its structure.
    updates, state = tx.update(params, state, params, loss_fn=loss_fn)
    params = optax.apply_updates(params, updates)
  assert_close(params, w, rtol=2e-5, atol=2e-6)
  assert_close(state.momentum, port_state["gm"], rtol=2e-5, atol=2e-6)
  assert_close(state.precision, port_state["s"], rtol=2e-5, atol=2e-6)


def test_under_pmap_each_device_draws_its_noise_as_the_authors_groups():
  """m-sharpness: every device its own noise and two gradients, g_eps and sqrt(s g^2) averaged."""
  key = jax.random.key(3)
  tx = asam_jax.bayesian_sam(0.05, 0.02, NUM_DATA, key=key, axis_name="d")
  xs, ys = X.reshape(N, -1, 5), Y.reshape(N, -1, 3)

  @functools.partial(jax.pmap, axis_name="d", in_axes=(None, 0, 0))
  def steps(params, x, y):
    state = tx.init(params)
    for _ in range(2):
      updates, state = tx.update(params, state, params, loss_fn=lambda p: ls_loss(p, x, y))
      params = optax.apply_updates(params, updates)
    return params

  params = steps(f32(W0), xs, ys)
  chex.assert_trees_all_equal(*[jax.tree.map(lambda a, i=i: a[i], params) for i in range(N)])
  w, port_state, single = dict(W0), port.init(W0), tx.init(f32(W0))
  here = f32(W0)
  for _ in range(2):
    _, draw = jax.random.split(single.key)
    noises = [noise_of(jax.random.fold_in(draw, i), here, single) for i in range(N)]
    fns = [lambda v, i=i: ls_grad64(v, xs[i], ys[i]) for i in range(N)]
    w, port_state = port.step(
      w, port_state, fns, noises, learning_rate=0.05, rho=0.02, num_data=NUM_DATA
    )
    single = single._replace(key=jax.random.split(single.key)[0], precision=f32(port_state["s"]))
    here = f32(w)
  assert_close(jax.tree.map(lambda a: a[0], params), w, rtol=2e-5, atol=2e-6)


def test_samples_have_the_posteriors_mean_and_spread():
  params = {"w": jnp.array([1.0, -2.0, 0.5])}
  tx = asam_jax.bayesian_sam(0.1, 0.01, 400.0, key=jax.random.key(0), s_init=4.0)
  state = tx.init(params)
  sample = jax.jit(jax.vmap(lambda k: asam_jax.bayesian_sam_sample(k, params, state, 400.0)))
  draws = np.asarray(sample(jax.random.split(jax.random.key(1), 4000))["w"])
  # N(w, 1 / (400 * 4)): standard deviation 0.025; 4000 draws pin it to ~1%.
  np.testing.assert_allclose(draws.mean(0), params["w"], atol=0.002)
  np.testing.assert_allclose(draws.std(0), 0.025, rtol=0.05)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(b1=1.0), r"b1 must be in \[0, 1\)"),
    (dict(s_init=0.0), "s_init must be > 0"),
    (dict(num_data=0.0), "num_data must be > 0"),
    (dict(key=0), "key must be a jax PRNG key"),
  ],
)
def test_bad_hyperparameters_are_refused(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    asam_jax.bayesian_sam(
      **{"learning_rate": 0.1, "rho": 0.01, "num_data": 10.0, "key": jax.random.key(0), **kwargs}
    )
