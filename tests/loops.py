"""A jitted training loop on test_sam's least-squares problem, shared by the variants' tests."""

import functools

import jax
import optax
import reference
from test_sam import W0, X, Y, ls_grad64, ls_loss


def scan_steps(tx, params, loss_fn, steps, *, closure=True):
  """``steps`` updates of ``tx`` from ``tx.init(params)`` in a ``lax.scan``, each from the
  gradient of ``loss_fn`` at the params held (and ``loss_fn=`` itself, if ``closure``);
  returns ``(params, state)`` and every update. Not jitted, so that pmap or shard_map can wrap it.
  """
  extra = {"loss_fn": loss_fn} if closure else {}

  def body(carry, _):
    params, state = carry
    updates, state = tx.update(jax.grad(loss_fn)(params), state, params, **extra)
    return (optax.apply_updates(params, updates), state), updates

  return jax.lax.scan(body, (params, tx.init(params)), None, length=steps)


@functools.partial(jax.jit, static_argnums=(0, 2))
def run(tx, params, steps):
  """``steps`` updates of ``tx`` on the least-squares problem; returns params, state and every update."""
  (params, state), updates = scan_steps(tx, params, lambda p: ls_loss(p, X, Y), steps)
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
