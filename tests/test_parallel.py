"""Data-parallel SAM: shard_map, sharded jit, groups on one device, several processes.

Every mode is checked against a per-group float64 NumPy reference: each group
(device) perturbs with its own gradient, and the perturbed gradients are
averaged (Foret et al. 2021, Section 4.1, m-sharpness).
"""

import functools
import os
import pathlib
import socket
import subprocess
import sys

import jax
import multihost_worker
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_sam import W0, X, Y, assert_close, f32, ls_grad64, ls_loss, ls_loss64, sam_grad64

import asam_jax

N = 4  # conftest.py forces 4 host devices
RHO = 0.2


def mean(trees):
  return jax.tree.map(lambda *a: np.mean(a, 0), *trees)


def msam64(w, x, y, num_groups, *, sync=False, **kwargs):
  """The reference: (mean perturbed gradient, mean perturbed loss) over equal groups."""
  xs, ys = np.split(x, num_groups), np.split(y, num_groups)
  g = mean([ls_grad64(w, a, b) for a, b in zip(xs, ys)]) if sync else None
  per_group = [sam_grad64(w, a, b, g=g, **kwargs) for a, b in zip(xs, ys)]
  return mean([d[0] for d in per_group]), np.mean([d[2] for d in per_group])


MESH = jax.make_mesh((N,), ("data",))
SHARDED = NamedSharding(MESH, P("data"))
XS, YS = jax.device_put(f32(X), SHARDED), jax.device_put(f32(Y), SHARDED)


def shard_map_update(tx, *, naive=False, check_vma=True):
  """tx.update under shard_map, params replicated, batch sharded over "data"."""

  def update(params, x, y):
    loss_fn = lambda p: ls_loss(p, x, y)
    grad_params = params if naive else asam_jax.to_varying(params, "data")
    return tx.update(jax.grad(loss_fn)(grad_params), tx.init(params), params, loss_fn=loss_fn)

  return jax.jit(
    jax.shard_map(
      update,
      mesh=MESH,
      in_specs=(P(), P("data"), P("data")),
      out_specs=P(),
      check_vma=check_vma,
    )
  )


# --- shard_map -------------------------------------------------------------------


@pytest.mark.parametrize("sync", [False, True])
def test_shard_map_matches_reference_and_pmap(sync):
  tx = asam_jax.sam(rho=RHO, axis_name="data", sync_perturbation=sync)
  grads, state = shard_map_update(tx)(f32(W0), XS, YS)
  want, perturbed_loss = msam64(W0, X, Y, N, sync=sync, rho=RHO)
  assert_close(grads, want)
  np.testing.assert_allclose(state.perturbed_loss, perturbed_loss, rtol=1e-5)
  np.testing.assert_allclose(state.perturbation_norm, RHO, rtol=1e-5)

  @functools.partial(jax.pmap, axis_name="data", in_axes=(None, 0, 0))
  def pmap_update(params, x, y):
    loss_fn = lambda p: ls_loss(p, x, y)
    return tx.update(jax.grad(loss_fn)(params), tx.init(params), params, loss_fn=loss_fn)

  pmap_grads, _ = pmap_update(f32(W0), X.reshape(N, -1, 5), Y.reshape(N, -1, 3))
  assert_close(grads, jax.tree.map(lambda a: np.asarray(a[0], np.float64), pmap_grads), rtol=1e-6)
  if not sync:  # mSAM is not global SAM on the same data
    assert not np.allclose(want["w"], sam_grad64(W0, X, Y, rho=RHO)[0]["w"], rtol=1e-4)


def test_shard_map_check_vma_false_gives_local_gradients():
  tx = asam_jax.sam(rho=RHO, axis_name="data")
  grads, _ = shard_map_update(tx, naive=True, check_vma=False)(f32(W0), XS, YS)
  assert_close(grads, msam64(W0, X, Y, N, rho=RHO)[0])


def test_naive_shard_map_gradient_is_summed_and_refused():
  """The trap: jax.grad w.r.t. replicated params in shard_map sums over the devices."""

  def naive_grad(params, x, y):
    return jax.grad(ls_loss)(params, x, y)

  summed = jax.jit(
    jax.shard_map(naive_grad, mesh=MESH, in_specs=(P(), P("data"), P("data")), out_specs=P())
  )(f32(W0), XS, YS)
  # The sum of the 4 devices' mean gradients: 4 times the full-batch gradient.
  assert_close(summed, jax.tree.map(lambda g: N * g, ls_grad64(W0, X, Y)))
  for sync in (False, True):
    tx = asam_jax.sam(rho=RHO, axis_name="data", sync_perturbation=sync)
    with pytest.raises(ValueError, match=r"invariant over the shard_map axis 'data'.*to_varying"):
      shard_map_update(tx, naive=True)(f32(W0), XS, YS)


# --- sharded jit: global SAM as is ---------------------------------------------------


def test_sharded_jit_is_global_sam():
  tx = optax.chain(asam_jax.sam(rho=RHO), optax.sgd(0.1))
  params = jax.device_put(f32(W0), NamedSharding(MESH, P()))

  @jax.jit
  def step(params, state, x, y):
    loss_fn = lambda p: ls_loss(p, x, y)
    updates, state = tx.update(jax.grad(loss_fn)(params), state, params, loss_fn=loss_fn)
    return optax.apply_updates(params, updates), state

  new_params, state = step(params, tx.init(params), XS, YS)
  assert XS.sharding.spec == P("data") and len(XS.sharding.device_set) == N
  g_adv, _, perturbed_loss = sam_grad64(W0, X, Y, rho=RHO)
  assert_close(new_params, jax.tree.map(lambda w, g: w - 0.1 * g, W0, g_adv))
  np.testing.assert_allclose(state[0].perturbed_loss, perturbed_loss, rtol=1e-5)


# --- any m on one device ------------------------------------------------------------


def grouped(tx, num_groups, params, x, y):
  return asam_jax.grouped_update(
    tx,
    tx.init(params),
    params,
    (x, y),
    loss_fn=lambda p, batch: ls_loss(p, *batch),
    num_groups=num_groups,
    axis_name="groups",
  )


grouped_step = jax.jit(grouped, static_argnums=(0, 1))


GROUPED_METHODS = {
  "sam": (lambda: asam_jax.sam(rho=RHO, axis_name="groups"), dict(rho=RHO)),
  "asam": (
    lambda: asam_jax.asam(rho=0.5, eta=0.01, axis_name="groups"),
    dict(rho=0.5, eta=0.01, adaptive=True),
  ),
}


@pytest.mark.parametrize("num_groups", [1, 4, 8])
@pytest.mark.parametrize("method", GROUPED_METHODS)
def test_grouped_update_matches_per_group_reference(method, num_groups):
  make, ref_kwargs = GROUPED_METHODS[method]
  updates, state, loss = grouped_step(make(), num_groups, f32(W0), X, Y)
  want, perturbed_loss = msam64(W0, X, Y, num_groups, **ref_kwargs)
  assert_close(updates, want)
  np.testing.assert_allclose(state.perturbed_loss, perturbed_loss, rtol=1e-5)
  np.testing.assert_allclose(loss, ls_loss64(W0, X, Y), rtol=1e-5)  # equal groups: the mean
  assert int(state.count) == 1


def test_grouped_update_chains_and_returns_aux():
  tx = optax.chain(asam_jax.sam(rho=RHO, axis_name="groups", has_aux=True), optax.sgd(0.1))
  loss_fn = lambda p, b: (ls_loss(p, *b), b[0].shape[0])
  updates, state, (loss, group_sizes) = asam_jax.grouped_update(
    tx,
    tx.init(f32(W0)),
    f32(W0),
    (X, Y),
    loss_fn=loss_fn,
    num_groups=4,
    axis_name="groups",
    has_aux=True,
  )
  assert_close(updates, jax.tree.map(lambda g: -0.1 * g, msam64(W0, X, Y, 4, rho=RHO)[0]))
  np.testing.assert_array_equal(group_sizes, [8, 8, 8, 8])
  np.testing.assert_allclose(loss, ls_loss64(W0, X, Y), rtol=1e-5)
  assert int(state[0].count) == 1


def test_grouped_update_per_device_under_pmap_and_shard_map():
  """4 devices x 2 groups each = 8 perturbations, as 8 groups on one device."""
  tx = asam_jax.sam(rho=RHO, axis_name=("data", "groups"))
  want = msam64(W0, X, Y, 2 * N, rho=RHO)[0]

  @functools.partial(jax.pmap, axis_name="data", in_axes=(None, 0, 0))
  def pmap_step(params, x, y):
    return grouped(tx, 2, params, x, y)[0]

  grads = pmap_step(f32(W0), X.reshape(N, -1, 5), Y.reshape(N, -1, 3))
  assert_close(jax.tree.map(lambda a: a[0], grads), want)

  # jax 0.10.2 cannot type vmap collectives under shard_map's check_vma (an
  # AssertionError inside jax), so groups per device need check_vma=False,
  # where the plain gradient is the local one.
  grads = jax.jit(
    jax.shard_map(
      lambda params, x, y: grouped(tx, 2, params, x, y)[0],
      mesh=MESH,
      in_specs=(P(), P("data"), P("data")),
      out_specs=P(),
      check_vma=False,
    )
  )(f32(W0), XS, YS)
  assert_close(grads, want)
  with pytest.raises(ValueError, match="needs check_vma=False"):
    jax.shard_map(
      lambda params, x, y: grouped(tx, 2, params, x, y)[0],
      mesh=MESH,
      in_specs=(P(), P("data"), P("data")),
      out_specs=P(),
    )(f32(W0), XS, YS)


def test_grouped_update_bad_calls_say_how_to_fix():
  with pytest.raises(ValueError, match=r"Build sam/asam with axis_name='groups'"):
    grouped_step(asam_jax.sam(rho=RHO), 4, f32(W0), X, Y)
  with pytest.raises(ValueError, match="multiple of num_groups"):
    asam_jax.split_batch((X, Y), 5)
  with pytest.raises(ValueError, match="multiple of num_groups"):
    asam_jax.split_batch((X, Y[:16]), 4)
  with pytest.raises(ValueError, match="positive int"):
    asam_jax.split_batch((X, Y), 0)


# --- several processes ---------------------------------------------------------------------


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_the_single_process_run(tmp_path):
  """2 processes x 2 CPU devices, gloo collectives, equal the 4-device run here."""
  worker = pathlib.Path(multihost_worker.__file__)
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=2",
    NPROC="4",  # spare CPU launch threads, see conftest.py
    PYTHONPATH=os.pathsep.join([str(worker.parent), os.environ.get("PYTHONPATH", "")]),
  )
  port = free_port()
  outs = [tmp_path / f"process{i}.npz" for i in range(2)]
  procs = []
  try:
    for i, out in enumerate(outs):
      procs.append(
        subprocess.Popen(
          [sys.executable, str(worker), str(i), str(port), str(out)],
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
        )
      )
    for proc in procs:
      log, _ = proc.communicate(timeout=120)
      assert proc.returncode == 0, log[-3000:]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()

  params, state = multihost_worker.train(MESH)
  w = W0
  for _ in range(multihost_worker.STEPS):  # the float64 mSAM trajectory
    g, perturbed_loss = msam64(w, X, Y, N, rho=multihost_worker.RHO)
    w = jax.tree.map(lambda a, b: a - multihost_worker.LR * b, w, g)
  assert_close(params, w)
  np.testing.assert_allclose(state.perturbed_loss, perturbed_loss, rtol=1e-5)
  for out in outs:
    got = np.load(out)
    for name in ("b", "w"):
      np.testing.assert_allclose(got[name], params[name], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["perturbed_loss"], state.perturbed_loss, rtol=1e-6)
    np.testing.assert_allclose(got["perturbation_norm"], state.perturbation_norm, rtol=1e-6)


# --- the example ---------------------------------------------------------------------------


def test_data_parallel_example_runs_and_its_modes_agree():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the script sets its own
  result = subprocess.run(
    [sys.executable, "-m", "asam_jax.examples.data_parallel", "--steps", "3", "--batch-size", "32"],
    env=env,
    capture_output=True,
    text=True,
    timeout=180,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  assert lines[0].startswith("4 cpu devices, m = 8 examples"), lines[0]
  assert sum("test accuracy" in line for line in lines) == 4, result.stdout
  diffs = [float(line.rsplit(": ", 1)[1]) for line in lines if "weights difference" in line]
  assert len(diffs) == 2 and max(diffs) < 1e-5, result.stdout
