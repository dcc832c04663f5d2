"""Guarded sums and inner products against float64, across the float32 range; the compiled size."""

import re

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference
from hypothesis import given, settings

import asam_jax
from asam_jax._layout import Layout
from asam_jax._norms import CHUNK, chunk_leaves, inner_products, pow2_inverse

PAIRS = [(0, 1), (1, 1), (0, 0)]


@jax.jit
def _products(x, y):
  (cross, yy, xx), (s_x, s_y) = inner_products([x, y], PAIRS, Layout(), range(len(x)))
  # The ratios the variants form: <x, y> / <y, y> and ||x|| / ||y||.
  return cross / yy * (s_y / s_x), jnp.sqrt(xx) / jnp.sqrt(yy) * (s_y / s_x)


@settings(max_examples=40)
@given(log_x=st.floats(-36, 37.5), log_y=st.floats(-36, 37.5), seed=st.integers(0, 2**31 - 1))
def test_ratios_of_inner_products_hold_anywhere_in_the_float32_range(log_x, log_y, seed):
  rng = np.random.default_rng(seed)
  # Normal floats only: XLA:CPU flushes subnormal inputs to zero.
  entries = lambda log, shape: 10**log * rng.uniform(0.01, 1, shape) * rng.choice([-1, 1], shape)
  x = [entries(log_x, (3, 4)), entries(log_x, 5)]
  y = [entries(log_y, (3, 4)), entries(log_y, 5)]
  x32, y32 = ([jnp.asarray(a, jnp.float32) for a in v] for v in (x, y))
  got_projection, got_ratio = _products(x32, y32)
  x64, y64 = (np.concatenate([np.asarray(a, np.float64).ravel() for a in v]) for v in (x32, y32))
  # In float64 the raw sums are exact enough: 1e37^2 * 17 is far from its range's edge.
  projection, ratio = (x64 @ y64) / (y64 @ y64), np.linalg.norm(x64) / np.linalg.norm(y64)
  # Where the true ratio is itself a normal float32, the computed one must match it.
  if 1e-36 < abs(projection) < 1e37:
    np.testing.assert_allclose(got_projection, projection, rtol=1e-4, atol=1e-6 * ratio)
  if 1e-36 < ratio < 1e37:
    np.testing.assert_allclose(got_ratio, ratio, rtol=1e-5)


def test_chunks_hold_every_leaf_once_empty_ones_included():
  xs = [np.zeros(0), np.zeros(5), np.zeros(0), np.zeros(CHUNK), np.zeros(CHUNK - 4), np.zeros(7)]
  chunks = chunk_leaves(Layout(), range(len(xs)), xs)
  assert sorted(k for _, positions in chunks for k in positions) == list(range(len(xs)))
  assert all(positions for _, positions in chunks)
  assert all(sum(xs[k].size for k in ps) <= CHUNK for _, ps in chunks)
  assert chunk_leaves(Layout(), [0], [np.zeros(0)]) == [((), [0])]


@pytest.mark.parametrize("largest", [1.2e-38, 3e-30, 1.0, 5e20, 3.4e38])
def test_pow2_inverse_rescales_exactly_into_two_to_four(largest):
  s = pow2_inverse(jnp.float32(largest))
  scaled = np.float64(np.float32(largest)) * np.float64(s)
  assert 2 <= scaled < 4
  assert np.log2(np.float64(s)) == round(np.log2(np.float64(s)))  # a power of two: exact


def test_pow2_inverse_keeps_zero_and_non_finite_values_as_they_are():
  for value in (0.0, np.inf, np.nan):
    s = pow2_inverse(jnp.float32(value))
    assert np.float32(value) * s == np.float32(value) or np.isnan(value)
    assert np.isfinite(s)


# --- the slow path on sharded leaves --------------------------------------------------


@pytest.mark.parametrize("scale", [1e-30, 1e25])
def test_the_rescaled_norm_sums_sharded_and_replicated_leaves_over_their_shards(scale):
  """FSDP inside shard_map: the slow path concatenates each group of leaves and psums it."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  mesh = jax.make_mesh((4,), ("d",))
  rng = np.random.default_rng(0)
  g = {"k": scale * rng.normal(size=(8, 3)), "b": scale * rng.normal(size=3)}
  w = {"k": rng.normal(size=(8, 3)), "b": rng.normal(size=3)}

  def eps(g, w):
    return asam_jax.perturbation(g, w, rho=0.5, adaptive=True, eta=0.01)

  specs = {"k": P("d"), "b": P()}
  put = lambda t: {
    n: jax.device_put(jnp.asarray(a, jnp.float32), NamedSharding(mesh, specs[n]))
    for n, a in t.items()
  }
  got = jax.jit(jax.shard_map(eps, mesh=mesh, in_specs=(specs, specs), out_specs=specs))(
    put(g), put(w)
  )
  g64, w64 = [g["b"], g["k"]], [w["b"], w["k"]]
  want = reference.perturbation(g64, w64, rho=0.5, eta=0.01, adaptive=[True, True])
  np.testing.assert_allclose(np.asarray(got["b"]), want[0], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(got["k"]), want[1], rtol=1e-5, atol=1e-7)


# --- the compiled program --------------------------------------------------------------


def _deep_mlp(layers, width=16):
  keys = jax.random.split(jax.random.key(0), layers)
  params = [{"w": jax.random.normal(k, (width, width)) / 4, "b": jnp.zeros(width)} for k in keys]

  def loss(params, x):
    for layer in params:
      x = jnp.tanh(x @ layer["w"] + layer["b"])
    return jnp.mean(x**2)

  return params, loss, jnp.ones((4, width))


def _instructions(tx, layers, closure=True):
  """Instructions of the compiled train step (every computation), and its top-level kernels."""
  params, loss, x = _deep_mlp(layers)

  def step(params, state):
    loss_fn = lambda p: loss(p, x)
    g = jax.grad(loss_fn)(params)
    extra = {"loss_fn": loss_fn} if closure else {"grad_fn": lambda p, _: jax.grad(loss_fn)(p)}
    updates, state = tx.update(g, state, params, **extra)
    return optax.apply_updates(params, updates), state

  text = jax.jit(step).lower(params, tx.init(params)).compile().as_text()
  return len(re.findall(r"^\s+%?\S+ = ", text, re.M))


OPTAX_SAM = optax.contrib.sam(
  optax.sgd(0.1), optax.chain(optax.contrib.normalize(), optax.sgd(0.05)), opaque_mode=True
)


# Compiles three steps of up to 160 leaves each, and optax's: the full run's.
@pytest.mark.slow
@pytest.mark.parametrize(
  "name, make",
  [
    ("sam", lambda: asam_jax.sam(0.05)),
    ("sam p=inf", lambda: asam_jax.sam(0.05, p=float("inf"))),
    ("asam", lambda: asam_jax.asam(0.5)),
    ("sam p=1", lambda: asam_jax.sam(0.05, p=1)),
    ("sam p=3", lambda: asam_jax.sam(0.05, p=3)),
    ("gsam", lambda: asam_jax.gsam(0.05, 0.1)),
    ("fisher_sam", lambda: asam_jax.fisher_sam(0.05, 1.0)),
  ],
  ids=lambda x: x if isinstance(x, str) else "",
)
def test_the_compiled_step_grows_linearly_with_the_leaves(name, make):
  """Each leaf adds a constant number of instructions: 20 to 40 to 80 layers double the growth.

  (The previous norms' guard copied a scalar chain into every leaf's fusion: quadratic for
  p = inf.) SAM's step is at optax.contrib.sam's size, within 10%.
  """
  tx = optax.chain(make(), optax.sgd(0.1))
  counts = [_instructions(tx, layers) for layers in (20, 40, 80)]
  growth = (counts[2] - counts[1]) / (counts[1] - counts[0])
  assert 1.8 < growth < 2.2, counts
  if name == "sam":
    assert counts[2] <= 1.1 * _instructions(OPTAX_SAM, 80, closure=False), counts
