"""Every public constructor through the ways optax users run them: inject_hyperparams,
lax.scan and lax.cond under x64 and with mixed dtypes, and vmap over an ensemble."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import METHODS, tiered

import asam_jax


def _loss(params):
  return jnp.sum(jnp.sin(params["w"].astype(jnp.float32))) + jnp.sum(
    params["b"].astype(jnp.float32) ** 2
  )


def _chain(name, tx):
  return tx if METHODS[name].optimizer else optax.chain(tx, optax.sgd(0.1))


def _update(name, tx, params, state):
  grads = jax.grad(_loss)(params)
  extra = {"loss_fn": _loss} if METHODS[name].closure else {}
  updates, state = tx.update(grads, state, params, **extra)
  return optax.apply_updates(params, updates), state


# One closure-based transformation, one with a state of its own, one optimizer.
FAST = ("sam", "momentum_sam")


@pytest.mark.parametrize("name", tiered(METHODS, FAST))
def test_inject_hyperparams_with_its_static_args(name):
  make, kwargs, statics = METHODS[name].make, METHODS[name].kwargs, METHODS[name].static_args
  params = {"w": jnp.linspace(-1, 1, 6).reshape(2, 3), "b": jnp.ones(3)}
  if statics:
    with pytest.raises(TypeError, match=r"static_args=\(" + repr(statics[0])):
      injected = optax.inject_hyperparams(make)(**kwargs)
      jax.jit(lambda p: _update(name, _chain(name, injected), p, _chain(name, injected).init(p)))(
        params
      )
  tx = _chain(name, optax.inject_hyperparams(make, static_args=statics)(**kwargs))
  step = jax.jit(lambda p, s: _update(name, tx, p, s))
  state = tx.init(params)
  params2, state = step(params, state)
  # The injected rho is read at run time: 0 gives the plain gradient step.
  inner = state if METHODS[name].optimizer else state[0]
  inner.hyperparams["rho"] = jnp.zeros_like(inner.hyperparams["rho"])
  params3, _ = step(params2, state)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params3))


@pytest.mark.parametrize("name", tiered(METHODS, FAST))
def test_state_keeps_its_types_through_scan_and_cond_under_x64_and_mixed_dtypes(name):
  with jax.enable_x64(True):
    params = {
      "w": jnp.linspace(-1, 1, 6, dtype=jnp.float64).reshape(2, 3),
      "b": jnp.ones(3, jnp.bfloat16),
    }
    tx = _chain(name, METHODS[name].build())

    @jax.jit
    def run(params):
      state = tx.init(params)

      def body(carry, _):
        return _update(name, tx, *carry), None

      (params, state), _ = jax.lax.scan(body, (params, state), None, length=3)
      # Either branch must give the state the same types.
      return jax.lax.cond(
        jnp.sum(params["w"]) < 1e9, lambda c: _update(name, tx, *c), lambda c: c, (params, state)
      )

    params_out, _ = run(params)
    chex.assert_trees_all_equal_dtypes(params_out, params)
    assert all(np.all(np.isfinite(np.asarray(x, np.float64))) for x in jax.tree.leaves(params_out))


@pytest.mark.parametrize("name", tiered(METHODS, FAST))
def test_vmap_over_an_ensemble(name):
  tx = _chain(name, METHODS[name].build())
  members = {"w": jnp.stack([jnp.linspace(-1, 1, 6).reshape(2, 3) * s for s in (1.0, 2.0, 3.0)])}
  members["b"] = jnp.ones((3, 3))
  states = jax.vmap(tx.init)(members)
  out, _ = jax.jit(jax.vmap(lambda p, s: _update(name, tx, p, s)))(members, states)
  for i in range(3):  # each member as if alone
    alone = jax.tree.map(lambda a, i=i: a[i], members)
    want, _ = _update(name, tx, alone, tx.init(alone))
    chex.assert_trees_all_close(jax.tree.map(lambda a, i=i: a[i], out), want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_random_sam_ensemble_members_get_their_own_streams_as_documented():
  tx = asam_jax.random_sam(jax.random.key(0), rho=0.1)
  members = {"w": jnp.ones((3, 4)), "b": jnp.zeros((3, 2))}
  states = jax.vmap(tx.init)(members)
  update = jax.vmap(lambda p, s: tx.update(p, s, p, loss_fn=lambda q: jnp.sum(jnp.sin(q["w"]))))
  same, _ = update(members, states)
  assert np.allclose(same["w"][0], same["w"][1])  # one key copied to every member
  states = states._replace(key=jax.random.split(jax.random.key(1), 3))
  own, _ = update(members, states)
  assert not np.allclose(own["w"][0], own["w"][1])
