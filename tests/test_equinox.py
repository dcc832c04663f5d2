"""asam_jax.equinox on modules with integer fields, BatchNorm state and Dropout.

The references are built without the helper: the same weights as a dict of
arrays with the MLP written out in jnp, stepped through the plain optax API,
and eps from the float64 NumPy reference of the paper's formula.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import METHODS, WITH_REFERENCE, assert_close, assert_trees_differ, perturbed_params

import asam_jax
import asam_jax.equinox

RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(size=(16, 3)), jnp.float32)
Y = jnp.asarray(RNG.normal(size=(16, 1)), jnp.float32)
DEPTH = 2


# --- an MLP in a module with an int32 array and a Python int -------------------


class Net(eqx.Module):
  mlp: eqx.nn.MLP
  offset: jax.Array  # int32, used by the forward pass: jax.grad must not see it
  scale: int

  def __call__(self, x):
    return self.mlp(x) * self.scale + self.offset


def drawn(make, *args, seed=0, **kwargs):
  """``make(*args, key=...)`` with its arrays drawn by NumPy, N(0, 1 / fan-in).

  Equinox's initializers run eagerly and compile op by op, which would take
  longer than the tests themselves.
  """
  shapes = eqx.filter_eval_shape(make, *args, key=jax.random.key(0), **kwargs)
  rng = np.random.default_rng(seed)

  def draw(leaf):
    if not isinstance(leaf, jax.ShapeDtypeStruct):
      return leaf
    return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(leaf.shape[-1]), leaf.dtype)

  return jax.tree.map(draw, shapes)


def make_net():
  mlp = drawn(eqx.nn.MLP, 3, 1, width_size=8, depth=DEPTH)
  return Net(mlp, jnp.array(1, jnp.int32), 2)


def mse(model, x, y):
  return jnp.mean((jax.vmap(model)(x) - y) ** 2)


@eqx.filter_jit
def eqx_step(tx, model, opt_state, x, y, filter_spec=eqx.is_inexact_array):
  """The train step of the docs."""
  value, grads, loss_fn = asam_jax.equinox.value_and_grad(mse, model, x, y, filter_spec=filter_spec)
  params = eqx.filter(model, filter_spec)
  updates, opt_state = tx.update(grads, opt_state, params, loss_fn=loss_fn)
  return eqx.apply_updates(model, updates), opt_state, value


def as_dict(net):
  """The MLP's weights as a dict of plain arrays."""
  out = {}
  for i, layer in enumerate(net.mlp.layers):
    out[f"w{i}"], out[f"b{i}"] = layer.weight, layer.bias
  return out


def plain_loss(p, x, y):
  """The same network in jnp, independent of Equinox: relu MLP, times 2, plus 1."""
  h = x
  for i in range(DEPTH + 1):
    h = h @ p[f"w{i}"].T + p[f"b{i}"]
    if i < DEPTH:
      h = jax.nn.relu(h)
  return jnp.mean((h * 2 + 1 - y) ** 2)


plain_grad = jax.jit(jax.grad(plain_loss))
plain_value_and_grad = jax.jit(jax.value_and_grad(plain_loss))


@functools.partial(jax.jit, static_argnums=0)
def plain_step(tx, params, opt_state):
  loss_fn = lambda p: plain_loss(p, X, Y)
  value, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = tx.update(grads, opt_state, params, loss_fn=loss_fn)
  return optax.apply_updates(params, updates), opt_state, value


def test_integer_fields_would_break_a_plain_grad():
  # The premise of the helper: without the partition jax.grad refuses the model.
  with pytest.raises(TypeError, match="int"):
    jax.grad(mse)(make_net(), X, Y)


@pytest.mark.parametrize("method", WITH_REFERENCE)
def test_step_equals_the_float64_reference(method):
  model = make_net()
  tx = optax.chain(METHODS[method].build(), optax.sgd(1.0))
  opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))
  stepped, opt_state, value = eqx_step(tx, model, opt_state, X, Y)

  params = as_dict(model)
  clean_value, grads = plain_value_and_grad(params, X, Y)
  adversarial = plain_grad(perturbed_params(grads, params, **METHODS[method].reference), X, Y)
  step_grads = jax.tree.map(lambda a, b: a - b, params, as_dict(stepped))
  np.testing.assert_allclose(value, clean_value, rtol=1e-6)
  assert_close(step_grads, adversarial, rtol=1e-4, atol=1e-5)
  # The gradient at w + eps is not the clean one, so the check above can fail.
  assert_trees_differ(step_grads, grads, atol=1e-3)
  assert int(opt_state[0].count) == 1


@pytest.mark.slow
def test_asam_adam_trajectory_equals_the_plain_optax_one():
  make_tx = lambda: optax.chain(asam_jax.asam(rho=0.5, eta=0.01), optax.adam(1e-2))
  model, tx = make_net(), make_tx()
  opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))
  params, plain_tx = as_dict(model), make_tx()
  plain_state = plain_tx.init(params)
  for _ in range(4):
    model, opt_state, value = eqx_step(tx, model, opt_state, X, Y)
    params, plain_state, plain_value = plain_step(plain_tx, params, plain_state)
    np.testing.assert_allclose(value, plain_value, rtol=1e-5)
    assert_close(as_dict(model), params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
      opt_state[0].perturbed_loss, plain_state[0].perturbed_loss, rtol=1e-5
    )
    np.testing.assert_allclose(
      opt_state[0].perturbation_norm, plain_state[0].perturbation_norm, rtol=1e-5
    )
  assert int(opt_state[0].count) == 4
  # The integer fields are carried through, untouched.
  assert model.offset.dtype == jnp.int32 and int(model.offset) == 1
  assert type(model.scale) is int and model.scale == 2


def test_weight_mask_selects_weights_not_biases():
  model = make_net()
  params = eqx.filter(model, eqx.is_inexact_array)
  mask = asam_jax.weight_mask(params)
  assert [layer.weight for layer in mask.mlp.layers] == [True] * (DEPTH + 1)
  assert [layer.bias for layer in mask.mlp.layers] == [False] * (DEPTH + 1)
  # The integer fields are not in params, so not in the mask either.
  assert mask.offset is None and mask.scale is None

  tx = optax.chain(
    asam_jax.asam(rho=1.0, eta=0.01, adaptive_mask=asam_jax.weight_mask), optax.sgd(1.0)
  )
  stepped, _, _ = eqx_step(tx, model, tx.init(params), X, Y)
  plain = as_dict(model)
  grads = plain_grad(plain, X, Y)
  adaptive = [name.startswith("w") for name in sorted(plain)]  # the dict's leaf order
  adversarial = plain_grad(
    perturbed_params(grads, plain, rho=1.0, eta=0.01, adaptive=adaptive), X, Y
  )
  step_grads = jax.tree.map(lambda a, b: a - b, plain, as_dict(stepped))
  assert_close(step_grads, adversarial, rtol=1e-4, atol=1e-5)
  # ASAM on every leaf perturbs the biases too, and ends elsewhere.
  everywhere = plain_grad(perturbed_params(grads, plain, rho=1.0, eta=0.01, adaptive=True), X, Y)
  assert_trees_differ(step_grads, everywhere, atol=1e-3)


def test_filter_spec_freezes_a_layer():
  model = make_net()
  frozen = lambda m: m.mlp.layers[0]
  spec = jax.tree.map(eqx.is_inexact_array, model)
  spec = eqx.tree_at(frozen, spec, replace_fn=lambda layer: jax.tree.map(lambda _: False, layer))
  tx = optax.chain(asam_jax.asam(rho=1.0, eta=0.01), optax.sgd(1.0))
  opt_state = tx.init(eqx.filter(model, spec))
  stepped, _, _ = eqx_step(tx, model, opt_state, X, Y, filter_spec=spec)
  np.testing.assert_array_equal(frozen(stepped).weight, frozen(model).weight)
  np.testing.assert_array_equal(frozen(stepped).bias, frozen(model).bias)
  assert_trees_differ(stepped.mlp.layers[1:], model.mlp.layers[1:], atol=1e-3)


# --- BatchNorm state and Dropout through has_aux --------------------------------


class BNNet(eqx.Module):
  linear1: eqx.nn.Linear
  norm: eqx.nn.BatchNorm
  dropout: eqx.nn.Dropout
  linear2: eqx.nn.Linear

  def __init__(self):
    self.linear1 = drawn(eqx.nn.Linear, 3, 8, seed=1)
    # "ema" normalizes with the running statistics mixed in, so the state a pass starts from matters.
    self.norm = eqx.nn.BatchNorm(8, axis_name="batch", momentum=0.5, mode="ema")
    self.dropout = eqx.nn.Dropout(0.5)
    self.linear2 = drawn(eqx.nn.Linear, 8, 1, seed=2)

  def __call__(self, x, state, key):
    h, state = self.norm(self.linear1(x), state)
    return self.linear2(self.dropout(jax.nn.relu(h), key=key)), state


def bn_loss(model, state, x, y, key):
  keys = jax.random.split(key, x.shape[0])
  forward = jax.vmap(model, axis_name="batch", in_axes=(0, None, 0), out_axes=(0, None))
  out, state = forward(x, state, keys)
  return jnp.mean((out - y) ** 2), state


@eqx.filter_jit
def bn_step(tx, model, state, opt_state, x, y, key):
  (value, state), grads, loss_fn = asam_jax.equinox.value_and_grad(
    bn_loss, model, state, x, y, key, has_aux=True
  )
  params = eqx.filter(model, eqx.is_inexact_array)
  updates, opt_state = tx.update(grads, opt_state, params, loss_fn=loss_fn)
  return eqx.apply_updates(model, updates), state, opt_state, value


@eqx.filter_jit
def bn_grad(model, state, key, x):
  """The hand-built pass: bn_loss at model, its gradient and the new state."""
  grad_fn = eqx.filter_value_and_grad(bn_loss, has_aux=True)
  (value, new_state), grads = grad_fn(model, state, x, Y, key)
  return value, grads, new_state


def floats(tree):
  return jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))


def test_batch_norm_state_and_dropout_key_of_the_clean_pass():
  model, state = eqx.nn.make_with_state(BNNet)()
  # rbg dropout keys: compiling threefry's would double the test's time, and
  # the kind of key does not matter here.
  key = jax.random.key(7, impl="rbg")
  # One pass on another batch first, so that running statistics of their own are in use.
  _, _, state = bn_grad(model, state, jax.random.key(3, impl="rbg"), 2 * X + 1)
  tx = optax.chain(asam_jax.asam(rho=1.0, eta=0.01), optax.sgd(1.0))
  params, rest = eqx.partition(model, eqx.is_inexact_array)
  stepped, new_state, _, value = bn_step(tx, model, state, tx.init(params), X, Y, key)

  clean_value, grads, clean_state = bn_grad(model, state, key, X)
  w_eps = eqx.combine(perturbed_params(grads, params, rho=1.0, eta=0.01, adaptive=True), rest)
  _, adversarial, perturbed_state = bn_grad(w_eps, state, key, X)
  _, other_key, _ = bn_grad(w_eps, state, jax.random.key(8, impl="rbg"), X)
  _, from_new_state, _ = bn_grad(w_eps, clean_state, key, X)

  step_grads = jax.tree.map(lambda a, b: a - b, params, eqx.filter(stepped, eqx.is_inexact_array))
  np.testing.assert_allclose(value, clean_value, rtol=1e-6)
  assert_close(step_grads, adversarial, rtol=1e-4, atol=1e-5)
  # Another dropout key, or the statistics the clean pass wrote, give another gradient.
  assert_trees_differ(step_grads, other_key, atol=1e-2)
  assert_trees_differ(step_grads, from_new_state, atol=1e-3)
  # The state is the clean pass's; the perturbed pass's is dropped.
  assert_close(floats(new_state), floats(clean_state), rtol=1e-6)
  assert_trees_differ(floats(new_state), floats(perturbed_state), atol=1e-4)
