"""asam_jax against float64 NumPy ports of the peers' own code (see tests/peers/).

Each port is written from the peer's source, not from the paper; where a peer
departs from the paper its module's docstring says how. Our float32 JAX runs
are compared with the float64 ports step by step.
"""

import functools

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import f32, sgd_base, tiered
from peers import (
  big_vision_gsam,
  davda54_sam,
  from_named,
  global_norm,
  leaf_names,
  msam,
  official_asam,
  pytorch_optimizer_looksam,
  to_named,
)

import asam_jax

# --- a tanh MLP, Flax-named, whose float64 gradient NumPy computes by hand -----

RNG = np.random.default_rng(7)
X = RNG.normal(size=(24, 4))
Y = RNG.normal(size=(24, 3))
P0 = {
  "Dense_0": {"bias": 0.1 * RNG.normal(size=6), "kernel": RNG.normal(size=(4, 6)) / 2},
  "Dense_1": {"bias": 0.1 * RNG.normal(size=3), "kernel": RNG.normal(size=(6, 3)) / np.sqrt(6)},
}


def mlp_loss_on(params, x, y):
  h = jnp.tanh(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
  out = h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]
  return 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=-1))


def mlp_loss(params):
  return mlp_loss_on(params, X, Y)


def mlp_grad64(w, x=X, y=Y):
  """The float64 gradient of mlp_loss, by name, as PyTorch's backward would fill p.grad."""
  h = np.tanh(x @ w["Dense_0.weight"] + w["Dense_0.bias"])
  r = (h @ w["Dense_1.weight"] + w["Dense_1.bias"] - y) / len(x)
  dz = (r @ w["Dense_1.weight"].T) * (1 - h**2)
  return {
    "Dense_0.bias": dz.sum(0),
    "Dense_0.weight": x.T @ dz,
    "Dense_1.bias": r.sum(0),
    "Dense_1.weight": h.T @ r,
  }


@functools.partial(jax.jit, static_argnums=(0, 2))
def trajectory(tx, params, steps):
  """Params and optimizer state after each of ``steps`` updates of ``tx`` on mlp_loss."""

  def body(carry, _):
    params, state = carry
    updates, state = tx.update(jax.grad(mlp_loss)(params), state, params, loss_fn=mlp_loss)
    params = optax.apply_updates(params, updates)
    return (params, state), (params, state)

  return jax.lax.scan(body, (params, tx.init(params)), None, length=steps)[1]


def at(tree, i):
  return jax.tree.map(lambda x: x[i], tree)


def assert_named_close(got_tree, want_named, rtol=1e-5, atol=1e-6):
  chex.assert_trees_all_close(to_named(got_tree), want_named, rtol=rtol, atol=atol)


# --- the naming bridge ------------------------------------------------------------


def test_named_round_trip_flax_and_equinox():
  params = {
    "Conv_0": {"kernel": np.ones((3, 3, 2, 4)), "bias": np.zeros(4)},
    "BatchNorm_0": {"scale": np.ones(4), "bias": np.zeros(4)},
    "Embed_0": {"embedding": np.ones((5, 2))},
    "pos_embedding": np.ones((4, 2)),
  }
  named = to_named(params)
  assert sorted(named) == [
    "BatchNorm_0.bias",
    "BatchNorm_0.weight",
    "Conv_0.bias",
    "Conv_0.weight",
    "Embed_0.weight",
    "pos_embedding",
  ]
  back = from_named({n: 2 * v for n, v in named.items()}, params)
  assert back["Conv_0"]["kernel"].shape == (3, 3, 2, 4)
  np.testing.assert_array_equal(back["BatchNorm_0"]["scale"], 2 * np.ones(4))
  # Equinox: attribute paths, already named weight/bias; lists give indices.
  model = [eqx.nn.Linear(3, 2, key=jax.random.key(0)), eqx.nn.LayerNorm(2)]
  assert leaf_names(eqx.filter(model, eqx.is_array)) == [
    "0.weight",
    "0.bias",
    "1.weight",
    "1.bias",
  ]
  with pytest.raises(ValueError, match="one PyTorch name"):
    leaf_names({"kernel": np.ones(2), "weight": np.ones(2)})


# --- davda54/sam ----------------------------------------------------------------


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_and_asam_eta0_match_davda54(adaptive):
  """sam(rho) is davda54's SAM, asam(rho, eta=0) its adaptive=True: one step, then 3 more.

  The base is SGD with momentum 0.9, whose first step is plain SGD's.
  """
  rho, lr, momentum = (0.5 if adaptive else 0.1), 0.2, 0.9
  ours = asam_jax.asam(rho, eta=0.0) if adaptive else asam_jax.sam(rho)
  params, _ = trajectory(optax.chain(ours, optax.sgd(lr, momentum=momentum)), f32(P0), 4)
  w, base = to_named(P0), sgd_base(lr, momentum)
  for i in range(4):
    w = davda54_sam.step(w, mlp_grad64, base, rho=rho, adaptive=adaptive)
    assert_named_close(at(params, i), w)


# --- SamsungLabs/ASAM -----------------------------------------------------------


def small_cnn_params(rng):
  """A Flax Linen-named CNN's params: Conv, BatchNorm (scale), Dense, LayerNorm (scale)."""
  return {
    "BatchNorm_0": {"bias": 0.05 * rng.normal(size=8), "scale": 1 + 0.1 * rng.normal(size=8)},
    "Conv_0": {"bias": 0.05 * rng.normal(size=8), "kernel": 0.2 * rng.normal(size=(3, 3, 3, 8))},
    "Dense_0": {"bias": 0.05 * rng.normal(size=10), "kernel": 0.3 * rng.normal(size=(8, 10))},
    "LayerNorm_0": {"bias": 0.05 * rng.normal(size=10), "scale": 1 + 0.1 * rng.normal(size=10)},
  }


CNN_RNG = np.random.default_rng(3)
CNN_X = jnp.asarray(CNN_RNG.normal(size=(16, 6, 6, 3)), jnp.float32)
CNN_LABELS = jnp.asarray(CNN_RNG.integers(0, 10, size=16))


@jax.jit
def cnn_grad(p):
  """The gradient of a small CNN's cross-entropy: conv, BatchNorm, ReLU, pool, dense, LayerNorm."""

  def loss(p):
    dims = ("NHWC", "HWIO", "NHWC")
    h = jax.lax.conv_general_dilated(
      CNN_X, p["Conv_0"]["kernel"], (1, 1), "SAME", dimension_numbers=dims
    )
    h = h + p["Conv_0"]["bias"]
    h = (h - h.mean((0, 1, 2))) / jnp.sqrt(h.var((0, 1, 2)) + 1e-5)
    h = jax.nn.relu(h * p["BatchNorm_0"]["scale"] + p["BatchNorm_0"]["bias"]).mean((1, 2))
    h = h @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    h = (h - h.mean(-1, keepdims=True)) / jnp.sqrt(h.var(-1, keepdims=True) + 1e-6)
    logits = h * p["LayerNorm_0"]["scale"] + p["LayerNorm_0"]["bias"]
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(16), CNN_LABELS])

  return jax.grad(loss)(p)


@pytest.mark.parametrize("scales", tiered(["init", "spread"], ["spread"]))
def test_asam_weight_mask_matches_the_official_ascent(scales):
  """perturbation(adaptive_mask=weight_mask) is ASAM.ascent_step's eps, given one CNN gradient.

  "init": normalization scales near 1, as initialized; "spread": scales drawn
  from [0.2, 2], as after training. kernel_mask leaves those scales unscaled.
  """
  params = small_cnn_params(np.random.default_rng(3))
  if scales == "spread":
    rng = np.random.default_rng(4)
    params["BatchNorm_0"]["scale"] = rng.uniform(0.2, 2.0, 8)
    params["LayerNorm_0"]["scale"] = rng.uniform(0.2, 2.0, 10)
  grads = cnn_grad(f32(params))
  rho, eta = 0.5, 0.01
  want = official_asam.perturbation(to_named(params), to_named(grads), rho=rho, eta=eta)
  kw = dict(rho=rho, eta=eta, adaptive=True)
  got = asam_jax.perturbation(grads, f32(params), adaptive_mask=asam_jax.weight_mask, **kw)
  assert_named_close(got, want, rtol=1e-5, atol=1e-9)

  # kernel_mask leaves BatchNorm's and LayerNorm's scale unscaled: a different eps.
  by_shape = to_named(
    asam_jax.perturbation(grads, f32(params), adaptive_mask=asam_jax.kernel_mask, **kw)
  )
  difference = global_norm({n: v - want[n] for n, v in by_shape.items()}) / global_norm(want)
  print(f"kernel_mask vs the official eps, {scales} scales: relative difference {difference:.1%}")
  assert difference > 0.05

  # A parameter without a gradient (p.grad is None) is skipped: our perturb_mask.
  named_grads = {**to_named(grads), "LayerNorm_0.bias": None}
  want = official_asam.perturbation(to_named(params), named_grads, rho=rho, eta=eta)
  mask = jax.tree.map(lambda _: True, params)
  mask["LayerNorm_0"]["bias"] = False
  got = asam_jax.perturbation(
    grads, f32(params), adaptive_mask=asam_jax.weight_mask, perturb_mask=mask, **kw
  )
  np.testing.assert_array_equal(got["LayerNorm_0"]["bias"], 0)
  want["LayerNorm_0.bias"] = np.zeros(10)
  assert_named_close(got, want, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("method", ["ASAM", "SAM"])
def test_three_steps_match_the_official_ascent_and_descent(method):
  """The whole transformation, chained before SGD, on the MLP: ascent_step, backward, descent_step."""
  rho, eta, lr = (1.0, 0.1, 0.2) if method == "ASAM" else (0.1, 0.0, 0.2)
  if method == "ASAM":
    ours = asam_jax.asam(rho, eta, adaptive_mask=asam_jax.weight_mask)
  else:
    ours = asam_jax.sam(rho)
  params, _ = trajectory(optax.chain(ours, optax.sgd(lr)), f32(P0), 3)
  w, base = to_named(P0), sgd_base(lr)
  for i in range(3):
    w = official_asam.step(w, mlp_grad64, base, rho=rho, eta=eta, adaptive=method == "ASAM")
    assert_named_close(at(params, i), w)


# --- google-research/big_vision GSAM ---------------------------------------------

LR = optax.warmup_cosine_decay_schedule(0.0, 0.2, 2, 8, end_value=0.02)
GSAM_KW = dict(rho_max=0.3, rho_min=0.1, alpha=0.4, lr_max=0.2, lr_min=0.02)


def big_vision_lr(step):
  return float(LR(step))


def test_gsam_matches_big_vision_minimize_fp():
  """gsam equals gsam_gradient(minimize_fp=True) as big_vision's trainer drives it, 6 SGD steps."""
  rho_kw = {k: v for k, v in GSAM_KW.items() if k != "alpha"}
  # big_vision's rho at optimizer count t uses the learning rate of step t + 1:
  # our rho schedule of the count is the one of the learning rate, shifted by one.
  rho = asam_jax.gsam_rho_schedule(lambda count: LR(count + 1), **rho_kw)
  tx = optax.chain(asam_jax.gsam(rho, GSAM_KW["alpha"]), optax.sgd(LR))
  params, _ = trajectory(tx, f32(P0), 6)
  w = to_named(P0)
  for t in range(6):
    w = big_vision_gsam.sgd_trainer_step(
      w, [mlp_grad64], count=t, learning_rate=big_vision_lr, **GSAM_KW
    )
    assert_named_close(at(params, t), w)
  # Without the shift (rho from the lr applied) the trajectories part well beyond the tolerance.
  unshifted = to_named(P0)
  for t in range(6):
    g = big_vision_gsam.gsam_gradient(mlp_grad64, unshifted, lr=big_vision_lr(t), **GSAM_KW)
    unshifted = {n: v - big_vision_lr(t) * g[n] for n, v in unshifted.items()}
  ours = to_named(at(params, 5))
  assert max(np.max(np.abs(ours[n] - unshifted[n])) for n in w) > 1e-4


@pytest.mark.slow
def test_gsam_minimize_fp_false_matches_big_vision():
  """minimize_fp=False: g plus alpha times g_p's part orthogonal to g, as big_vision computes it."""
  rho_kw = {k: v for k, v in GSAM_KW.items() if k != "alpha"}
  rho = asam_jax.gsam_rho_schedule(lambda count: LR(count + 1), **rho_kw)
  tx = optax.chain(asam_jax.gsam(rho, GSAM_KW["alpha"], minimize_fp=False), optax.sgd(LR))
  params, _ = trajectory(tx, f32(P0), 6)
  w = to_named(P0)
  for t in range(6):
    w = big_vision_gsam.sgd_trainer_step(
      w, [mlp_grad64], count=t, learning_rate=big_vision_lr, minimize_fp=False, **GSAM_KW
    )
    assert_named_close(at(params, t), w)


@pytest.mark.slow
def test_gsam_per_device_decomposition_matches_big_vision_trainer_under_pmap():
  """gsam(axis_name=...) decomposes each device's own g and g_p and averages, as their trainer."""
  n = jax.local_device_count()
  xs, ys = X.reshape(n, -1, X.shape[1]), Y.reshape(n, -1, Y.shape[1])
  rho_kw = {k: v for k, v in GSAM_KW.items() if k != "alpha"}
  rho = asam_jax.gsam_rho_schedule(lambda count: LR(count + 1), **rho_kw)
  tx = optax.chain(asam_jax.gsam(rho, GSAM_KW["alpha"], axis_name="i"), optax.sgd(LR))

  @functools.partial(jax.pmap, axis_name="i", in_axes=(None, None, 0, 0))
  def step(params, state, x, y):
    loss_fn = lambda p: mlp_loss_on(p, x, y)
    updates, state = tx.update(jax.grad(loss_fn)(params), state, params, loss_fn=loss_fn)
    return optax.apply_updates(params, updates), state

  params, state = f32(P0), tx.init(f32(P0))
  w = to_named(P0)
  grad_fns = [functools.partial(mlp_grad64, x=a, y=b) for a, b in zip(xs, ys)]
  for t in range(3):
    params, state = jax.tree.map(lambda a: a[0], step(params, state, xs, ys))
    w = big_vision_gsam.sgd_trainer_step(
      w, grad_fns, count=t, learning_rate=big_vision_lr, **GSAM_KW
    )
    assert_named_close(params, w)


def test_big_vision_port_by_hand():
  """The port's both branches, adaptive perturbation and pmean, on a quadratic, by hand."""
  a = np.array([1.0, 3.0])
  grad_fn = lambda p: {"fc.weight": a * p["fc.weight"]}
  w = np.array([1.0, -2.0])
  kw = dict(lr=0.1, rho_max=0.2, rho_min=0.2, alpha=0.5, lr_max=0.1, lr_min=0.1)
  g = a * w
  for adaptive in (False, True):
    e = 0.2 * (np.abs(w) if adaptive else 1.0) * g / (np.linalg.norm(g) + 1e-12)
    g_r = a * (w + e)
    # minimize_fp=True: g_r - alpha * (g's part orthogonal to g_r).
    want = g_r - 0.5 * (g - (g @ g_r) / (g_r @ g_r) * g_r)
    got = big_vision_gsam.gsam_gradient(
      grad_fn, {"fc.weight": w}, adaptive_perturbation=adaptive, **kw
    )
    np.testing.assert_allclose(got["fc.weight"], want, rtol=1e-12)
    # minimize_fp=False: g + alpha * (g_r's part orthogonal to g).
    want = g + 0.5 * (g_r - (g_r @ g) / (g @ g) * g)
    got = big_vision_gsam.gsam_gradient(
      grad_fn, {"fc.weight": w}, adaptive_perturbation=adaptive, minimize_fp=False, **kw
    )
    np.testing.assert_allclose(got["fc.weight"], want, rtol=1e-12)
    assert abs((got["fc.weight"] - g) @ g) < 1e-12  # only an orthogonal part is added
  # lr_max == lr_min gives rho_max; otherwise rho is linear in lr.
  assert big_vision_gsam.rho_from_lr(0.5, rho_max=2, rho_min=1, lr_max=1, lr_min=1) == 2
  assert big_vision_gsam.rho_from_lr(0.5, rho_max=2, rho_min=1, lr_max=1, lr_min=0) == 1.5
  # The trainer averages the per-device GSAM gradients, each from its own perturbation.
  fns = [grad_fn, lambda p: {"fc.weight": 2 * a * p["fc.weight"] + 1}]
  full_kw = {k: v for k, v in kw.items() if k != "lr"}
  both = big_vision_gsam.trainer_gradient(
    fns, {"fc.weight": w}, count=3, learning_rate=lambda s: 0.1, **full_kw
  )
  each = [big_vision_gsam.gsam_gradient(f, {"fc.weight": w}, **kw)["fc.weight"] for f in fns]
  np.testing.assert_allclose(both["fc.weight"], (each[0] + each[1]) / 2, rtol=1e-12)


# --- MarlonBecker/MSAM ------------------------------------------------------------


def test_momentum_sam_matches_the_authors_msam():
  """chain(add_decayed_weights(wd), momentum_sam) is their MSAM.step, 6 steps, lr scheduled."""
  lr, rho, mu, wd = optax.linear_schedule(0.2, 0.05, 6), 0.3, 0.9, 0.01
  tx = optax.chain(optax.add_decayed_weights(wd), asam_jax.momentum_sam(lr, rho=rho, momentum=mu))
  params, states = trajectory(tx, f32(P0), 6)
  w = to_named(P0)
  state = msam.msam_init(w)
  for t in range(6):
    w, state = msam.msam_step(
      w, mlp_grad64(w), state, lr=float(lr(t)), momentum=mu, weight_decay=wd, rho=rho
    )
    held, opt_state = at(params, t), at(states, t)
    assert_named_close(held, w)
    assert_named_close(opt_state[1].momentum, state["momentum_buffer"])
    # momentum_sam_weights is their move_back_from_momentumAscent.
    unperturbed = msam.msam_move_back(w, state, rho=rho)
    assert_named_close(asam_jax.momentum_sam_weights(held, opt_state), unperturbed)
  # ... and move_up_to_momentumAscent returns to the held weights.
  back_up = msam.msam_move_up(unperturbed, state, rho=rho)
  for n in w:
    np.testing.assert_allclose(back_up[n], w[n], rtol=1e-12, atol=1e-14)


def test_momentum_sam_adamw_matches_the_authors_adamw_msam():
  """momentum_sam_adamw is their AdamW_MSAM.step, 6 steps with a scheduled lr and decay."""
  lr, rho, wd = optax.linear_schedule(0.02, 0.005, 6), 0.5, 0.05
  tx = optax.chain(asam_jax.momentum_sam_adamw(lr, rho=rho, weight_decay=wd))
  params, states = trajectory(tx, f32(P0), 6)
  w = to_named(P0)
  state = msam.adamw_msam_init(w)
  for t in range(6):
    w, state = msam.adamw_msam_step(
      w, mlp_grad64(w), state, lr=float(lr(t)), weight_decay=wd, rho=rho
    )
    held, (opt_state,) = at(params, t), at(states, t)
    assert_named_close(held, w)
    assert_named_close(opt_state.momentum, state["exp_avg"])
    assert_named_close(opt_state.nu, state["exp_avg_sq"], rtol=1e-4, atol=1e-9)
    assert_named_close(
      asam_jax.momentum_sam_weights(held, opt_state), msam.adamw_msam_move_back(w, state)
    )


def test_adamw_msam_port_by_hand():
  """AdamW_MSAM's first step by hand, and with rho = 0 AdamW with decay after the step."""
  w0 = {"fc.weight": np.array([1.0, -2.0, 0.5]), "fc.bias": np.array([0.1])}
  g = {"fc.weight": np.array([0.3, -0.1, 0.2]), "fc.bias": np.array([-0.4])}
  lr, wd, rho, eps = 0.01, 0.1, 0.5, 1e-8
  kw = dict(lr=lr, betas=(0.9, 0.999), eps=eps, weight_decay=wd)
  held, state = msam.adamw_msam_step(w0, g, msam.adamw_msam_init(w0), rho=rho, **kw)
  # Step 1: the bias-corrected moments are g and |g|; m = 0.1 g is the ascent direction.
  w1 = {n: (1 - lr * wd) * (w0[n] - lr * g[n] / (np.abs(g[n]) + eps)) for n in w0}
  m = {n: 0.1 * v for n, v in g.items()}
  scale = rho / (global_norm(m) + 1e-12)
  for n in w0:
    np.testing.assert_allclose(held[n], w1[n] - scale * m[n], rtol=1e-12)
    np.testing.assert_allclose(msam.adamw_msam_move_back(held, state)[n], w1[n], rtol=1e-12)
    np.testing.assert_allclose(msam.adamw_msam_move_up(w1, state)[n], held[n], rtol=1e-12)
  assert state["norm_factor"] == pytest.approx(scale)
  # rho = 0: plain Adam moments and bias correction, then w <- (1 - lr wd) w.
  w, state = dict(w0), msam.adamw_msam_init(w0)
  ref, m1, m2 = dict(w0), {n: 0 * v for n, v in w0.items()}, {n: 0 * v for n, v in w0.items()}
  for t in range(1, 5):
    grads = {n: v * t + 0.01 * w[n] for n, v in g.items()}
    w, state = msam.adamw_msam_step(w, grads, state, rho=0.0, **kw)
    for n in ref:
      m1[n] = 0.9 * m1[n] + 0.1 * grads[n]
      m2[n] = 0.999 * m2[n] + 0.001 * grads[n] ** 2
      hat = m1[n] / (1 - 0.9**t) / (np.sqrt(m2[n] / (1 - 0.999**t)) + eps)
      ref[n] = (1 - lr * wd) * (ref[n] - lr * hat)
      np.testing.assert_allclose(w[n], ref[n], rtol=1e-12)


def test_looksam_matches_the_authors_looksam():
  """chain(looksam, add_decayed_weights, sgd with momentum) is their LookSAM over 2 k-cycles + 1."""
  rho, k, alpha, lr, mu, wd = 0.2, 3, 0.7, 0.1, 0.9, 5e-3
  tx = optax.chain(
    asam_jax.looksam(rho, k, alpha),
    optax.add_decayed_weights(wd),
    optax.sgd(lr, momentum=mu),
  )
  params, _ = trajectory(tx, f32(P0), 2 * k + 1)
  w = to_named(P0)
  state = msam.looksam_init(w, k=k)
  for t in range(2 * k + 1):
    w, state = msam.looksam_step(
      w, state, mlp_grad64, lr=lr, momentum=mu, weight_decay=wd, rho=rho, alpha=alpha, k=k
    )
    assert_named_close(at(params, t), w, rtol=2e-5)
  # pytorch_optimizer's LookSAM differs: it takes each tensor's g_v orthogonal to that
  # tensor's g only, and adds alpha ||g_tensor|| g_v_tensor / ||g_v_tensor|| per tensor
  # instead of alpha ||g|| g_v / ||g_v|| over the whole model (see
  # peers/pytorch_optimizer_looksam.py, tested below); ours is global, as the paper's.


# --- kozistr/pytorch_optimizer LookSAM (the port only) ----------------------------


def paper_looksam(w, grad_fn, steps, *, lr, rho, k, alpha):
  """Liu et al.'s Algorithm 1 over the whole vector, plain SGD, for a one-tensor model."""
  g_v, out = None, []
  for t in range(steps):
    g = grad_fn(w)
    if t % k == 0:
      g_s = grad_fn(w + rho * g / np.linalg.norm(g))
      g_v = g_s - (g @ g_s) / (g @ g) * g
      d = g_s
    else:
      d = g + alpha * np.linalg.norm(g) / np.linalg.norm(g_v) * g_v
    w = w - lr * d
    out.append(w)
  return out


def test_pytorch_optimizer_looksam_port():
  """One tensor: the paper's LookSAM. Two tensors: per-tensor orthogonality and length."""
  a = np.array([1.0, 3.0, 0.5, 2.0])
  grad_fn = lambda p: {"fc.weight": a * p["fc.weight"] + np.sin(p["fc.weight"])}
  kw = dict(rho=0.1, k=3, alpha=0.7)
  w, state = {"fc.weight": np.array([1.0, -2.0, 0.5, 0.3])}, pytorch_optimizer_looksam.init()
  want = paper_looksam(
    w["fc.weight"], lambda v: grad_fn({"fc.weight": v})["fc.weight"], 7, lr=0.1, **kw
  )
  sgd = lambda p, g: {n: p[n] - 0.1 * g[n] for n in p}
  for t in range(7):
    w, state = pytorch_optimizer_looksam.train_step(w, state, grad_fn, sgd, step=t, **kw)
    np.testing.assert_allclose(w["fc.weight"], want[t], rtol=1e-6, atol=1e-7)

  # Two tensors: each tensor's g_v is orthogonal to that tensor's g, and the
  # reuse step adds alpha ||g_tensor|| along each tensor's g_v.
  grad2 = lambda p: {
    "fc.weight": a * p["fc.weight"] + np.sin(p["fc.weight"]),
    "fc.bias": 2 * p["fc.bias"] ** 3,
  }
  w = {"fc.weight": np.array([1.0, -2.0, 0.5, 0.3]), "fc.bias": np.array([0.5, -1.0])}
  state = pytorch_optimizer_looksam.init()
  g = grad2(w)
  perturbed, state = pytorch_optimizer_looksam.first_step(w, g, state, step=0, k=3, rho=0.1)
  _, out, state = pytorch_optimizer_looksam.second_step(
    perturbed, grad2(perturbed), state, step=0, k=3
  )
  for n in w:
    assert abs(state["gv"][n] @ g[n]) < 1e-12
  global_gv = {n: out[n] - (sum(out[m] @ g[m] for m in g) / global_norm(g) ** 2) * g[n] for n in g}
  assert not np.allclose(state["gv"]["fc.bias"], global_gv["fc.bias"])
  _, reused, _ = pytorch_optimizer_looksam.second_step(w, g, state, step=1, k=3, alpha=0.7)
  for n in w:
    added = reused[n] - g[n]
    np.testing.assert_allclose(np.linalg.norm(added), 0.7 * np.linalg.norm(g[n]), rtol=1e-6)
  # The documented loops accumulate two backward passes on reuse steps: 2x the step with SGD.
  w1, _ = pytorch_optimizer_looksam.train_step(w, state, grad2, sgd, step=1, k=3, alpha=0.7)
  w2, _ = pytorch_optimizer_looksam.train_step(
    w, state, grad2, sgd, step=1, k=3, alpha=0.7, double_backward_on_reuse=True
  )
  for n in w:
    np.testing.assert_allclose(w2[n] - w[n], 2 * (w1[n] - w[n]), rtol=1e-7)
