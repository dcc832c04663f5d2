"""asam_jax.perturbation against the float64 NumPy reference in reference.py."""

import dataclasses
import math

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from hypothesis import given

import asam_jax

P_VALUES = [2, math.inf, 3, 1.5, 1]


def _tree(seed=0):
  rng = np.random.default_rng(seed)
  return {
    "dense": {"kernel": rng.normal(size=(4, 3)), "bias": rng.normal(size=3)},
    "extra": [rng.normal(), rng.normal(size=(2, 2))],
  }


def _f32(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


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
  got = asam_jax.perturbation(_f32(g), _f32(w), rho=0.3, p=p, **kwargs)
  w_leaves = _leaves64(w)
  want = reference.perturbation(_leaves64(g), w_leaves, rho=0.3, p=p, **ref_kwargs(w_leaves))
  # jax.tree.leaves orders dict keys alphabetically: bias before kernel.
  assert [k.key for k in jax.tree_util.tree_leaves_with_path(w)[0][0]] == ["dense", "bias"]
  for a, b in zip(jax.tree.leaves(got), want):
    np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=2e-5, atol=1e-7)
  chex.assert_trees_all_equal_shapes_and_dtypes(got, _f32(w))


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
  w = _f32(_tree(1))
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
  g, w = _f32(_tree(0)), _f32(_tree(1))
  fn = jax.jit(lambda g, w, rho, eta: asam_jax.perturbation(g, w, rho=rho, eta=eta, adaptive=True))
  got = fn(g, w, 0.3, 0.01)
  wl = _leaves64(_tree(1))
  want = reference.perturbation(_leaves64(_tree(0)), wl, rho=0.3, eta=0.01, adaptive=[True] * 4)
  for a, b in zip(jax.tree.leaves(got), want):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)


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
  for a, b in zip(got_leaves, want):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale)
  if reference.dual_norm(_leaves64(g), w_leaves, eta=eta, adaptive=flags, p=p) > 0:
    norm = reference.ball_norm(got_leaves, w_leaves, eta=eta, adaptive=flags, p=p)
    np.testing.assert_allclose(norm, rho, rtol=2 * tol)
  else:
    assert all(not np.any(x) for x in got_leaves)


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
  w = _f32(_tree(1))
  with pytest.raises(error, match=match):
    asam_jax.perturbation(w, w, **kwargs)


def test_structure_mismatch_and_integer_leaves_are_refused():
  w = {"a": jnp.ones(2), "step": jnp.zeros([], jnp.int32)}
  with pytest.raises(ValueError, match="same tree structure"):
    asam_jax.perturbation({"a": jnp.ones(2)}, w, rho=0.1)
  with pytest.raises(TypeError, match=r"\['step'\] has dtype int32.*perturb_mask"):
    asam_jax.perturbation(w, w, rho=0.1)
  got = asam_jax.perturbation(w, w, rho=0.1, perturb_mask={"a": True, "step": False})
  assert got["step"].dtype == jnp.int32 and int(got["step"]) == 0
