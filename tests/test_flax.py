"""asam_jax.flax with Linen and NNX models that have BatchNorm and Dropout.

The reference gradient is built by hand: the clean gradient and grad L(w + eps)
come from Flax itself with an explicitly chosen dropout key, and eps from the
float64 NumPy reference of the paper's formula, never from asam_jax.
"""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from helpers import (
  METHODS,
  WITH_REFERENCE,
  assert_close,
  assert_trees_differ,
  host,
  perturbed_params,
  tiered,
)

import asam_jax
import asam_jax.flax

RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(size=(16, 3)), jnp.float32)
Y = jnp.asarray(RNG.normal(size=(16, 1)), jnp.float32)
KEY = jax.random.key(7)


# --- Linen: asam_jax.flax.TrainState and the train-step pattern of the README --


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x, train):
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(nn.Dense(8)(x))
    x = nn.Dropout(0.5, deterministic=not train)(nn.relu(x))
    return nn.Dense(1)(x)


def linen_loss(state, x, y, dropout_key):
  def loss(params):
    out, updates = state.apply_fn(
      {"params": params, "batch_stats": state.batch_stats},
      x,
      train=True,
      rngs={"dropout": dropout_key},
      mutable=["batch_stats"],
    )
    return jnp.mean((out - y) ** 2), updates["batch_stats"]

  return loss


@jax.jit
def linen_step(state, x, y, dropout_key):
  loss = linen_loss(state, x, y, dropout_key)
  (value, batch_stats), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
  # The perturbed pass reuses `loss`: the same dropout key, and tx drops its batch_stats.
  state = state.apply_gradients(grads=grads, loss_fn=loss, batch_stats=batch_stats)
  return state, value


LINEN_NET = LinenNet()  # one instance: apply_fn is static, so jit caches on it


def linen_state(tx):
  variables = LINEN_NET.init(jax.random.key(0), X, train=False)
  return asam_jax.flax.TrainState.create(
    apply_fn=LINEN_NET.apply,
    params=variables["params"],
    batch_stats=variables["batch_stats"],
    tx=tx,
  )


@functools.cache
def linen_one_step(method):
  """One step with chain(method, sgd(1)), and the hand-built passes it should equal."""
  state = linen_state(optax.chain(METHODS[method].build(has_aux=True), optax.sgd(1.0)))
  stepped, _ = linen_step(state, X, Y, KEY)
  loss = linen_loss(state, X, Y, KEY)
  (_, clean_stats), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
  w_eps = perturbed_params(grads, state.params, **METHODS[method].reference)
  (_, perturbed_stats), adversarial = jax.value_and_grad(loss, has_aux=True)(w_eps)
  other_key = linen_loss(state, X, Y, jax.random.key(8))
  _, other_adversarial = jax.value_and_grad(other_key, has_aux=True)(w_eps)
  step_grads = jax.tree.map(lambda a, b: a - b, state.params, stepped.params)
  return stepped, step_grads, clean_stats, perturbed_stats, adversarial, other_adversarial


@pytest.mark.parametrize("method", tiered(WITH_REFERENCE, ("sam",)))
def test_linen_batch_stats_come_from_the_clean_pass_only(method):
  stepped, _, clean_stats, perturbed_stats, _, _ = linen_one_step(method)
  assert_close(stepped.batch_stats, clean_stats, rtol=1e-6)
  # The perturbed pass would have written other statistics, so the check above can fail.
  assert_trees_differ(stepped.batch_stats, perturbed_stats, atol=1e-4)
  assert int(stepped.step) == 1 and int(stepped.opt_state[0].count) == 1


@pytest.mark.parametrize("method", tiered(WITH_REFERENCE, ("sam",)))
def test_linen_perturbed_pass_uses_the_clean_dropout_key(method):
  _, step_grads, _, _, adversarial, other_adversarial = linen_one_step(method)
  assert_close(step_grads, adversarial, rtol=1e-4, atol=1e-5)
  # Another key drops other units, and gives a clearly different gradient.
  assert_trees_differ(step_grads, other_adversarial, atol=1e-2)


def test_linen_apply_gradients_needs_the_loss_closure():
  state = linen_state(optax.chain(asam_jax.sam(), optax.sgd(0.1)))
  with pytest.raises(TypeError, match="loss_fn"):
    state.apply_gradients(grads=state.params)


def test_linen_apply_gradients_lets_a_plain_optimizer_ignore_the_closure():
  state = linen_state(optax.sgd(0.1))
  want = jax.tree.map(lambda w: w - 0.1 * w, state.params)
  # A drop-in for Flax's TrainState: apply_gradients(grads=...) alone works too.
  for stepped in (
    state.apply_gradients(grads=state.params, loss_fn=lambda p: 0.0),
    state.apply_gradients(grads=state.params),
  ):
    assert_close(stepped.params, want, rtol=1e-6)
    assert stepped.tx is state.tx and int(stepped.step) == 1
  # As for a transformation that needs no closure, such as Momentum-SAM.
  msam = linen_state(asam_jax.momentum_sam(0.1, rho=0.0))
  assert_close(msam.apply_gradients(grads=msam.params).params, want, rtol=1e-6)


# --- NNX: nnx.Optimizer with asam_jax.flax.nnx_value_and_grad -------------------


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.dense1 = nnx.Linear(3, 8, rngs=rngs)
    self.norm = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)
    self.dense2 = nnx.Linear(8, 1, rngs=rngs)

  def __call__(self, x):
    return self.dense2(self.dropout(jax.nn.relu(self.norm(self.dense1(x)))))


def nnx_loss(model, x, y):
  out = model(x)
  return jnp.mean((out - y) ** 2), out


@nnx.jit
def nnx_step(model, optimizer, x, y):
  (value, _), grads, loss_fn = asam_jax.flax.nnx_value_and_grad(nnx_loss, model, x, y, has_aux=True)
  optimizer.update(model, grads, loss_fn=loss_fn)
  return value


@pytest.mark.slow
def test_nnx_wrt_other_than_the_optimizers_says_to_pass_the_same():
  model = NnxNet(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.chain(asam_jax.sam(), optax.sgd(0.1)), wrt=nnx.Param)
  x, y = jnp.ones((4, 3)), jnp.ones((4, 1))
  dense1 = nnx.All(nnx.Param, nnx.PathContains("dense1"))
  *_, loss_fn = asam_jax.flax.nnx_value_and_grad(nnx_loss, model, x, y, has_aux=True, wrt=dense1)
  all_grads = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
  with pytest.raises(ValueError, match=r"pass nnx_value_and_grad the optimizer's wrt"):
    optimizer.update(model, all_grads, loss_fn=loss_fn)


@pytest.mark.parametrize("method", tiered(WITH_REFERENCE, ("sam",)))
def test_nnx_step_equals_the_hand_built_reference(method):
  model = NnxNet(nnx.Rngs(params=0, dropout=1))
  # nnx_value_and_grad's closure returns the bare loss, so tx needs no has_aux.
  optimizer = nnx.Optimizer(
    model, optax.chain(METHODS[method].build(), optax.sgd(1.0)), wrt=nnx.Param
  )
  before = nnx.clone(model)
  value = nnx_step(model, optimizer, X, Y)

  # By hand, on copies of the model before the step, so that each pass draws
  # the dropout key that the first call draws.
  clean = nnx.clone(before)
  grad_fn = nnx.value_and_grad(nnx_loss, argnums=nnx.DiffState(0, nnx.Param), has_aux=True)
  (clean_value, _), grads = grad_fn(clean, X, Y)
  params = nnx.as_pure(nnx.state(before, nnx.Param))
  perturbed = nnx.clone(before)
  nnx.update(perturbed, perturbed_params(nnx.as_pure(grads), params, **METHODS[method].reference))
  adversarial = nnx.as_pure(grad_fn(perturbed, X, Y)[1])
  perturbed_stats = nnx.as_pure(nnx.state(perturbed, nnx.BatchStat))
  # perturbed's dropout stream has advanced: a second pass drops other units.
  other_adversarial = nnx.as_pure(grad_fn(perturbed, X, Y)[1])

  step_grads = jax.tree.map(lambda a, b: a - b, params, nnx.as_pure(nnx.state(model, nnx.Param)))
  np.testing.assert_allclose(value, clean_value, rtol=1e-6)
  assert_close(step_grads, adversarial, rtol=1e-4, atol=1e-5)
  assert_trees_differ(step_grads, other_adversarial, atol=1e-2)
  # Statistics and RNG counts are those of the clean pass alone.
  stats = nnx.as_pure(nnx.state(model, nnx.BatchStat))
  assert_close(stats, nnx.as_pure(nnx.state(clean, nnx.BatchStat)), rtol=1e-6)
  assert_trees_differ(stats, perturbed_stats, atol=1e-4)
  counts = [int(c) for c in jax.tree.leaves(nnx.state(model, nnx.RngCount))]
  assert counts == [int(c) for c in jax.tree.leaves(nnx.state(clean, nnx.RngCount))] == [1]
  assert int(optimizer.step[...]) == 1 and int(optimizer.opt_state[0].count[...]) == 1


class CalledWithRngs(nnx.Module):
  """Dropout drawn from an nnx.Rngs passed at call time, as the Flax docs write it."""

  def __init__(self, rngs):
    self.dense1 = nnx.Linear(3, 8, rngs=rngs)
    self.dropout = nnx.Dropout(0.5)
    self.dense2 = nnx.Linear(8, 1, rngs=rngs)

  def __call__(self, x, rngs):
    return self.dense2(self.dropout(jax.nn.relu(self.dense1(x)), rngs=rngs))


def rngs_loss(model, x, y, rngs):
  return jnp.mean((model(x, rngs=rngs) - y) ** 2)


@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "nnx.jit"])
def test_an_nnx_rngs_in_the_arguments_is_replayed_by_the_perturbed_pass(jitted):
  model = CalledWithRngs(nnx.Rngs(0))
  rngs = nnx.Rngs(dropout=1)
  before, rngs_before = nnx.clone(model), nnx.clone(rngs)
  optimizer = nnx.Optimizer(
    model, optax.chain(asam_jax.sam(rho=0.2), optax.sgd(1.0)), wrt=nnx.Param
  )

  def step(model, optimizer, rngs):
    value, grads, loss_fn = asam_jax.flax.nnx_value_and_grad(rngs_loss, model, X, Y, rngs)
    optimizer.update(model, grads, loss_fn=loss_fn)
    return value

  value = (nnx.jit(step) if jitted else step)(model, optimizer, rngs)
  # The caller's Rngs advanced by the clean pass's one draw, and no more.
  assert int(rngs.dropout.count[...]) == int(rngs_before.dropout.count[...]) + 1

  # By hand: both passes draw from copies of the Rngs as they were before the step.
  grad_fn = nnx.value_and_grad(rngs_loss, argnums=nnx.DiffState(0, nnx.Param))
  clean_value, grads = grad_fn(nnx.clone(before), X, Y, nnx.clone(rngs_before))
  params = nnx.as_pure(nnx.state(before, nnx.Param))
  perturbed = nnx.clone(before)
  nnx.update(perturbed, perturbed_params(nnx.as_pure(grads), params, rho=0.2))
  adversarial = nnx.as_pure(grad_fn(perturbed, X, Y, nnx.clone(rngs_before))[1])
  # Another mask, as the caller's advanced Rngs would draw: a different gradient.
  other = nnx.as_pure(grad_fn(perturbed, X, Y, rngs)[1])

  step_grads = jax.tree.map(lambda a, b: a - b, params, nnx.as_pure(nnx.state(model, nnx.Param)))
  np.testing.assert_allclose(value, clean_value, rtol=1e-6)
  assert_close(step_grads, adversarial, rtol=1e-4, atol=1e-5)
  assert_trees_differ(step_grads, other, atol=1e-2)


def test_momentum_sam_weights_read_the_state_nnx_optimizer_holds():
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, asam_jax.momentum_sam(0.1, rho=0.1), wrt=nnx.Param)
  x = jnp.linspace(-1, 1, 12).reshape(4, 3)

  @nnx.jit
  def step(model, optimizer):
    optimizer.update(model, nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model))

  for _ in range(3):
    step(model, optimizer)
  held = nnx.state(model, nnx.Param)
  got = asam_jax.momentum_sam_weights(held, optimizer.opt_state)
  state = optimizer.opt_state
  scale = float(state.scale[...])
  momentum = nnx.as_pure(state.momentum)
  want = jax.tree.map(lambda w, m: w + scale * m, nnx.as_pure(held), momentum)
  assert isinstance(got, nnx.State)
  assert_close(nnx.as_pure(got), want, rtol=1e-6)


# --- checkpointing: SAMState in an optax chain in a Linen TrainState ----------


@jax.jit
def linen_run_step(state):
  # The dropout key comes from the step count, so a resumed run replays the same masks.
  return linen_step(state, X, Y, jax.random.fold_in(KEY, state.step))[0]


@pytest.mark.slow
def test_resumed_run_follows_the_uninterrupted_trajectory(tmp_path):
  tx = optax.chain(
    asam_jax.asam(rho=0.5, eta=0.01, has_aux=True),
    optax.add_decayed_weights(1e-3),
    optax.sgd(0.05, momentum=0.9),
  )
  state = linen_state(tx)
  uninterrupted = []
  for _ in range(6):
    state = linen_run_step(state)
    uninterrupted.append(state)

  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "step3", uninterrupted[2])
  checkpointer.wait_until_finished()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, linen_state(tx))
  state = checkpointer.restore(tmp_path / "step3", abstract)

  assert isinstance(state, asam_jax.flax.TrainState) and state.tx is tx
  assert isinstance(state.opt_state[0], asam_jax.SAMState)
  chex.assert_trees_all_equal(state, uninterrupted[2])
  for want in uninterrupted[3:]:
    state = linen_run_step(state)
    chex.assert_trees_all_equal(state, want)
  assert int(state.opt_state[0].count) == 6


@pytest.mark.slow
def test_resumed_nnx_run_follows_the_uninterrupted_trajectory(tmp_path):
  def fresh():
    model = NnxNet(nnx.Rngs(params=0, dropout=1))
    tx = optax.chain(asam_jax.asam(rho=0.5, eta=0.01), optax.sgd(0.05, momentum=0.9))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  model, optimizer = fresh()
  checkpointer = ocp.StandardCheckpointer()
  uninterrupted = []
  for step in range(5):
    nnx_step(model, optimizer, X, Y)
    uninterrupted.append(host(nnx.as_pure(nnx.state((model, optimizer)))))
    if step == 1:
      checkpointer.save(tmp_path / "step2", nnx.state((model, optimizer)))
  checkpointer.wait_until_finished()

  # The RNG counts travel with the model, so the resumed run draws the same dropout keys.
  model, optimizer = fresh()
  nnx.update(
    (model, optimizer), checkpointer.restore(tmp_path / "step2", nnx.state((model, optimizer)))
  )
  assert isinstance(optimizer.opt_state[0], asam_jax.SAMState)
  restored = host(nnx.as_pure(nnx.state((model, optimizer))))
  chex.assert_trees_all_equal(restored, uninterrupted[1])
  for want in uninterrupted[2:]:
    nnx_step(model, optimizer, X, Y)
    chex.assert_trees_all_equal(host(nnx.as_pure(nnx.state((model, optimizer)))), want)
  assert int(optimizer.opt_state[0].count[...]) == 5
