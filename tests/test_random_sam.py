"""random_sam: the perturbation lies on the (adaptive) rho-sphere and follows its key."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import asam_jax

CENTRE = jnp.array([0.5, -1.0, 2.0, 0.0, 3.0])
W = {"a": jnp.array([1.0, -2.0, 0.5, 0.0, 4.0]), "b": jnp.array([0.3, -0.7])}


def loss_fn(p):
  """Gradient w + eps - c at w + eps, so the update reveals eps."""
  return 0.5 * jnp.sum((p["a"] - CENTRE) ** 2) + 0.5 * jnp.sum(p["b"] ** 2)


@jax.jit
def three_steps(key):
  txs = [
    asam_jax.random_sam(key, rho=0.2),
    asam_jax.random_sam(key, rho=0.2, adaptive=True, eta=0.1),
  ]
  out = []
  for tx in txs:
    state, grads = tx.init(W), []
    for _ in range(3):
      g, state = tx.update(W, state, W, loss_fn=loss_fn)  # grads are not used
      grads.append(g)
    out.append((grads, state))
  return out


def perturbations(grads):
  return [
    np.concatenate([g["a"] - (W["a"] - CENTRE), g["b"] - W["b"]]).astype(np.float64) for g in grads
  ]


def test_perturbation_lies_on_the_sphere():
  (plain, plain_state), (adaptive, adaptive_state) = three_steps(jax.random.key(0))
  t = np.concatenate([np.abs(W["a"]), np.abs(W["b"])]) + 0.1
  for e in perturbations(plain):
    np.testing.assert_allclose(np.linalg.norm(e), 0.2, rtol=1e-5)
  for e in perturbations(adaptive):
    np.testing.assert_allclose(np.linalg.norm(e / t), 0.2, rtol=1e-5)
  np.testing.assert_allclose(plain_state.perturbation_norm, 0.2, rtol=1e-5)
  assert int(adaptive_state.count) == 3


def test_same_key_same_run_and_a_new_draw_every_step():
  first = three_steps(jax.random.key(0))
  again = three_steps(jax.random.key(0))
  other = three_steps(jax.random.key(1))
  grads = lambda run: [g for grads, _ in run for g in grads]
  chex.assert_trees_all_equal(grads(first), grads(again))
  np.testing.assert_array_equal(
    jax.random.key_data(first[0][1].key), jax.random.key_data(again[0][1].key)
  )
  e = perturbations(first[0][0])
  assert not np.allclose(e[0], e[1]) and not np.allclose(e[1], e[2])
  assert not np.allclose(e[0], perturbations(other[0][0])[0])


def test_chain_with_a_base_optimizer():
  tx = optax.chain(asam_jax.random_sam(jax.random.key(0), rho=0.0), optax.sgd(0.1))
  updates, _ = jax.jit(lambda w: tx.update(w, tx.init(w), w, loss_fn=loss_fn))(W)
  # rho = 0: the clean gradient, whatever was passed as updates.
  np.testing.assert_allclose(updates["a"], -0.1 * (W["a"] - CENTRE), rtol=1e-6)


def test_a_key_that_is_not_a_prng_key_is_refused():
  with pytest.raises(TypeError, match=r"key must be a jax PRNG key, e\.g\. jax\.random\.key\(0\)"):
    asam_jax.random_sam(0, rho=0.1)
