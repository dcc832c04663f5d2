"""A jitted training loop on test_sam's least-squares problem, shared by the variants' tests."""

import functools

import jax
import optax
import reference
from test_sam import W0, X, Y, ls_grad64, ls_loss


@functools.partial(jax.jit, static_argnums=(0, 2))
def run(tx, params, steps):
  """``steps`` updates of ``tx`` from ``tx.init(params)``; returns params, state and every update."""

  def body(carry, _):
    params, state = carry
    loss_fn = lambda p: ls_loss(p, X, Y)
    updates, state = tx.update(jax.grad(loss_fn)(params), state, params, loss_fn=loss_fn)
    return (optax.apply_updates(params, updates), state), updates

  (params, state), updates = jax.lax.scan(body, (params, tx.init(params)), None, length=steps)
  return params, state, updates


def flat(tree):
  """A {"b", "w"} pytree as one float64 vector, and back."""
  return reference.flat([tree["b"], tree["w"]])


def unflat(v):
  return {"b": v[:3], "w": v[3:].reshape(5, 3)}


def grad64(v):
  """The float64 least-squares gradient at a flat weight vector."""
  return flat(ls_grad64(unflat(v), X, Y))


W0_FLAT = flat(W0)
