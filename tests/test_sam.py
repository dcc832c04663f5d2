"""sam and asam as optax transformations, against float64 NumPy references."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference
from helpers import (
  W0,
  X,
  Y,
  assert_close,
  f32,
  ls_grad64,
  ls_loss,
  ls_loss64,
  ls_step,
  mlp_apply,
  mlp_init,
  one_update,
  rescale,
  sam_grad64,
  spirals,
  tiered,
  train,
  xent,
)

import asam_jax

METHODS = {
  "sam": (lambda: asam_jax.sam(rho=0.2), dict(rho=0.2)),
  "sam_pinf": (lambda: asam_jax.sam(rho=0.05, p=float("inf")), dict(rho=0.05, p=np.inf)),
  "asam": (lambda: asam_jax.asam(rho=0.5, eta=0.01), dict(rho=0.5, eta=0.01, adaptive=True)),
  "asam_p3": (
    lambda: asam_jax.asam(rho=0.5, eta=0.01, p=3),
    dict(rho=0.5, eta=0.01, adaptive=True, p=3.0),
  ),
  "asam_kernels": (
    lambda: asam_jax.asam(rho=0.5, eta=0.01, adaptive_mask=asam_jax.kernel_mask),
    dict(rho=0.5, eta=0.01, adaptive_flags=[False, True]),
  ),
}


@pytest.mark.parametrize("method", METHODS)
def test_update_is_gradient_at_perturbed_weights(method):
  make, ref_kwargs = METHODS[method]
  grads, state = one_update(make(), f32(W0), X, Y)
  want, e, perturbed_loss = sam_grad64(W0, X, Y, **ref_kwargs)
  assert_close(grads, want)
  np.testing.assert_allclose(state.perturbed_loss, perturbed_loss, rtol=1e-5)
  # The radius reached in the ball's own norm: rho, here computed from eps itself.
  reached = reference.ball_norm(
    [e["b"], e["w"]],
    [W0["b"], W0["w"]],
    eta=ref_kwargs.get("eta", 0.0),
    adaptive=ref_kwargs.get("adaptive_flags", [ref_kwargs.get("adaptive", False)] * 2),
    p=ref_kwargs.get("p", 2.0),
  )
  np.testing.assert_allclose(state.perturbation_norm, reached, rtol=1e-5)
  np.testing.assert_allclose(reached, ref_kwargs["rho"], rtol=1e-9)
  assert int(state.count) == 1


BASE_OPTIMIZERS = {
  "sgd_momentum_wd": optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9)),
  "adam_clip": optax.chain(optax.clip_by_global_norm(0.5), optax.adam(1e-2)),
  "adamw": optax.adamw(1e-2, weight_decay=1e-2),
}


@pytest.mark.parametrize("base", tiered(list(BASE_OPTIMIZERS), ["sgd_momentum_wd", "adamw"]))
def test_chain_feeds_the_sam_gradient_to_any_optimizer(base):
  """chain(asam, opt) is opt applied to the reference ASAM gradient, over 3 steps."""
  opt = BASE_OPTIMIZERS[base]
  tx = optax.chain(asam_jax.asam(rho=0.5, eta=0.01), opt)

  step = ls_step(tx)

  params, state = f32(W0), tx.init(f32(W0))
  ref_params, ref_state = f32(W0), opt.init(f32(W0))
  for _ in range(3):
    params, state = step(params, state)
    w64 = jax.tree.map(lambda a: np.asarray(a, np.float64), ref_params)
    g_adv = f32(sam_grad64(w64, X, Y, rho=0.5, eta=0.01, adaptive=True)[0])
    updates, ref_state = opt.update(g_adv, ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, updates)
  chex.assert_trees_all_close(params, ref_params, rtol=1e-5, atol=1e-6)


# --- a jit-compiled training loop ----------------------------------------------


@pytest.mark.slow
def test_jitted_training_loop_reaches_low_loss():
  x, labels = spirals(256, jax.random.key(1))
  params = mlp_init(jax.random.key(0), [2, 64, 64, 2])
  tx = optax.chain(asam_jax.asam(rho=0.5, eta=0.01), optax.sgd(0.1, momentum=0.9))
  params, state, losses = jax.jit(train, static_argnums=(0, 4))(tx, params, x, labels, 1500)
  accuracy = jnp.mean(jnp.argmax(mlp_apply(params, x), -1) == labels)
  assert losses[0] > 0.6 and losses[-1] < 0.1, (losses[0], losses[-1])
  assert accuracy > 0.97
  assert int(state[0].count) == 1500 and float(state[0].perturbed_loss) >= float(losses[-1])


@pytest.mark.slow
def test_rho_zero_reproduces_the_base_trajectory():
  x, labels = spirals(64, jax.random.key(1))
  params = mlp_init(jax.random.key(0), [2, 16, 2])
  base = optax.sgd(0.1, momentum=0.9)
  run = jax.jit(train, static_argnums=(0, 4))
  with_sam, _, _ = run(optax.chain(asam_jax.sam(rho=0.0), base), params, x, labels, 20)
  plain, _, _ = run(base, params, x, labels, 20)
  chex.assert_trees_all_close(with_sam, plain, rtol=1e-6, atol=1e-7)
  with_asam, _, _ = run(optax.chain(asam_jax.asam(rho=0.0), base), params, x, labels, 20)
  chex.assert_trees_all_close(with_asam, plain, rtol=1e-6, atol=1e-7)


# --- schedules and run-time hyperparameters -----------------------------------


def _norms_over_steps(tx, steps):
  step = ls_step(tx)

  params, state, norms = f32(W0), tx.init(f32(W0)), []
  for _ in range(steps):
    params, state = step(params, state)
    norms.append(float(state[0].perturbation_norm))
  return np.array(norms)


def test_rho_schedule_advances_every_update():
  schedule = optax.linear_schedule(0.2, 0.0, transition_steps=4)
  norms = _norms_over_steps(optax.chain(asam_jax.sam(rho=schedule), optax.sgd(0.01)), 6)
  # For SAM ||eps||_2 = rho exactly, so the norms trace the schedule.
  np.testing.assert_allclose(norms, [0.2, 0.15, 0.1, 0.05, 0.0, 0.0], atol=1e-6)


def test_eta_schedule_advances_every_update():
  tx = asam_jax.asam(rho=0.5, eta=optax.linear_schedule(0.0, 1.0, transition_steps=1))
  params = f32(W0)
  state = tx.init(params)
  loss_fn = lambda p: ls_loss(p, X, Y)
  grads = jax.grad(loss_fn)(params)
  for eta in (0.0, 1.0):
    updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    assert_close(updates, sam_grad64(W0, X, Y, rho=0.5, eta=eta, adaptive=True)[0], rtol=5e-5)


def test_inject_hyperparams_changes_rho_at_run_time():
  # p and ascent_steps shape the computation, so they stay static; without static_args
  # the error names both.
  with pytest.raises(TypeError, match=r"static_args=\('p', 'ascent_steps'\)"):
    one_update(optax.inject_hyperparams(asam_jax.sam)(rho=0.2), f32(W0), X, Y)
  statics = ("p", "ascent_steps")
  tx = optax.chain(
    optax.inject_hyperparams(asam_jax.sam, static_args=statics)(rho=0.2), optax.sgd(0.01)
  )

  step = ls_step(tx)

  params, state = f32(W0), tx.init(f32(W0))
  params, state = step(params, state)
  np.testing.assert_allclose(state[0].inner_state.perturbation_norm, 0.2, rtol=1e-6)
  state[0].hyperparams["rho"] = jnp.asarray(0.03)
  params, state = step(params, state)
  np.testing.assert_allclose(state[0].inner_state.perturbation_norm, 0.03, rtol=1e-6)


def test_apply_if_finite_after_sam_skips_a_nan_perturbed_gradient():
  # -sqrt(w) pushes eps towards 0, and a large rho crosses it: grad L(w + eps) = NaN.
  loss_fn = lambda p: -jnp.sum(jnp.sqrt(p["w"]))
  params = {"w": jnp.array([0.05, 1.0])}
  tx = optax.chain(
    asam_jax.sam(rho=0.5), optax.apply_if_finite(optax.sgd(0.1), max_consecutive_errors=3)
  )
  state = tx.init(params)
  updates, state = tx.update(jax.grad(loss_fn)(params), state, params, loss_fn=loss_fn)
  assert np.isnan(state[0].perturbed_loss)
  chex.assert_trees_all_equal(updates, {"w": jnp.zeros(2)})
  assert int(state[1].total_notfinite) == 1


# --- gradient accumulation ------------------------------------------------------


@pytest.mark.slow
def test_gradient_accumulation_sam_before_multisteps():
  """chain(sam, MultiSteps(opt)) averages one SAM gradient per micro-batch."""
  k, rho, lr = 4, 0.2, 0.1
  micro = [(X[i::k], Y[i::k]) for i in range(k)]
  right = optax.chain(
    asam_jax.sam(rho=rho), optax.MultiSteps(optax.sgd(lr), k).gradient_transformation()
  )
  wrong = optax.MultiSteps(optax.chain(asam_jax.sam(rho=rho), optax.sgd(lr)), k)

  def run(tx):
    params, state = f32(W0), tx.init(f32(W0))
    for x, y in micro:
      loss_fn = lambda p, x=x, y=y: ls_loss(p, x, y)
      updates, state = tx.update(jax.grad(loss_fn)(params), state, params, loss_fn=loss_fn)
      params = optax.apply_updates(params, updates)
    return params

  mean_sam = jax.tree.map(
    lambda *g: np.mean(g, 0), *[sam_grad64(W0, x, y, rho=rho)[0] for x, y in micro]
  )
  expected = jax.tree.map(lambda w, g: w - lr * g, W0, mean_sam)
  assert_close(run(right), expected)
  # MultiSteps(chain(sam, opt)) perturbs with the accumulated clean gradient but
  # evaluates only the last micro-batch at the perturbed weights.
  mean_clean = jax.tree.map(lambda *g: np.mean(g, 0), *[ls_grad64(W0, x, y) for x, y in micro])
  last_only = sam_grad64(W0, *micro[-1], rho=rho, g=mean_clean)[0]
  got_wrong = run(wrong)
  assert_close(got_wrong, jax.tree.map(lambda w, g: w - lr * g, W0, last_only))
  assert not np.allclose(np.asarray(got_wrong["w"]), expected["w"], rtol=1e-3)


# --- has_aux and the state ------------------------------------------------------


def test_has_aux_drops_the_perturbed_aux():
  def loss_with_aux(p):
    return ls_loss(p, X, Y), {"mean_w": jnp.mean(p["w"])}

  params = f32(W0)
  tx = asam_jax.sam(rho=0.2, has_aux=True)
  (_, aux), grads = jax.value_and_grad(loss_with_aux, has_aux=True)(params)
  updates, _ = tx.update(grads, tx.init(params), params, loss_fn=loss_with_aux)
  assert_close(updates, sam_grad64(W0, X, Y, rho=0.2)[0])
  np.testing.assert_allclose(aux["mean_w"], np.mean(W0["w"]), rtol=1e-6)


def test_state_is_a_pytree_that_jits_and_restores():
  tx = asam_jax.asam()
  state = tx.init(f32(W0))
  assert isinstance(state, asam_jax.SAMState)
  leaves, treedef = jax.tree.flatten(state)
  assert len(leaves) == 3
  restored = jax.tree.unflatten(treedef, [np.asarray(x) for x in leaves])
  _, after = one_update(tx, f32(W0), X, Y)
  chex.assert_trees_all_equal_shapes_and_dtypes(jax.tree.map(jnp.asarray, restored), after)


# --- bad input ---------------------------------------------------------------------


@pytest.mark.parametrize(
  "make, error, match",
  [
    (lambda: asam_jax.sam(rho=-1.0), ValueError, "rho must be finite and >= 0"),
    (lambda: asam_jax.asam(eta=float("inf")), ValueError, "eta must be finite"),
    (lambda: asam_jax.asam(p=0.5), ValueError, "p must be >= 1"),
    (
      lambda: asam_jax.sam(rho=optax.linear_schedule(-1.0, 0.0, 10)),
      ValueError,
      r"rho\(0\), the schedule's first value",
    ),
    (lambda: asam_jax.sam(sync_perturbation=True), ValueError, "needs axis_name"),
    (lambda: asam_jax.sam(eps=-1.0), ValueError, "eps must be finite and >= 0"),
  ],
)
def test_bad_hyperparameters_fail_at_construction(make, error, match):
  with pytest.raises(error, match=match):
    make()


def test_bad_calls_fail_with_instructions():
  params = f32(W0)
  grads = jax.tree.map(jnp.ones_like, params)
  tx = asam_jax.sam()
  state = tx.init(params)
  with pytest.raises(TypeError, match=r"loss_fn=lambda p: loss\(p, batch\)"):
    tx.update(grads, state, params)
  with pytest.raises(ValueError, match="needs params"):
    tx.update(grads, state, loss_fn=lambda p: 0.0)
  with pytest.raises(TypeError, match=r"scalar float loss, got shape \(32,\).*\.mean\(\)"):
    tx.update(grads, state, params, loss_fn=lambda p: jnp.sum((X @ p["w"]) ** 2, -1))
  with pytest.raises(TypeError, match="has_aux=True"):
    tx.update(grads, state, params, loss_fn=lambda p: (ls_loss(p, X, Y), None))
  with pytest.raises(TypeError, match=r"needs loss_fn to return \(loss, aux\)"):
    asam_jax.sam(has_aux=True).update(grads, state, params, loss_fn=lambda p: ls_loss(p, X, Y))
  with pytest.raises(ValueError, match="adaptive_mask must be a pytree of bools"):
    asam_jax.asam(adaptive_mask={"w": True}).init(params)
  with pytest.raises(ValueError, match="perturb_mask must be a pytree of bools"):
    asam_jax.sam(perturb_mask=[True]).init(params)


# --- scale invariance (the EPFL report's experiment) ------------------------------


@functools.partial(jax.jit, static_argnums=0)
def perturbed_loss(tx, params, x, labels):
  loss_fn = lambda p: xent(p, x, labels)
  _, state = tx.update(jax.grad(loss_fn)(params), tx.init(params), params, loss_fn=loss_fn)
  return loss_fn(params), state.perturbed_loss


@pytest.mark.slow
def test_asam_perturbed_loss_is_invariant_to_neuron_rescaling():
  key_data, key_init, key_bias = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(key_data, (64, 4))
  labels = jnp.arange(64) % 3
  params = mlp_init(key_init, [4, 16, 16, 3])
  params = [
    dict(layer, b=0.1 * jax.random.normal(k, layer["b"].shape))
    for k, layer in zip(jax.random.split(key_bias, 3), params)
  ]
  variants = [params] + [rescale(params, k) for k in jax.random.split(jax.random.key(4), 5)]

  def spread(tx):
    clean, perturbed = zip(*(perturbed_loss(tx, v, x, labels) for v in variants))
    np.testing.assert_allclose(clean, clean[0], rtol=2e-6)  # the function is unchanged
    perturbed = np.array(perturbed)
    return np.ptp(perturbed) / perturbed.mean()

  assert spread(asam_jax.asam(rho=0.5, eta=0.0)) < 1e-5
  assert spread(asam_jax.sam(rho=0.5)) > 1e-2
  # The official code's kernels-only T_w is not invariant once biases are rescaled.
  assert spread(asam_jax.asam(rho=0.5, eta=0.0, adaptive_mask=asam_jax.kernel_mask)) > 1e-3


# --- pmap: one perturbation per device (m-sharpness) ----------------------------------


@pytest.mark.parametrize("sync", [False, True])
def test_pmap_msam_matches_per_device_reference(sync):
  n = jax.local_device_count()
  assert n == 4, "conftest.py forces 4 host devices"
  xs, ys = X.reshape(n, -1, 5), Y.reshape(n, -1, 3)
  tx = asam_jax.sam(rho=0.2, axis_name="devices", sync_perturbation=sync)

  @functools.partial(jax.pmap, axis_name="devices", in_axes=(None, 0, 0))
  def step(params, x, y):
    loss_fn = lambda p: ls_loss(p, x, y)
    return tx.update(jax.grad(loss_fn)(params), tx.init(params), params, loss_fn=loss_fn)

  grads, state = step(f32(W0), xs, ys)
  mean_clean = jax.tree.map(
    lambda *g: np.mean(g, 0), *[ls_grad64(W0, x, y) for x, y in zip(xs, ys)]
  )
  per_device = [
    sam_grad64(W0, x, y, rho=0.2, g=mean_clean if sync else None) for x, y in zip(xs, ys)
  ]
  want = jax.tree.map(lambda *g: np.mean(g, 0), *[d[0] for d in per_device])
  for device_grads in [jax.tree.map(lambda a, i=i: a[i], grads) for i in range(n)]:
    assert_close(device_grads, want)  # every device returns the same averaged gradient
  np.testing.assert_allclose(state.perturbed_loss, np.mean([d[2] for d in per_device]), rtol=1e-5)
  np.testing.assert_allclose(state.perturbation_norm, 0.2, rtol=1e-5)
  if not sync:  # mSAM differs from global SAM on the same data
    global_sam = sam_grad64(W0, X, Y, rho=0.2)[0]
    assert not np.allclose(want["w"], global_sam["w"], rtol=1e-4)


# --- what optax.contrib.sam gets wrong, and we do not ---------------------------------


def test_zero_gradient_is_finite_where_optax_contrib_sam_gives_nan():
  params = f32(W0)
  zeros = jax.tree.map(jnp.zeros_like, params)
  loss_fn = lambda p: ls_loss(p, X, Y)
  for tx in (asam_jax.sam(), asam_jax.asam(eta=0.0)):
    updates, _ = tx.update(zeros, tx.init(params), params, loss_fn=loss_fn)
    assert_close(updates, ls_grad64(W0, X, Y))  # eps = 0: the clean gradient
  # optax's documented adversarial step, normalize() then sgd(rho), divides by 0.
  theirs = optax.contrib.sam(
    optax.sgd(0.1), optax.chain(optax.contrib.normalize(), optax.sgd(0.05)), opaque_mode=True
  )
  updates, _ = theirs.update(
    zeros, theirs.init(params), params, grad_fn=lambda p, _: jax.grad(loss_fn)(p)
  )
  assert np.isnan(np.asarray(updates["w"])).all()


def test_rho_schedule_moves_where_optax_contrib_sam_freezes_it():
  schedule = optax.linear_schedule(0.2, 0.0, transition_steps=4)
  ours = _norms_over_steps(optax.chain(asam_jax.sam(rho=schedule), optax.sgd(0.01)), 3)
  assert ours[0] > ours[1] > ours[2]
  # optax's adversarial step is sgd(rho) on the normalized gradient, and its state
  # is reset every step, so the radius never leaves the schedule's first value.
  theirs = optax.contrib.sam(
    optax.sgd(0.01), optax.chain(optax.contrib.normalize(), optax.sgd(schedule)), opaque_mode=True
  )
  params, state, radii = f32(W0), theirs.init(f32(W0)), []

  def grad_fn(adversarial_params, _):
    radii.append(float(optax.tree.norm(optax.tree.sub(adversarial_params, params))))
    return jax.grad(ls_loss)(adversarial_params, X, Y)

  for _ in range(3):
    updates, state = theirs.update(jax.grad(ls_loss)(params, X, Y), state, params, grad_fn=grad_fn)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(radii, [0.2, 0.2, 0.2], rtol=1e-5)


# --- run-time hyperparameters, partial params, odd calls -------------------------------


def test_a_rho_schedule_crossing_zero_gives_a_nan_step_that_apply_if_finite_skips():
  schedule = optax.linear_schedule(0.2, -0.2, transition_steps=2)  # rho(2) = -0.2
  tx = optax.chain(
    asam_jax.sam(rho=schedule), optax.apply_if_finite(optax.sgd(0.1), max_consecutive_errors=5)
  )
  step = ls_step(tx)
  params, state = f32(W0), tx.init(f32(W0))
  for _ in range(2):
    params, state = step(params, state)
  before = params
  params, state = step(params, state)
  chex.assert_trees_all_equal(params, before)
  assert int(state[1].notfinite_count) == 1
  assert np.isnan(state[0].perturbation_norm)


@pytest.mark.parametrize("wrap", ["masked", "multi_transform"])
def test_inside_optax_masked_is_refused_with_perturb_mask_as_the_fix(wrap):
  mask = {"b": False, "w": True}
  if wrap == "masked":
    tx = optax.masked(asam_jax.sam(rho=0.2), mask)
  else:
    tx = optax.multi_transform(
      {"sam": asam_jax.sam(rho=0.2), "plain": optax.sgd(0.1)}, {"b": "plain", "w": "sam"}
    )
  with pytest.raises(ValueError, match=r"optax.MaskedNode.*perturb_mask=mask"):
    one_update(tx, f32(W0), X, Y)
  # The fix the message gives: only w is perturbed, the norm is w's alone.
  fixed = optax.chain(asam_jax.sam(rho=0.2, perturb_mask=mask), optax.masked(optax.sgd(1.0), mask))
  updates, _ = one_update(fixed, f32(W0), X, Y)
  g = ls_grad64(W0, X, Y)
  e = reference.perturbation([g["b"], g["w"]], [W0["b"], W0["w"]], rho=0.2, perturb=[False, True])
  want = ls_grad64({"b": W0["b"], "w": W0["w"] + e[1]}, X, Y)
  assert_close(updates["w"], -want["w"])
  assert_close(updates["b"], want["b"])  # masked out of sgd: the SAM gradient passes through


def test_a_loss_that_ignores_the_params_gives_a_zero_update():
  params = f32(W0)
  tx = asam_jax.sam(rho=0.1)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, state = tx.update(grads, tx.init(params), params, loss_fn=lambda p: 3.0)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
  assert float(state.perturbed_loss) == 3.0


def test_axis_name_outside_pmap_and_shard_map_says_where_to_call_update():
  with pytest.raises(ValueError, match=r"not running under an axis of that name.*jax\.pmap"):
    one_update(asam_jax.sam(axis_name="devices"), f32(W0), X, Y)


# --- multi-step ascent -------------------------------------------------------------------


def multi_step64(w, x, y, *, steps, rho, eta=0.0, adaptive=False, project=False):
  """k normalized ascent steps from w (each scaled by T at w), optionally projected."""
  ws, flags = [w["b"], w["w"]], [adaptive] * 2
  e = [np.zeros_like(a) for a in ws]
  for _ in range(steps):
    g = ls_grad64({"b": ws[0] + e[0], "w": ws[1] + e[1]}, x, y)
    d = reference.perturbation([g["b"], g["w"]], ws, rho=rho, eta=eta, adaptive=flags)
    e = [a + b for a, b in zip(e, d)]
    if project:
      radius = reference.ball_norm(e, ws, eta=eta, adaptive=flags)
      e = [a * min(1.0, rho / radius) for a in e]
  wp = {"b": ws[0] + e[0], "w": ws[1] + e[1]}
  radius = reference.ball_norm(e, ws, eta=eta, adaptive=flags)
  return ls_grad64(wp, x, y), ls_loss64(wp, x, y), radius


@pytest.mark.parametrize("steps", tiered([1, 2, 3], [1, 3]))
def test_ascent_steps_equal_optax_multi_step_sam(steps):
  """SAM is optax's opaque SAM bit for bit; k ascent steps, to rounding (optax adds each to w)."""
  base = optax.sgd(0.1, momentum=0.9)
  ours = optax.chain(asam_jax.sam(rho=0.2, ascent_steps=steps), base)
  theirs = optax.contrib.sam(
    base,
    optax.chain(optax.contrib.normalize(), optax.sgd(0.2)),
    sync_period=steps + 1,
    opaque_mode=True,
  )
  loss_fn = lambda p: ls_loss(p, X, Y)

  @jax.jit
  def both(params):
    (p1, s1), (p2, s2) = (params, ours.init(params)), (params, theirs.init(params))
    for _ in range(3):
      u1, s1 = ours.update(jax.grad(loss_fn)(p1), s1, p1, loss_fn=loss_fn)
      p1 = optax.apply_updates(p1, u1)
      u2, s2 = theirs.update(
        jax.grad(loss_fn)(p2), s2, p2, grad_fn=lambda p, _: jax.grad(loss_fn)(p)
      )
      p2 = optax.apply_updates(p2, u2)
    return p1, p2

  ours_params, theirs_params = both(f32(W0))
  if steps == 1:
    chex.assert_trees_all_equal(ours_params, theirs_params)
  chex.assert_trees_all_close(ours_params, theirs_params, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("project", [False, True])
@pytest.mark.parametrize("adaptive", [False, True])
def test_multi_step_ascent_matches_the_reference_and_reports_its_last_point(adaptive, project):
  make = asam_jax.asam if adaptive else asam_jax.sam
  kwargs = dict(rho=0.4, eta=0.01) if adaptive else dict(rho=0.4)
  tx = make(**kwargs, ascent_steps=3, ascent_projection=project)
  grads, state = one_update(tx, f32(W0), X, Y)
  want, perturbed_loss, radius = multi_step64(
    W0, X, Y, steps=3, rho=0.4, eta=0.01 if adaptive else 0.0, adaptive=adaptive, project=project
  )
  assert_close(grads, want)
  np.testing.assert_allclose(state.perturbed_loss, perturbed_loss, rtol=1e-5)
  np.testing.assert_allclose(state.perturbation_norm, radius, rtol=1e-5)
  # Unprojected, three steps of length rho leave the ball; projected, they stay on it.
  assert radius > 0.41 if not project else abs(radius - 0.4) < 1e-9


@pytest.mark.parametrize("sync", [False, True])
def test_pmap_multi_step_ascent_climbs_with_each_devices_gradient_unless_synchronized(sync):
  n = jax.local_device_count()
  xs, ys = X.reshape(n, -1, 5), Y.reshape(n, -1, 3)
  tx = asam_jax.asam(rho=0.4, eta=0.01, axis_name="devices", sync_perturbation=sync, ascent_steps=2)

  @functools.partial(jax.pmap, axis_name="devices", in_axes=(None, 0, 0))
  def step(params, x, y):
    loss_fn = lambda p: ls_loss(p, x, y)
    return tx.update(jax.grad(loss_fn)(params), tx.init(params), params, loss_fn=loss_fn)

  grads, _ = step(f32(W0), xs, ys)
  kwargs = dict(steps=2, rho=0.4, eta=0.01, adaptive=True)
  if sync:  # one device with the whole batch: the mean loss over equal shards
    want = multi_step64(W0, X, Y, **kwargs)[0]
  else:
    want = jax.tree.map(
      lambda *g: np.mean(g, 0), *[multi_step64(W0, x, y, **kwargs)[0] for x, y in zip(xs, ys)]
    )
  assert_close(jax.tree.map(lambda a: a[0], grads), want)
  chex.assert_trees_all_equal(*[jax.tree.map(lambda a, i=i: a[i], grads) for i in range(n)])


def test_multi_step_arguments_are_checked():
  with pytest.raises(ValueError, match="ascent_steps must be an int >= 1"):
    asam_jax.sam(ascent_steps=0)
  with pytest.raises(ValueError, match="ascent_projection supports p=2 and p=float"):
    asam_jax.asam(p=3, ascent_steps=2, ascent_projection=True)


# --- complex and integer leaves ---------------------------------------------------------

A = jnp.array([1.0 + 2.0j, -0.5 + 0.3j, 0.2 - 1.0j])
Z0 = jnp.array([0.4 - 0.2j, -1.0 + 0.5j, 0.3 + 0.8j])


def complex_loss(params):
  z = params["z"]
  return jnp.sum(jnp.abs(A * z - 1.0) ** 2) + jnp.sum(jnp.real(z) ** 3) + params["r"] @ jnp.imag(z)


def split_loss(params):
  """The same loss over the real and imaginary parts as two real leaves."""
  return complex_loss({"z": params["re"] + 1j * params["im"], "r": params["r"]})


COMPLEX_METHODS = {
  "sam": lambda: asam_jax.sam(rho=0.3),
  "sam_pinf": lambda: asam_jax.sam(rho=0.1, p=float("inf")),
  "asam": lambda: asam_jax.asam(rho=0.5, eta=0.01),
  "fisher_sam": lambda: asam_jax.fisher_sam(rho=0.3, eta=1.0),
  "gsam": lambda: asam_jax.gsam(rho=0.3, alpha=0.3),
}


@pytest.mark.parametrize("method", tiered(list(COMPLEX_METHODS), ["sam", "asam"]))
def test_a_complex_leaf_is_its_real_and_imaginary_parts(method):
  """The ascent follows JAX's convention (descent along conj(g)): the same step as the model
  written over two real leaves, whose gradient (g_re, g_im) JAX returns as g_re - i g_im."""
  r = jnp.array([0.5, -1.0, 2.0])
  complex_params = {"r": r, "z": Z0}
  real_params = {"im": jnp.imag(Z0), "r": r, "re": jnp.real(Z0)}

  def update(params, loss):
    tx = COMPLEX_METHODS[method]()
    return tx.update(jax.grad(loss)(params), tx.init(params), params, loss_fn=loss)

  got, got_state = update(complex_params, complex_loss)
  want, want_state = update(real_params, split_loss)
  chex.assert_trees_all_close(got["z"], want["re"] - 1j * want["im"], rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(got["r"], want["r"], rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(got_state, want_state, rtol=1e-5, atol=1e-6)


def test_integer_leaves_left_out_take_float0_gradients_and_get_zero_updates():
  params = {"step": jnp.array(3, jnp.int32), "w": jnp.array([1.0, -2.0])}
  loss = lambda p: jnp.sum(p["w"] ** 2) * p["step"]
  grads = jax.grad(loss, allow_int=True)(params)
  assert grads["step"].dtype == jax.dtypes.float0
  mask = {"step": False, "w": True}
  for make in (asam_jax.sam, asam_jax.gsam, asam_jax.looksam, asam_jax.friendly_sam):
    tx = optax.chain(make(rho=0.1, perturb_mask=mask), optax.sgd(0.1))
    updates, _ = tx.update(grads, tx.init(params), params, loss_fn=loss)
    new = optax.apply_updates(params, updates)
    assert new["step"].dtype == jnp.int32 and int(new["step"]) == 3
  # The float leaf gets SAM's update of the float-only model.
  tx = asam_jax.sam(rho=0.1, perturb_mask=mask)
  updates, _ = tx.update(grads, tx.init(params), params, loss_fn=loss)
  only = asam_jax.sam(rho=0.1)
  loss_w = lambda p: loss({"step": params["step"], "w": p["w"]})
  want, _ = only.update(
    jax.grad(loss_w)({"w": params["w"]}),
    only.init({"w": params["w"]}),
    {"w": params["w"]},
    loss_fn=loss_w,
  )
  chex.assert_trees_all_close(updates["w"], want["w"], rtol=1e-6)
  with pytest.raises(
    TypeError, match=r"\['step'\] has dtype int32.*Leave it out with perturb_mask"
  ):
    asam_jax.sam(rho=0.1).update(grads, tx.init(params), params, loss_fn=loss)
