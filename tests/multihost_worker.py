"""mSAM training under shard_map on a global mesh, for the multi-process test.

`train` runs in the pytest process on its 4 local devices. Run as a script,
`python multihost_worker.py PROCESS_ID PORT OUT.npz METHOD` joins a 2-process
cluster on 127.0.0.1 (2 forced CPU devices each, set by the caller's
XLA_FLAGS), runs the same `train` on the 4 global devices and saves the leaves
of its result.
"""

import sys

import jax
import numpy as np
import optax
from helpers import METHODS, STEPS, W0, X, Y, ls_loss
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import asam_jax


def train(mesh, method="sam"):
  """STEPS steps of chain(method(axis_name="data"), sgd) from W0, batch sharded over mesh.

  Returns the params and the method's state, as NumPy arrays.
  """
  tx = METHODS[method].chain(axis_name="data")

  def step(params, state, x, y):
    loss_fn = lambda p: ls_loss(p, x, y)
    grads = jax.grad(loss_fn)(asam_jax.to_varying(params, "data"))
    updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    return optax.apply_updates(params, updates), state

  step = jax.jit(
    jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")), out_specs=(P(), P()))
  )

  def global_array(a, spec):
    # Each process supplies the rows of its own devices; here every process
    # holds the whole array, as with a deterministic data loader.
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, NamedSharding(mesh, spec), lambda i: a[i])

  params = jax.tree.map(lambda a: global_array(a.astype(np.float32), P()), W0)
  state = jax.tree.map(lambda a: global_array(a, P()), tx.init(params))
  x, y = (global_array(a.astype(np.float32), P("data")) for a in (X, Y))
  for _ in range(STEPS):
    params, state = step(params, state, x, y)
  # Replicated outputs: every process can read the whole value.
  return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), (params, state[0]))


def main(process_id, port, out, method):
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}",
    num_processes=2,
    process_id=process_id,
    initialization_timeout=60,
  )
  assert jax.device_count() == 4 and jax.local_device_count() == 2
  np.savez(out, *jax.tree.leaves(train(jax.make_mesh((4,), ("data",)), method)))
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
