"""One perturbation per group of devices, on 8 forced CPU devices, for test_parallel.

Run as a script (the caller sets ``XLA_FLAGS`` to 8 host devices and ``NPROC``),
``python group_sync_worker.py`` checks on a 4 x 2 mesh ("outer", "inner") that

* ``sam(axis_name=("outer", "inner"), sync_perturbation="inner")`` equals a
  port of google-research/sam's ``train_step`` with ``sync_perturbations`` and
  ``inner_group_size=2``;
* every transformation that takes ``sync_perturbation`` computes, synced over
  "inner", what it computes on 4 devices ("outer" alone) each holding the
  batch of one group: one device per group;

and prints ``ok``, or raises.
"""

import jax
import numpy as np
import optax
from helpers import METHODS, RHO, STEPS, W0, X, Y, f32, host, ls_grad64, ls_loss
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from peers import google_sam

import asam_jax

GROUP = 2


def train(tx, mesh, axes, batch_spec):
  """STEPS shard_map steps of ``tx`` from W0 with params replicated and the batch sharded."""

  def step(params, state, x, y):
    loss_fn = lambda p: ls_loss(p, x, y)
    grads = jax.grad(loss_fn)(asam_jax.to_varying(params, axes))
    updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    return optax.apply_updates(params, updates), state

  step = jax.jit(
    jax.shard_map(
      step, mesh=mesh, in_specs=(P(), P(), batch_spec, batch_spec), out_specs=(P(), P())
    )
  )
  params, state = f32(W0), tx.init(f32(W0))
  x, y = (jax.device_put(f32(a), NamedSharding(mesh, batch_spec)) for a in (X, Y))
  for _ in range(STEPS):
    params, state = step(params, state, x, y)
  return host((params, state))


def main():
  assert jax.device_count() == 8, jax.devices()
  grouped = jax.make_mesh((4, GROUP), ("outer", "inner"))
  # 4 devices, each holding what one group of 2 holds: rows [2 k B, 2 (k + 1) B).
  single = jax.make_mesh((4,), ("outer",), devices=jax.devices()[:4])
  outer_inner = P(("outer", "inner"))

  # google-research/sam, one step of SAM's gradient, against one update of ours.
  tx = asam_jax.sam(RHO, axis_name=("outer", "inner"), sync_perturbation="inner")
  replicas = np.split(np.arange(len(X)), 8)
  fns = [lambda w, r=r: ls_grad64(w, X[r], Y[r]) for r in replicas]
  want = google_sam.sam_gradient(
    fns, dict(W0), rho=RHO, sync_perturbations=True, inner_group_size=GROUP
  )

  def update(params, x, y):
    loss_fn = lambda p: ls_loss(p, x, y)
    grads = jax.grad(loss_fn)(asam_jax.to_varying(params, ("outer", "inner")))
    return tx.update(grads, tx.init(params), params, loss_fn=loss_fn)

  got, state = jax.jit(
    jax.shard_map(update, mesh=grouped, in_specs=(P(), outer_inner, outer_inner), out_specs=P())
  )(f32(W0), *(jax.device_put(f32(a), NamedSharding(grouped, outer_inner)) for a in (X, Y)))
  for name in want:
    np.testing.assert_allclose(np.asarray(got[name]), want[name], rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(float(state.perturbation_norm), RHO, rtol=1e-5)
  # The rule differs from both the global and the per-device one: the comparison tells them apart.
  for mode in (dict(sync_perturbations=True), dict(sync_perturbations=False)):
    other = google_sam.sam_gradient(fns, dict(W0), rho=RHO, **mode)
    assert not np.allclose(other["w"], want["w"], rtol=1e-4), mode

  # Every transformation with sync_perturbation: a group of devices is one device.
  for name, method in METHODS.items():
    if "sync_perturbation" not in method.make.__code__.co_varnames:
      continue
    groups = train(
      method.chain(axis_name=("outer", "inner"), sync_perturbation="inner"),
      grouped,
      ("outer", "inner"),
      outer_inner,
    )
    devices = train(method.chain(axis_name="outer"), single, "outer", P("outer"))
    for a, b in zip(jax.tree.leaves(groups), jax.tree.leaves(devices)):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6, err_msg=name)
  print("ok")


if __name__ == "__main__":
  main()
