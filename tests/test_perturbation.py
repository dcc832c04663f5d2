"""asam_jax.perturbation against the float64 NumPy reference in reference.py."""

import dataclasses
import functools
import math

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from helpers import f32
from hypothesis import given, settings

import asam_jax

P_VALUES = [2, math.inf, 3, 1.5, 1]


def _tree(seed=0):
  rng = np.random.default_rng(seed)
  return {
    "dense": {"kernel": rng.normal(size=(4, 3)), "bias": rng.normal(size=3)},
    "extra": [rng.normal(), rng.normal(size=(2, 2))],
  }


def _leaves64(tree):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


CASES = {
  # name: (perturbation kwargs, reference kwargs given the params' leaves)
  "sam": (dict(adaptive=False), lambda w: dict(eta=0.0)),
  "asam": (dict(adaptive=True, eta=0.01), lambda w: dict(eta=0.01, adaptive=[True] * len(w))),
  "asam_kernels": (
    dict(adaptive=True, eta=0.01, adaptive_mask=asam_jax.kernel_mask),
    lambda w: dict(eta=0.01, adaptive=[np.ndim(x) >= 2 for x in w]),
  ),
  "asam_eta0_masked": (
    dict(
      adaptive=True, eta=0.0, perturb_mask={"dense": {"kernel": True, "bias": False}, "extra": True}
    ),
    lambda w: dict(eta=0.0, adaptive=[True] * len(w), perturb=[False, True, True, True]),
  ),
}


@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, p):
  kwargs, ref_kwargs = CASES[case]
  g, w = _tree(0), _tree(1)
  got = asam_jax.perturbation(f32(g), f32(w), rho=0.3, p=p, **kwargs)
  w_leaves = _leaves64(w)
  want = reference.perturbation(_leaves64(g), w_leaves, rho=0.3, p=p, **ref_kwargs(w_leaves))
  # jax.tree.leaves orders dict keys alphabetically: bias before kernel.
  assert [k.key for k in jax.tree_util.tree_leaves_with_path(w)[0][0]] == ["dense", "bias"]
  chex.assert_trees_all_close(jax.tree.leaves(got), want, rtol=2e-5, atol=1e-7)
  chex.assert_trees_all_equal_shapes_and_dtypes(got, f32(w))


@pytest.mark.parametrize("p", P_VALUES)
def test_reference_attains_the_holder_maximum(p):
  """The reference is the maximizer: eps^T g = rho ||T g||_q on ||T^-1 eps||_p = rho."""
  g, w = _leaves64(_tree(0)), _leaves64(_tree(1))
  adaptive = [True] * len(w)
  e = reference.perturbation(g, w, rho=0.3, eta=0.1, adaptive=adaptive, p=p)
  np.testing.assert_allclose(
    reference.ball_norm(e, w, eta=0.1, adaptive=adaptive, p=p), 0.3, rtol=1e-12
  )
  value = reference.flat(e) @ reference.flat(g)
  np.testing.assert_allclose(
    value, 0.3 * reference.dual_norm(g, w, eta=0.1, adaptive=adaptive, p=p), rtol=1e-12
  )
  # Any other point of the ball does no better.
  rng = np.random.default_rng(0)
  for _ in range(20):
    other = [x + 0.05 * rng.normal(size=np.shape(x)) for x in e]
    other = [
      x * 0.3 / reference.ball_norm(other, w, eta=0.1, adaptive=adaptive, p=p) for x in other
    ]
    assert reference.flat(other) @ reference.flat(g) <= value + 1e-12


@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("adaptive", [False, True])
def test_zero_gradient_gives_zero_not_nan(p, adaptive):
  w = f32(_tree(1))
  got = asam_jax.perturbation(
    jax.tree.map(jnp.zeros_like, w), w, rho=0.5, eta=0.0, adaptive=adaptive, p=p
  )
  chex.assert_trees_all_equal(got, jax.tree.map(jnp.zeros_like, w))


def test_norm_is_accumulated_in_float32_for_half_precision():
  # 300^2 overflows float16 (max 65504); a float16 norm would give eps = 0.
  g = {"a": jnp.full((4,), 300.0, jnp.float16), "b": jnp.full((2,), -300.0, jnp.bfloat16)}
  w = {"a": jnp.ones((4,), jnp.float16), "b": jnp.ones((2,), jnp.bfloat16)}
  got = asam_jax.perturbation(g, w, rho=1.0)
  assert got["a"].dtype == jnp.float16 and got["b"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got["a"], np.float64), 1 / np.sqrt(6), rtol=1e-3)
  np.testing.assert_allclose(np.asarray(got["b"], np.float64), -1 / np.sqrt(6), rtol=1e-2)


def test_jits_with_traced_rho_and_eta():
  g, w = f32(_tree(0)), f32(_tree(1))
  fn = jax.jit(lambda g, w, rho, eta: asam_jax.perturbation(g, w, rho=rho, eta=eta, adaptive=True))
  got = fn(g, w, 0.3, 0.01)
  wl = _leaves64(_tree(1))
  want = reference.perturbation(_leaves64(_tree(0)), wl, rho=0.3, eta=0.01, adaptive=[True] * 4)
  chex.assert_trees_all_close(jax.tree.leaves(got), want, rtol=2e-5, atol=1e-7)


# --- property tests over random pytrees --------------------------------------

SHAPES = [(), (0,), (3,), (2, 3)]
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 8e-3, jnp.float16: 1e-3}


@dataclasses.dataclass(frozen=True)
class LeafSpec:
  shape: tuple
  dtype: type


leaf_specs = st.builds(LeafSpec, st.sampled_from(SHAPES), st.sampled_from(DTYPES))
tree_specs = st.recursive(
  leaf_specs,
  lambda children: st.one_of(
    st.dictionaries(st.sampled_from("abc"), children, min_size=1, max_size=3),
    st.lists(children, min_size=1, max_size=3),
    st.lists(children, min_size=1, max_size=3).map(tuple),
  ),
  max_leaves=5,
)


def _build(spec, rng, zeros):
  def leaf(s):
    shape, dtype = s.shape, s.dtype
    x = rng.normal(size=shape) * 10.0 ** rng.integers(-2, 3)
    if zeros:
      x = np.where(rng.random(size=shape) < 0.3, 0.0, x)
    return jnp.asarray(x, dtype)

  return jax.tree.map(leaf, spec)


@pytest.mark.slow
@given(
  spec=tree_specs,
  seed=st.integers(0, 2**31 - 1),
  p=st.sampled_from([2, math.inf, 3]),
  adaptive=st.booleans(),
  zeros=st.booleans(),
)
def test_property_random_pytrees(spec, seed, p, adaptive, zeros):
  rng = np.random.default_rng(seed)
  g, w = _build(spec, rng, zeros), _build(spec, rng, False)
  rho, eta = 0.7, 0.05
  got = asam_jax.perturbation(g, w, rho=rho, eta=eta, adaptive=adaptive, p=p)
  chex.assert_trees_all_equal_shapes_and_dtypes(got, w)
  got_leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(got)]
  assert all(np.all(np.isfinite(x)) for x in got_leaves)
  w_leaves = _leaves64(w)
  flags = [adaptive] * len(w_leaves)
  want = reference.perturbation(_leaves64(g), w_leaves, rho=rho, eta=eta, adaptive=flags, p=p)
  tol = max([TOL[x.dtype.type] for x in jax.tree.leaves(w)], default=1e-5)
  scale = max([np.abs(x).max(initial=0) for x in want], default=0)
  chex.assert_trees_all_close(got_leaves, want, rtol=tol, atol=tol * scale)
  if reference.dual_norm(_leaves64(g), w_leaves, eta=eta, adaptive=flags, p=p) > 0:
    norm = reference.ball_norm(got_leaves, w_leaves, eta=eta, adaptive=flags, p=p)
    np.testing.assert_allclose(norm, rho, rtol=2 * tol)
  else:
    assert all(not np.any(x) for x in got_leaves)


# --- magnitudes across each dtype's range ------------------------------------

# The normal range of each dtype, kept clear of its edges by T <= 1 + eta.
RANGES = {
  jnp.float32: (1.2e-38, 3.3e38),
  jnp.bfloat16: (1.2e-38, 3.3e38),
  jnp.float16: (6.2e-5, 6.4e4),
}
ETA = 0.01


@functools.cache
def _jitted(p, adaptive):
  return jax.jit(lambda g, w: asam_jax.perturbation(g, w, rho=0.5, eta=ETA, adaptive=adaptive, p=p))


@pytest.mark.parametrize("dtype", list(RANGES))
@pytest.mark.parametrize("p", [2, math.inf, 1, 3])
@pytest.mark.parametrize("adaptive", [False, True])
@settings(max_examples=12)
@given(log_scale=st.floats(0, 1), seed=st.integers(0, 2**31 - 1))
def test_radius_is_rho_for_gradients_across_the_dtype_range(dtype, p, adaptive, log_scale, seed):
  """||T^-1 eps||_p = rho, eps finite, for gradients anywhere in the dtype's normal range.

  A sum of squares in float32 overflows from 1.8e19 and underflows below 1e-19;
  the guarded norm must not.
  """
  lo, hi = RANGES[dtype]
  rng = np.random.default_rng(seed)
  # Entries spread over two decades below a largest magnitude drawn log-uniformly,
  # and T g >= eta g stays a normal number.
  top = np.exp(np.log(lo * 1e4) + log_scale * (np.log(hi / (1 + ETA)) - np.log(lo * 1e4)))
  g = {
    "k": top * rng.uniform(0.01, 1, (3, 4)) * rng.choice([-1, 1], (3, 4)),
    "b": top * rng.uniform(0.01, 1, 5) * rng.choice([-1, 1], 5),
  }
  w = {"k": rng.uniform(-1, 1, (3, 4)), "b": rng.uniform(-1, 1, 5)}
  g, w = jax.tree.map(lambda x: jnp.asarray(x, dtype), (g, w))
  eps = _jitted(p, adaptive)(g, w)
  eps64, w64 = _leaves64(eps), _leaves64(w)
  assert all(np.all(np.isfinite(e)) for e in eps64)
  flags = [adaptive] * 2
  reached = reference.ball_norm(eps64, w64, eta=ETA, adaptive=flags, p=p)
  tol = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 3e-3}[dtype]
  np.testing.assert_allclose(reached, 0.5, rtol=tol)
  want = reference.perturbation(_leaves64(g), w64, rho=0.5, eta=ETA, adaptive=flags, p=p)
  scale = max(np.abs(x).max() for x in want)
  chex.assert_trees_all_close(eps64, want, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("p", [2, math.inf, 1, 3])
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_a_non_finite_gradient_makes_every_eps_nan(p, bad):
  """Never a finite wrong step: optax.apply_if_finite can then skip it."""
  w = f32(_tree(1))
  g = f32(_tree(0))
  g["dense"]["kernel"] = g["dense"]["kernel"].at[1, 2].set(bad)
  got = asam_jax.perturbation(g, w, rho=0.5, eta=ETA, adaptive=True, p=p)
  assert all(np.all(np.isnan(x)) for x in jax.tree.leaves(got))


@pytest.mark.parametrize("name", ["rho", "eta"])
@pytest.mark.parametrize("value", [-0.1, np.nan, np.inf])
def test_invalid_run_time_hyperparameters_make_eps_nan(name, value):
  """A schedule crossing zero, or a value injected under jit, cannot be checked up front."""
  g, w = f32(_tree(0)), f32(_tree(1))
  fn = jax.jit(
    lambda h: asam_jax.perturbation(g, w, adaptive=True, **{"rho": 0.3, "eta": 0.01, name: h})
  )
  assert all(np.all(np.isnan(x)) for x in jax.tree.leaves(fn(jnp.float32(value))))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(fn(jnp.float32(0.2))))


def test_tiny_nonzero_gradients_are_normalized_exactly_by_default():
  """The old eps guard (1e-12) shrank eps for ||g|| < eps; the default now normalizes any g != 0."""
  w = {"w": jnp.ones(3)}
  g = {"w": jnp.array([3e-30, 4e-30, 0.0])}
  np.testing.assert_allclose(asam_jax.perturbation(g, w, rho=0.5)["w"], [0.3, 0.4, 0.0], rtol=1e-6)
  # eps > 0 restores a floor on the norm divided by.
  np.testing.assert_allclose(
    asam_jax.perturbation(g, w, rho=0.5, eps=1e-12)["w"], [1.5e-18, 2e-18, 0.0], rtol=1e-6
  )


def test_grads_of_another_shape_are_refused_with_the_leaf_path():
  w = {"a": jnp.ones((2, 3)), "b": jnp.ones(3)}
  with pytest.raises(ValueError, match=r"differ in shape at \['a'\].*\(3, 2\).*\(2, 3\)"):
    asam_jax.perturbation({"a": jnp.ones((3, 2)), "b": jnp.ones(3)}, w, rho=0.1)


# --- bad input ---------------------------------------------------------------


@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    (dict(rho=-0.1), ValueError, "rho must be finite and >= 0"),
    (dict(rho=float("nan")), ValueError, "rho must be finite"),
    (dict(rho=0.1, eta=-1.0), ValueError, "eta must be finite and >= 0"),
    (dict(rho=0.1, p=0.5), ValueError, "p must be >= 1"),
    (dict(rho=0.1, p="2"), TypeError, "p must be a real number"),
    (dict(rho=0.1, eps=-1e-3), ValueError, "eps must be finite and >= 0"),
    (dict(rho=jnp.ones(2)), TypeError, "rho must be a real scalar"),
    (
      dict(rho=0.1, perturb_mask={"dense": True}),
      ValueError,
      "perturb_mask must be a pytree of bools",
    ),
    (
      dict(rho=0.1, adaptive=True, adaptive_mask=lambda p: [True]),
      ValueError,
      "adaptive_mask must be",
    ),
  ],
)
def test_bad_input_is_refused(kwargs, error, match):
  w = f32(_tree(1))
  with pytest.raises(error, match=match):
    asam_jax.perturbation(w, w, **kwargs)


def test_structure_mismatch_and_integer_leaves_are_refused():
  w = {"a": jnp.ones(2), "step": jnp.zeros([], jnp.int32)}
  with pytest.raises(ValueError, match="same tree structure"):
    asam_jax.perturbation({"a": jnp.ones(2)}, w, rho=0.1)
  with pytest.raises(
    TypeError, match=r"\['step'\] has dtype int32.*Leave it out with perturb_mask"
  ):
    asam_jax.perturbation(w, w, rho=0.1)
  got = asam_jax.perturbation(w, w, rho=0.1, perturb_mask={"a": True, "step": False})
  assert got["step"].dtype == jnp.int32 and int(got["step"]) == 0
