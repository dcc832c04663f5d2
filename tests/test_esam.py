"""esam against a port of the authors' code (dydjw9/Efficient_SAM) fed the same draws."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import W0, X, Y, f32, ls_loss, one_update, sgd_base, tiered
from peers import esam as port

import asam_jax

RNG = np.random.default_rng(1)
XS, LABELS = RNG.normal(size=(16, 4)), RNG.integers(0, 3, 16)
P0 = {"fc.bias": 0.1 * RNG.normal(size=3), "fc.weight": RNG.normal(size=(3, 4))}
NAMES = sorted(P0)  # jax's leaf order


def losses(params):
  """nn.Linear + CrossEntropyLoss(reduction="none"), as the port's softmax_regression."""
  logits = jnp.asarray(XS, jnp.float32) @ params["fc.weight"].T + params["fc.bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(LABELS))


def draws(key, beta, steps, n):
  """The leaves esam draws on each step: split the state's key, Bernoulli(beta) per leaf."""
  out = []
  for _ in range(steps):
    key, draw = jax.random.split(key)
    out.append(np.asarray(jax.random.bernoulli(draw, beta, (n,))))
  return out


@pytest.mark.parametrize("beta, gamma", tiered([(1.0, 1.0), (0.5, 0.5), (0.6, 0.3)], [(0.6, 0.3)]))
def test_matches_the_authors_step_with_the_papers_count(beta, gamma):
  key = jax.random.key(3)
  tx = optax.chain(
    asam_jax.esam(0.1, beta, gamma, key=key),
    optax.add_decayed_weights(1e-3),
    optax.sgd(0.1, momentum=0.9),
  )
  params, state = f32(P0), tx.init(f32(P0))
  loss_fn = losses if gamma < 1 else lambda p: losses(p).mean()
  w, base = dict(P0), sgd_base(0.1, momentum=0.9, weight_decay=1e-3)
  losses64, subset_grad = port.softmax_regression(XS, LABELS)
  infos = []
  for drawn in draws(key, beta, 5, len(NAMES)):
    grads = jax.grad(lambda p: losses(p).mean())(params)
    updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    params = optax.apply_updates(params, updates)
    selected = dict(zip(NAMES, map(bool, drawn)))
    w, info = port.step(
      w, losses64, subset_grad, base, selected=selected, rho=0.1, beta=beta, gamma=gamma,
      keep=port.paper_kept,
    )  # fmt: skip
    infos.append(info)
  chex.assert_trees_all_close(params, w, rtol=2e-5, atol=2e-6)
  if gamma < 1:  # the authors' count keeps one fewer where the rises are distinct
    distinct = [i for i in infos if len(set(i["sharpness"])) == len(i["sharpness"])]
    assert distinct
    for info in distinct:
      assert len(port.code_kept(info["sharpness"], gamma)) == len(info["kept"]) - 1


def test_beta_and_gamma_one_is_sam_bit_for_bit():
  esam, _ = one_update(asam_jax.esam(0.2, 1.0, 1.0, key=jax.random.key(0)), f32(W0), X, Y)
  sam, _ = one_update(asam_jax.sam(0.2), f32(W0), X, Y)
  chex.assert_trees_all_equal(esam, sam)


@pytest.mark.slow
def test_each_leaf_is_drawn_with_probability_beta_and_the_key_decides():
  """On L = sum_i ||w_i||^2 / 2 the update is w + eps, so eps shows which leaves were drawn."""
  params = {f"w{i:02d}": jnp.full(3, 1.0 + i) for i in range(20)}
  loss_fn = lambda p: sum(0.5 * jnp.sum(x**2) for x in jax.tree.leaves(p))

  def drawn(key, steps=40):
    tx = asam_jax.esam(0.1, 0.3, 1.0, key=key)
    state, out = tx.init(params), []
    step = jax.jit(lambda s: tx.update(params, s, params, loss_fn=loss_fn))
    for _ in range(steps):
      updates, state = step(state)
      out.append(
        [bool(jnp.any(u != w)) for u, w in zip(jax.tree.leaves(updates), jax.tree.leaves(params))]
      )
    return np.array(out)

  first = drawn(jax.random.key(0))
  # 800 Bernoulli(0.3) draws: the share is within four standard deviations of beta.
  assert abs(first.mean() - 0.3) < 4 * np.sqrt(0.3 * 0.7 / first.size), first.mean()
  np.testing.assert_array_equal(drawn(jax.random.key(0)), first)
  assert not np.array_equal(drawn(jax.random.key(1)), first)


def test_the_clean_losses_can_come_from_the_clean_pass():
  tx = asam_jax.esam(0.1, 1.0, 0.5, key=jax.random.key(0))
  params = f32(P0)
  grads = jax.grad(lambda p: losses(p).mean())(params)
  computed, _ = tx.update(grads, tx.init(params), params, loss_fn=losses)
  given, _ = tx.update(grads, tx.init(params), params, loss_fn=losses, losses=losses(params))
  chex.assert_trees_all_close(given, computed, rtol=1e-6)


def test_data_selection_refuses_a_scalar_loss_and_an_empty_selection():
  tx = asam_jax.esam(0.1, 1.0, 0.5, key=jax.random.key(0))
  params = f32(P0)
  grads = jax.grad(lambda p: losses(p).mean())(params)
  with pytest.raises(TypeError, match="one loss per example"):
    tx.update(grads, tx.init(params), params, loss_fn=lambda p: losses(p).mean())
  tiny = asam_jax.esam(0.1, 1.0, 0.05, key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"int\(gamma \* batch\) = int\(0.05 \* 16\) = 0"):
    tiny.update(grads, tiny.init(params), params, loss_fn=losses)


@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    (dict(beta=0.0), ValueError, r"beta must be in \(0, 1\]"),
    (dict(gamma=1.5), ValueError, r"gamma must be in \(0, 1\]"),
    (dict(key=3), TypeError, "key must be a jax PRNG key"),
  ],
)
def test_bad_hyperparameters_are_refused(kwargs, error, match):
  with pytest.raises(error, match=match):
    asam_jax.esam(**{"rho": 0.1, "beta": 0.5, "gamma": 0.5, "key": jax.random.key(0), **kwargs})


def test_a_scalar_loss_without_selection_trains():
  params = f32(W0)
  tx = optax.chain(asam_jax.esam(0.2, 0.5, 1.0, key=jax.random.key(0)), optax.sgd(0.1))
  state = tx.init(params)
  loss_fn = lambda p: ls_loss(p, X, Y)
  for _ in range(3):
    updates, state = tx.update(jax.grad(loss_fn)(params), state, params, loss_fn=loss_fn)
    params = optax.apply_updates(params, updates)
  assert float(loss_fn(params)) < float(loss_fn(f32(W0)))
