"""Data-parallel mSAM: the same training with pmap, shard_map and groups on one device.

Run it from a checkout with ``python notebooks/data_parallel.py`` (``--help`` for
the options). On a machine without accelerators it asks XLA for 4 CPU devices.

Each step splits the batch over the devices; each device perturbs the weights
with its own gradient (m-sharpness, m = batch / devices) and the perturbed
gradients are averaged. The pmap and shard_map runs, and a one-device run
with :func:`asam_jax.grouped_update` and as many groups as devices, compute the
same thing and end with the same weights; global SAM, which perturbs with the
whole batch's gradient, is shown for comparison.
"""

import os

if __name__ == "__main__" and "xla_force_host_platform_device_count" not in os.environ.get(
  "XLA_FLAGS", ""
):
  # Must precede the jax import. The flag only adds CPU devices, so it is
  # harmless where an accelerator is the default backend.
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
  ).strip()
  # Spare launch threads for XLA's CPU client: with only as many threads as
  # devices (machines with <= 4 cores) collectives can intermittently deadlock.
  os.environ.setdefault("NPROC", "8")

import argparse
import functools
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import asam_jax


def spirals(rng, n, noise=0.08):
  """Two interleaved noisy spirals, a small task an MLP can overfit."""
  t = rng.uniform(size=n) * 3 * np.pi
  labels = np.arange(n) % 2
  r = t / (3 * np.pi) + 0.1
  angle = t + np.pi * labels
  x = np.stack([r * np.cos(angle), r * np.sin(angle)], 1) + noise * rng.normal(size=(n, 2))
  return x.astype(np.float32), labels.astype(np.int32)


def init_mlp(rng, sizes=(2, 64, 64, 2)):
  # On the host with NumPy: eager jax ops would each compile on first use.
  return [
    {
      "w": (rng.normal(size=(m, n)) * np.sqrt(2.0 / m)).astype(np.float32),
      "b": np.zeros(n, np.float32),
    }
    for m, n in itertools.pairwise(sizes)
  ]


def apply_mlp(params, x):
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  return x @ params[-1]["w"] + params[-1]["b"]


def loss(params, batch):
  x, labels = batch
  return optax.softmax_cross_entropy_with_integer_labels(apply_mlp(params, x), labels).mean()


def make_optimizer(rho, lr, axis_name, sync=False):
  # SAM first, so that momentum sees the averaged perturbed gradient.
  return optax.chain(
    asam_jax.sam(rho=rho, axis_name=axis_name, sync_perturbation=sync),
    optax.sgd(lr, momentum=0.9),
  )


def train_pmap(params, batches, rho, lr, n):
  tx = make_optimizer(rho, lr, "devices")

  @functools.partial(jax.pmap, axis_name="devices")
  def step(params, state, batch):
    loss_fn = lambda p: loss(p, batch)
    # pmap does not track replication, so this is each device's own gradient.
    grads = jax.grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    return optax.apply_updates(params, updates), state

  # pmap's classic layout: one copy of params and state per device, which
  # stay equal because update averages over the devices.
  replicate = lambda tree: jax.tree.map(lambda a: np.broadcast_to(a, (n, *np.shape(a))), tree)
  params, state = replicate(params), replicate(tx.init(params))
  for batch in batches:
    params, state = step(
      params, state, jax.tree.map(lambda a: a.reshape(n, -1, *a.shape[1:]), batch)
    )
  return jax.tree.map(lambda a: a[0], params)


def train_shard_map(params, batches, rho, lr, n, sync=False):
  mesh = jax.make_mesh((n,), ("data",))
  tx = make_optimizer(rho, lr, "data", sync)

  def step(params, state, batch):
    loss_fn = lambda p: loss(p, batch)
    # Without to_varying, jax.grad would return the gradient summed over the
    # devices, and update would refuse it.
    grads = jax.grad(loss_fn)(asam_jax.to_varying(params, "data"))
    updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    return optax.apply_updates(params, updates), state

  step = jax.jit(
    jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=(P(), P()))
  )
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  params = jax.device_put(params, replicated)
  state = jax.device_put(tx.init(params), replicated)
  for batch in batches:
    params, state = step(params, state, jax.device_put(batch, sharded))
  return params


def train_grouped(params, batches, rho, lr, num_groups):
  tx = make_optimizer(rho, lr, "groups")

  @jax.jit
  def step(params, state, batch):
    updates, state, _ = asam_jax.grouped_update(
      tx, state, params, batch, loss_fn=loss, num_groups=num_groups, axis_name="groups"
    )
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for batch in batches:
    params, state = step(params, state, batch)
  return params


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--rho", type=float, default=0.05)
  parser.add_argument("--lr", type=float, default=0.1)
  args = parser.parse_args(argv)
  n = jax.device_count()
  if args.batch_size % n:
    parser.error(f"--batch-size must be a multiple of the {n} devices")
  print(
    f"{n} {jax.devices()[0].platform} devices, m = {args.batch_size // n} examples per perturbation"
  )

  rng = np.random.default_rng(0)
  x_train, y_train = spirals(rng, 1024)
  x_test, y_test = spirals(rng, 4096)
  params = init_mlp(rng)
  # Sampled and sliced on the host, as a data loader would hand them over.
  batches = [
    (x_train[i], y_train[i]) for i in rng.integers(0, len(x_train), (args.steps, args.batch_size))
  ]

  runs = {
    "mSAM, pmap": lambda: train_pmap(params, batches, args.rho, args.lr, n),
    "mSAM, shard_map": lambda: train_shard_map(params, batches, args.rho, args.lr, n),
    f"mSAM, 1 device, {n} groups": lambda: train_grouped(params, batches, args.rho, args.lr, n),
    "global SAM, shard_map": lambda: train_shard_map(
      params, batches, args.rho, args.lr, n, sync=True
    ),
  }

  @jax.jit
  def evaluate(params):
    accuracy = jnp.mean(jnp.argmax(apply_mlp(params, x_test), -1) == y_test)
    return loss(params, (x_train, y_train)), accuracy

  results = {}
  for name, run in runs.items():
    start = time.perf_counter()
    # On the host, so that one compiled evaluate serves every run's layout.
    results[name] = jax.device_get(run())
    train_loss, accuracy = evaluate(results[name])
    print(
      f"{name:28s} train loss {float(train_loss):.4f}  test accuracy {float(accuracy):.3f}  "
      f"({time.perf_counter() - start:.1f} s)"
    )
  reference = jax.tree.leaves(results["mSAM, pmap"])
  for name in list(runs)[1:3]:
    diff = max(
      float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(results[name]), reference)
    )
    print(f"max |weights difference|, {name} vs pmap: {diff:.2e}")


if __name__ == "__main__":
  main()
