"""Mixed precision (issues 17 and 18), the recipes of docs/mixed_precision.md.

- bfloat16 compute with float32 master weights: a few SAM and ASAM steps follow the float32
  run, eps stays whole in the master weights (the state reports rho), and nothing warns.
- bfloat16 params: the one-time warning, and the state's radius equals the radius a float64
  NumPy computation finds after rounding ``w + eps`` to bfloat16.
- float16 compute with jmp's dynamic loss scaling, for every closure-based method: a few
  steps follow the float32 run, the steps do not depend on the loss scale (bit for bit), and
  a step whose clean gradient or whose perturbed gradient overflows is skipped, with every
  state kept, and the scale halved.
"""

import functools
import re
import warnings
from pathlib import Path

import chex
import helpers
import jax
import jax.numpy as jnp
import jmp
import numpy as np
import optax
import pytest

import asam_jax
from asam_jax import _ascent

F32 = jmp.get_policy("params=float32,compute=float32,output=float32")
BF16 = jmp.get_policy("params=float32,compute=bfloat16,output=float32")
F16 = jmp.get_policy("params=float32,compute=float16,output=float32")
SIZES = [2, 32, 32, 2]
STEPS = 3  # looksam's k = 2: a full step, a reuse step and a full step
SCALE = 2.0**10  # float16's largest value is 65504: gradients of size ~1 times 2^10 fit


@functools.cache
def problem():
  """The spirals and a ReLU MLP (1.2k weights) of tests/helpers.py, in float32."""
  x, labels = helpers.spirals(64, jax.random.key(1))
  return helpers.mlp_init(jax.random.key(0), SIZES), x, labels


def flat(tree):
  return np.concatenate([np.asarray(a, np.float64).ravel() for a in jax.tree.leaves(tree)])


def relative_gap(params, want, start):
  """``||params - want|| / ||want - start||``: how far a run strays, against how far it went."""
  return np.linalg.norm(flat(params) - flat(want)) / np.linalg.norm(flat(want) - flat(start))


@pytest.fixture
def fresh_warning(monkeypatch):
  """The low-precision warning is once per process and name: forget the names warned of."""
  monkeypatch.setattr(_ascent, "_WARNED", set())


def low_precision_warnings(record):
  return [w for w in record if "below float32" in str(w.message)]


# --- losses ------------------------------------------------------------------------------


def losses(policy, params, batch):
  """Per-example cross-entropy under ``policy``, plus a cliff at ``anchor``.

  The cliff ``sum((c (w - anchor))^2)``, with ``w - anchor`` in the compute dtype, has a zero
  gradient at ``w = anchor`` and a gradient of ``2 c^2 (w - anchor)`` elsewhere: with ``c``
  large it overflows float16 at ``w + eps`` only. ``c = 0`` in training.
  """
  x, labels, anchor, c = batch
  compute = policy.cast_to_compute(params)
  logits = helpers.mlp_apply(compute, policy.cast_to_compute(x))
  out = optax.softmax_cross_entropy_with_integer_labels(policy.cast_to_output(logits), labels)
  anchor = policy.cast_to_compute(anchor)
  gaps = jax.tree.map(lambda w, a: c.astype(w.dtype) * (w - a), compute, anchor)
  cliff = sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(gaps))
  return out + cliff


def training_batch(params=None, c=0.0):
  p, x, labels = problem()
  return x, labels, p if params is None else params, jnp.asarray(c, jnp.float32)


# --- the methods that take a loss closure --------------------------------------------------

# The registry's closure-based methods, and those it does not hold (yet).
EXTRA = {
  "fisher_sam": helpers.Method(asam_jax.fisher_sam, lambda: dict(rho=0.1, eta=1.0)),
  "friendly_sam": helpers.Method(
    asam_jax.friendly_sam, lambda: dict(rho=helpers.RHO, sigma=1.0, lmbda=0.9)
  ),
  "esam": helpers.Method(
    asam_jax.esam, lambda: dict(rho=helpers.RHO, beta=0.5, gamma=1.0, key=jax.random.key(3))
  ),
  # gamma < 1: the closure returns per-example losses and the sharpest half is kept.
  "esam_selection": helpers.Method(
    asam_jax.esam, lambda: dict(rho=helpers.RHO, beta=1.0, gamma=0.5, key=jax.random.key(3))
  ),
  "bayesian_sam": helpers.Method(
    asam_jax.bayesian_sam,
    lambda: dict(learning_rate=helpers.LR, rho=0.01, num_data=10_000, key=jax.random.key(5)),
    optimizer=True,
  ),
}
METHODS = {**EXTRA, **{n: m for n, m in helpers.METHODS.items() if m.closure}}
# SAM in the fast tier (pytest -m "not slow"); each other method compiles two more steps,
# about 1 s each on XLA:CPU.
FAST = ("sam",)


def each(names):
  return [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in names]


# Those that read the clean gradient (random SAM and Bayesian SAM take their own).
CLEAN = [n for n in METHODS if n not in ("random_sam", "bayesian_sam")]


def per_example(method):
  return method.kwargs.get("gamma", 1.0) < 1


# --- the recipes ---------------------------------------------------------------------------


def bf16_step(tx, policy):
  """Recipe 1: float32 master weights, the loss computed under ``policy``."""

  @jax.jit
  def step(params, opt_state, batch):
    loss_fn = lambda p: losses(policy, p, batch).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params, loss_fn=loss_fn)
    return optax.apply_updates(params, updates), opt_state

  return step


def dynamic(scale):
  """jmp's dynamic loss scale, starting at ``scale`` (float32, as jmp keeps it)."""
  return jmp.DynamicLossScale(jnp.asarray(scale, jnp.float32))


def f16_grads(params, loss_scale, batch):
  """Recipe 2's clean pass: the scaled loss's gradient (the scaled closure is rebuilt in
  ``f16_apply``, which takes the gradient so that a test can hand it an overflowed one)."""
  loss = lambda p: loss_scale.scale(losses(F16, p, batch).mean())
  return jax.grad(loss)(params)


def f16_apply(tx, method):
  """Recipe 2's update: ``loss_fn`` and ``grads`` scaled, ``loss_scale=`` to unscale, the step
  and every state kept where either gradient is not finite, the scale adjusted. Returns
  whether the update alone is finite too, for the tests."""
  reduce = (lambda v: v) if per_example(method) else jnp.mean

  @jax.jit
  def apply(params, opt_state, loss_scale, grads, batch):
    loss_fn = lambda p: loss_scale.scale(reduce(losses(F16, p, batch)))
    updates, new_state = tx.update(
      grads, opt_state, params, loss_fn=loss_fn, loss_scale=loss_scale.loss_scale
    )
    # The clean gradient, and the update for the perturbed one.
    finite = jmp.all_finite((grads, updates))
    new_params = optax.apply_updates(params, updates)
    params, opt_state = jmp.select_tree(finite, (new_params, new_state), (params, opt_state))
    return params, opt_state, loss_scale.adjust(finite), finite, jmp.all_finite(updates)

  return apply


def f32_step(tx, method):
  """The float32 run the float16 one is checked against: the same loss, no scaling."""
  reduce = (lambda v: v) if per_example(method) else jnp.mean

  @jax.jit
  def step(params, opt_state, batch):
    grads = jax.grad(lambda p: losses(F32, p, batch).mean())(params)
    loss_fn = lambda p: reduce(losses(F32, p, batch))
    updates, opt_state = tx.update(grads, opt_state, params, loss_fn=loss_fn)
    return optax.apply_updates(params, updates), opt_state

  return step


# --- bfloat16 compute, float32 master weights -------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sam", "asam"])
def test_bf16_compute_with_float32_master_weights_follows_float32(name, fresh_warning):
  method = METHODS[name]
  tx, _, _, f32 = compiled(name)
  params, _, _ = problem()
  runs = {}
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    for policy, step in ((F32, f32), (BF16, bf16_step(tx, BF16))):
      p, state = params, tx.init(params)
      for _ in range(STEPS):
        p, state = step(p, state, training_batch())
      runs[policy] = p, state
  assert low_precision_warnings(record) == []
  (want, _), (got, state) = runs[F32], runs[BF16]
  assert jax.tree.leaves(got)[0].dtype == jnp.float32
  # bfloat16 rounds to 2^-9 relative: three steps stray 1.0% (SAM) and 3.3% (ASAM) of the
  # way they go, about what a 10% change of rho does (2.7%, 3.4%); the same steps without
  # the perturbation (rho = 0) stray 30%.
  assert relative_gap(got, want, params) < 0.1
  # eps is float32 in the master weights: its radius is rho, to float32 rounding.
  np.testing.assert_allclose(state[0].perturbation_norm, method.kwargs["rho"], rtol=1e-6)


# --- bfloat16 params: the warning and the radius reached --------------------------------------


@pytest.mark.slow
def test_bf16_params_warn_once_and_report_the_radius_after_rounding(fresh_warning):
  params32, x, labels = problem()
  params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params32)
  loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
    helpers.mlp_apply(p, x.astype(jnp.bfloat16)).astype(jnp.float32), labels
  ).mean()
  grads = jax.jit(jax.grad(loss_fn))(params)
  rho = 0.01
  tx = asam_jax.sam(rho=rho)
  update = lambda g, p: tx.update(g, tx.init(p), p, loss_fn=loss_fn)
  with pytest.warns(UserWarning, match="below float32") as record:
    _, state = jax.jit(update)(grads, params)
  (message,) = [str(w.message) for w in low_precision_warnings(record)]
  assert "[0]['b'], [0]['w'], [1]['b'], ..." in message  # the leaves, by path
  assert "float32 master weights" in message and "jmp.get_policy" in message  # the fix
  assert "sam perturbs" in message
  # Once per process and name: another trace says nothing more.
  with warnings.catch_warnings(record=True) as again:
    warnings.simplefilter("always")
    jax.make_jaxpr(update)(grads, params)
  assert low_precision_warnings(again) == []

  # The radius reached, independently: eps in float32 from the same gradient, w + eps rounded
  # to bfloat16 (NumPy's ml_dtypes, round to nearest even), the difference and norm in float64.
  as32 = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float32), t)
  eps = as32(jax.jit(functools.partial(asam_jax.perturbation, rho=rho))(as32(grads), as32(params)))
  rounded = jax.tree.map(lambda w, e: (w + e).astype(jnp.bfloat16), as32(params), eps)
  reached = np.linalg.norm(flat(rounded) - flat(params))
  np.testing.assert_allclose(state.perturbation_norm, reached, rtol=1e-6)
  # What the warning is about: most of eps is lost, and the radius falls short of rho.
  lost = np.mean((flat(rounded) == flat(params)) & (flat(eps) != 0))
  assert lost > 0.5 and abs(reached - rho) > 0.01 * rho


# --- float16 compute with dynamic loss scaling, every closure-based method --------------------


@functools.cache
def compiled(name):
  """The method's float16 update and float32 step, compiled once for the tests below."""
  method = METHODS[name]
  tx = method.chain()
  return tx, jax.jit(f16_grads), f16_apply(tx, method), f32_step(tx, method)


def f16_steps(name, scale, steps=STEPS):
  tx, grads_of, apply, _ = compiled(name)
  params, _, _ = problem()
  loss_scale = dynamic(scale)
  state, batch, finite = tx.init(params), training_batch(), []
  for _ in range(steps):
    g = grads_of(params, loss_scale, batch)
    params, state, loss_scale, ok, _ = apply(params, state, loss_scale, g, batch)
    finite.append(bool(ok))
  return params, state, loss_scale, finite


@pytest.mark.parametrize("name", each(METHODS))
def test_f16_dynamic_loss_scaling_follows_float32(name):
  tx, _, _, step = compiled(name)
  params, _, _ = problem()
  want, state = params, tx.init(params)
  for _ in range(STEPS):
    want, state = step(want, state, training_batch())
  got, got_state, loss_scale, finite = f16_steps(name, SCALE)
  assert all(finite) and float(loss_scale.loss_scale) == SCALE
  # float16 rounds to 2^-12 relative: three steps stray at most 0.64% (GSAM) of the way
  # they go, 0.23% for SAM; a 10% change of rho gives 2.7%, rho = 0 30%.
  assert relative_gap(got, want, params) < 0.02
  # The state's L(w + eps) comes out unscaled (scaled, it would be 2^10 times this).
  perturbed_loss = lambda s: getattr(s[0], "sam", s[0]).perturbed_loss  # LookSAM's in .sam
  np.testing.assert_allclose(perturbed_loss(got_state), perturbed_loss(state), rtol=0.01)


@pytest.mark.parametrize("name", each(METHODS))
def test_f16_steps_do_not_depend_on_the_loss_scale(name):
  # Scales that are powers of two (jmp's: it halves and doubles) multiply every float16
  # product and sum of the backward pass exactly, and loss_scale= divides exactly, so the
  # perturbation, the update and the states are the same bit for bit, as long as no
  # gradient overflows or falls below float16's normal range (6e-5) at either scale (at 2^6
  # one coordinate of the clean gradient does, by the third step, and LookSAM's stored g_v
  # then differs by 1e-9 in one coordinate).
  a = f16_steps(name, 2.0**8)
  b = f16_steps(name, 2.0**12)
  chex.assert_trees_all_equal(helpers.host(a[:2]), helpers.host(b[:2]))
  assert a[3] == b[3] == [True] * STEPS


def assert_skipped(name, params, grads, batch, scale):
  """The step from a fresh state is skipped: params and state kept, the scale halved. Returns
  whether the update itself was finite."""
  tx, _, apply, _ = compiled(name)
  state = tx.init(params)
  loss_scale = dynamic(scale)
  new_params, new_state, new_scale, finite, update_finite = apply(
    params, state, loss_scale, grads, batch
  )
  assert not finite
  chex.assert_trees_all_equal(helpers.host(new_params), helpers.host(params))
  chex.assert_trees_all_equal(helpers.host(new_state), helpers.host(state))
  assert float(new_scale.loss_scale) == scale / 2
  return bool(update_finite)


@pytest.mark.parametrize("name", each(METHODS))
def test_f16_overflow_at_a_huge_loss_scale_is_skipped(name):
  params, _, _ = problem()
  batch = training_batch()
  # 2^24: the gradient of the logits alone, 2^24 / 64 per example, is past float16's 65504.
  scale = 2.0**24
  _, grads_of, _, _ = compiled(name)
  grads = grads_of(params, dynamic(scale), batch)
  assert not jmp.all_finite(grads)
  assert not assert_skipped(name, params, grads, batch, scale)


# ESAM perturbs the leaves it draws; an undrawn leaf's inf (here [0]['w'] is not drawn) still
# makes the update NaN.
@pytest.mark.parametrize("name", each(CLEAN))
def test_f16_clean_gradient_overflow_alone_is_skipped(name):
  # The clean pass overflowed (one coordinate inf, as float16 gives), the closure is finite.
  params, _, _ = problem()
  batch = training_batch()
  _, grads_of, _, _ = compiled(name)
  grads = grads_of(params, dynamic(SCALE), batch)
  grads[0]["w"] = grads[0]["w"].at[0, 0].set(jnp.inf)
  update_finite = assert_skipped(name, params, grads, batch, SCALE)
  # And the library's own guard: eps is NaN, so the update is.
  assert not update_finite


@pytest.mark.parametrize("name", each(METHODS))
def test_f16_perturbed_gradient_overflow_alone_is_skipped(name):
  params, _, _ = problem()
  # The cliff at w: the clean gradient is the training one, finite; at w + eps the cliff's
  # gradient 2 c^2 eps times the scale, ~2e6 |eps| 2^10, is past 65504 wherever |eps| > 3e-5
  # (Bayesian SAM's own first gradient, at w plus noise, overflows too).
  batch = training_batch(params, c=1000.0)
  _, grads_of, _, _ = compiled(name)
  grads = grads_of(params, dynamic(SCALE), batch)
  want = grads_of(params, dynamic(SCALE), training_batch())
  chex.assert_trees_all_equal(helpers.host(grads), helpers.host(want))
  assert not assert_skipped(name, params, grads, batch, SCALE)


@pytest.mark.slow
def test_apply_if_finite_inside_the_chain_skips_the_step_and_the_variant_keeps_its_state():
  # optax.apply_if_finite after the variant keeps the optimizer's state and the params, and
  # Friendly SAM keeps its running mean: the next, finite, step trains.
  params, _, _ = problem()
  batch = training_batch()
  tx = optax.chain(
    asam_jax.friendly_sam(rho=helpers.RHO), optax.apply_if_finite(optax.sgd(helpers.LR), 5)
  )
  state = tx.init(params)
  loss_fn = lambda p: losses(F32, p, batch).mean()
  update = jax.jit(lambda g, s: tx.update(g, s, params, loss_fn=loss_fn))
  grads = jax.grad(loss_fn)(params)
  bad = jax.tree.map(lambda g: g, grads)
  bad[0]["w"] = bad[0]["w"].at[0, 0].set(jnp.inf)
  updates, state = update(bad, state)
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))  # skipped
  assert jmp.all_finite(state[0].momentum)  # m as it was
  updates, state = update(grads, state)
  assert any(bool(jnp.any(u != 0)) for u in jax.tree.leaves(updates))  # the next step trains
  np.testing.assert_allclose(float(state[0].perturbation_norm), helpers.RHO, rtol=1e-5)


# --- docs/mixed_precision.md --------------------------------------------------------------

DOC = Path(__file__).resolve().parent.parent / "docs" / "mixed_precision.md"


@pytest.mark.slow
def test_the_recipes_in_the_docs_run():
  blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)
  assert len(blocks) == 2
  scope = {}
  exec(blocks[0], scope)  # the second continues the first
  assert scope["params"]["w1"].dtype == jnp.float32 and np.isfinite(scope["value"])
  exec(blocks[1], scope)
  assert float(scope["loss_scale"].loss_scale) == 2.0**15
  assert jmp.all_finite(scope["params"])


def mlp_100k(seed):
  """The docs' measurement: a 99,530-weight ReLU MLP, 256 Gaussian inputs, random labels."""
  params = helpers.mlp_init(jax.random.key(seed), [64, 256, 256, 64, 10])
  kx, ky = jax.random.split(jax.random.key(100 + seed))
  x, labels = jax.random.normal(kx, (256, 64)), jax.random.randint(ky, (256,), 0, 10)
  return params, x, labels


@pytest.mark.slow
def test_bf16_params_lose_most_of_eps_on_a_100k_weight_mlp(fresh_warning):
  # The numbers of docs/mixed_precision.md, for its first seed.
  params32, x, labels = mlp_100k(0)
  assert flat(params32).size == 99_530
  bf16 = lambda t: jax.tree.map(lambda a: a.astype(jnp.bfloat16), t)
  as32 = lambda t: jax.tree.map(lambda a: a.astype(jnp.float32), t)
  loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
    helpers.mlp_apply(bf16(p), x.astype(jnp.bfloat16)).astype(jnp.float32), labels
  ).mean()
  loss32 = lambda p: helpers.xent(p, x, labels)
  rho = 0.01
  tx = asam_jax.sam(rho=rho)
  sam = jax.jit(lambda g, p, f: tx.update(g, tx.init(p), p, loss_fn=f), static_argnums=2)
  eps_of = jax.jit(functools.partial(asam_jax.perturbation, rho=rho))
  cosine = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)

  g32 = jax.grad(loss32)(params32)
  correction = flat(sam(g32, params32, loss32)[0]) - flat(g32)  # g(w + eps) - g(w), float32
  # bfloat16 params
  params = bf16(params32)
  g = jax.grad(loss_fn)(params)
  with pytest.warns(UserWarning, match="below float32"):
    updates, state = sam(g, params, loss_fn)
  eps = flat(eps_of(as32(g), as32(params)))
  w = flat(params)
  reached = flat(bf16(jax.tree.map(jnp.add, as32(params), eps_of(as32(g), as32(params))))) - w
  lost = np.mean(reached[eps != 0] == 0)
  assert 0.93 < lost < 0.96  # 94.3%
  assert 0.6 < cosine(reached, eps) < 0.7  # 0.66
  np.testing.assert_allclose(state.perturbation_norm, np.linalg.norm(reached), rtol=1e-6)
  assert 0.75 < state.perturbation_norm / rho < 0.85  # 0.80
  assert 0.45 < flat(g) @ reached / (flat(g) @ eps) < 0.6  # 0.53 of the loss increase
  size = np.linalg.norm(flat(updates) - flat(g)) / np.linalg.norm(correction)
  assert 0.5 < size < 0.65  # 0.58 of SAM's correction
  # float32 master weights, bfloat16 compute
  g = jax.grad(loss_fn)(params32)
  updates, state = sam(g, params32, loss_fn)
  np.testing.assert_allclose(state.perturbation_norm, rho, rtol=1e-6)
  eps = eps_of(g, params32)
  seen = flat(bf16(jax.tree.map(jnp.add, params32, eps))) - flat(bf16(params32))
  assert 0.95 < flat(g) @ seen / (flat(g) @ flat(eps)) < 1.05  # 1.04: unbiased
  size = np.linalg.norm(flat(updates) - flat(g)) / np.linalg.norm(correction)
  assert 0.9 < size < 1.1  # 1.03
