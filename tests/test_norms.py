"""Guarded sums and inner products against float64, across the float32 range."""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from asam_jax._layout import Layout
from asam_jax._norms import inner_products, pow2_inverse

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
