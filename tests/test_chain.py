"""check_chain: the chain orders in which SAM's gradient would not reach the optimizer, refused."""

import jax
import optax
import pytest
from helpers import METHODS, W0, X, Y, f32, ls_loss

import asam_jax

PARAMS = f32(W0)
SAM = asam_jax.sam(0.05)
STATIC = ("p", "ascent_steps")

RIGHT = {
  "sam, then the optimizer": optax.chain(SAM, optax.sgd(0.1)),
  "sam, clipping, weight decay, optimizer": optax.chain(
    SAM, optax.clip_by_global_norm(1.0), optax.add_decayed_weights(1e-4), optax.sgd(0.1)
  ),
  "injected": optax.chain(
    optax.inject_hyperparams(asam_jax.sam, static_args=STATIC)(rho=0.1), optax.sgd(0.1)
  ),
  "accumulation after sam": optax.chain(
    SAM, optax.MultiSteps(optax.sgd(0.1), 4).gradient_transformation()
  ),
  "apply_if_finite after sam": optax.chain(SAM, optax.apply_if_finite(optax.sgd(0.1), 3)),
  "weight decay before momentum_sam": optax.chain(
    optax.add_decayed_weights(1e-4), asam_jax.momentum_sam(0.1)
  ),
  "named chain": optax.named_chain(("sam", SAM), ("sgd", optax.sgd(0.1))),
}

WRONG = {
  "accumulated inside MultiSteps": (
    optax.MultiSteps(optax.chain(SAM, optax.sgd(0.1)), 4),
    r"inside optax.MultiSteps.*optax.MultiSteps\(optimizer, k\).gradient_transformation\(\)",
  ),
  "clipping before sam": (
    optax.chain(optax.clip_by_global_norm(0.01), SAM, optax.sgd(0.1)),
    "not first in its chain",
  ),
  "weight decay before sam": (
    optax.chain(optax.add_decayed_weights(1e-4), SAM, optax.sgd(0.1)),
    "not first in its chain",
  ),
  "the optimizer before sam": (optax.chain(optax.sgd(0.1), SAM), "not first in its chain"),
  "named chain, sam second": (
    optax.named_chain(("clip", optax.clip(1.0)), ("sam", SAM)),
    "not first in its chain",
  ),
  "something after momentum_sam": (
    optax.chain(asam_jax.momentum_sam(0.1), optax.scale(0.5)),
    "followed by other transformations",
  ),
}


@pytest.mark.parametrize("name", RIGHT)
def test_right_orders_pass(name):
  asam_jax.check_chain(RIGHT[name], PARAMS)


@pytest.mark.parametrize("name", WRONG)
def test_wrong_orders_are_refused_with_the_form_that_works(name):
  tx, match = WRONG[name]
  with pytest.raises(ValueError, match=match):
    asam_jax.check_chain(tx, PARAMS)


@pytest.mark.parametrize("name", [n for n, m in METHODS.items() if m.closure and not m.optimizer])
def test_every_closure_method_must_come_first(name):
  method = METHODS[name]
  asam_jax.check_chain(method.chain(), PARAMS)
  with pytest.raises(ValueError, match="not first in its chain"):
    asam_jax.check_chain(optax.chain(optax.clip_by_global_norm(1.0), method.build()), PARAMS)


def test_the_wrong_orders_do_go_wrong():
  """What the refusals prevent, measured: each wrong order changes the trajectory silently."""
  loss_fn = lambda p: ls_loss(p, X, Y)

  def final(tx, steps=3):
    params, state = PARAMS, tx.init(PARAMS)
    for _ in range(steps):
      updates, state = tx.update(jax.grad(loss_fn)(params), state, params, loss_fn=loss_fn)
      params = optax.apply_updates(params, updates)
    return params

  # Clipping before SAM is dropped: the update's norm exceeds the clip bound.
  tx = optax.chain(optax.clip_by_global_norm(0.01), SAM, optax.scale(-1.0))
  updates, _ = tx.update(jax.grad(loss_fn)(PARAMS), tx.init(PARAMS), PARAMS, loss_fn=loss_fn)
  assert float(optax.tree.norm(updates)) > 0.1
  # SGD before SAM: the raw gradient at w + eps becomes the step, added to w: an ascent.
  climbed = final(optax.chain(optax.sgd(0.1), asam_jax.sam(0.05)), steps=3)
  assert (
    float(loss_fn(climbed))
    > float(loss_fn(PARAMS))
    > float(loss_fn(final(RIGHT["sam, then the optimizer"])))
  )
