"""Where an update runs (asam_jax/_layout.py): sharded params, and the layouts that are refused.

Params sharded by ``NamedSharding`` under ``jax.jit`` (jax's explicit mesh), or
varying over a ``shard_map`` axis (FSDP, tensor parallelism), give global SAM:
the same step as one device with the full weights and the whole batch. A
data-parallel axis next to a sharding axis gives mSAM per data group. Layouts
the library cannot read, or that cannot mean what was asked, are refused with
a message that says what to change.
"""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
  LR,
  METHODS,
  RHO,
  STEPS,
  assert_close,
  f32,
  host,
  ls_loss,
  msam64,
  scan_steps,
  tiered,
)
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import asam_jax

# A least-squares problem whose kernel splits evenly over 2 and 4 devices.
RNG = np.random.default_rng(1)
KX = RNG.normal(size=(16, 8))
KY = RNG.normal(size=(16, 4))
KW = {"b": RNG.normal(size=4), "w": RNG.normal(size=(8, 4))}

TXS = {
  name: METHODS[name].chain()
  for name in ("sam", "asam", "gsam", "looksam", "random_sam", "momentum_sam")
}
# optax's own SAM, as its documentation builds it.
OPTAX_SAM = optax.contrib.sam(
  optax.sgd(LR), optax.chain(optax.contrib.normalize(), optax.sgd(RHO)), opaque_mode=True
)


def step_of(tx):
  """A training step of ``tx`` on the least-squares loss (``grad_fn`` for optax's SAM)."""

  def step(params, state, x, y):
    loss_fn = lambda p: ls_loss(p, x, y)
    grads = jax.grad(loss_fn)(params)
    if tx is OPTAX_SAM:
      updates, state = tx.update(grads, state, params, grad_fn=lambda p, _: jax.grad(loss_fn)(p))
    else:
      updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    return optax.apply_updates(params, updates), state

  return step


@functools.cache
def one_device(method):
  """STEPS steps of ``TXS[method]`` on one device, the full weights and the whole batch."""
  tx = TXS[method]
  step = jax.jit(step_of(tx))
  params, state = f32(KW), tx.init(f32(KW))
  for _ in range(STEPS):
    params, state = step(params, state, f32(KX), f32(KY))
  return host((params, state))


# --- sharded jit: jax's explicit mesh, no axis_name ---------------------------------

MESH = jax.make_mesh((2, 2), ("a", "b"))
_GATHER = re.compile(r"=\s*\w+\[([\d,]*)\]\S*\s+all-gather(?:-start)?\(")


def full_gathers(hlo_text, shape):
  """How many all-gathers in compiled HLO text produce an array of the full ``shape``."""
  shapes = [tuple(int(d) for d in m.group(1).split(",") if d) for m in _GATHER.finditer(hlo_text)]
  return shapes.count(tuple(shape))


def put(tree, specs, mesh=MESH):
  """``tree`` in float32, sharded by ``specs`` on ``mesh`` (explicit: shard_map checks it)."""
  return jax.tree.map(lambda a, s: jax.device_put(f32(a), NamedSharding(mesh, s)), tree, specs)


def same_sharding(a, spec):
  return a.sharding.is_equivalent_to(NamedSharding(MESH, spec), a.ndim)


def test_the_mesh_is_explicit():
  assert set(MESH.axis_types) == {jax.sharding.AxisType.Explicit}


# (kernel, batch, methods): every transformation with the kernel sharded over both axes,
# each over one axis alone, and the batch over one axis with the kernel over the other
# (data and tensor parallelism at once).
SHARDED_CASES = [
  (P("a", "b"), P(), tuple(TXS)),
  (P("a", None), P(), ("sam", "looksam", "momentum_sam")),
  (P(None, "b"), P(), ("asam", "gsam", "random_sam")),
  (P(None, "b"), P("a"), ("sam", "looksam")),
]


@pytest.mark.parametrize(
  "kernel, batch, methods",
  # the second case keeps sharded jit in the fast tier; the others are slow
  tiered(SHARDED_CASES, SHARDED_CASES[1:2]),
  ids=[f"{c[0]}-batch{c[1]}" for c in SHARDED_CASES],
)
def test_sharded_jit_is_one_device_keeps_the_sharding_and_gathers_no_more_than_optax(
  kernel, batch, methods
):
  """The kernel and the batch sharded as given, the bias replicated, no axis_name.

  Equal to one device after 3 steps; params and the kernel-shaped state keep the
  kernel's sharding; and the compiled step all-gathers the full kernel no more
  often than optax.contrib.sam's on the same layout.
  """
  params = put(KW, {"b": P(), "w": kernel})
  x, y = put((KX, KY), (batch, batch))
  gathers = {}
  for name, tx in [("optax", OPTAX_SAM), *((m, TXS[m]) for m in methods)]:
    state = tx.init(params)
    step = jax.jit(step_of(tx)).lower(params, state, x, y).compile()
    gathers[name] = full_gathers(step.as_text(), KW["w"].shape)
    if name == "optax":
      continue
    p, s = params, state
    for _ in range(STEPS):
      p, s = step(p, s, x, y)
    assert same_sharding(p["w"], kernel) and same_sharding(p["b"], P()), name
    kernels = [a for a in jax.tree.leaves(s) if a.shape == KW["w"].shape]
    assert len(kernels) == {"looksam": 1, "momentum_sam": 1}.get(name, 0)
    assert all(same_sharding(a, kernel) for a in kernels), name
    chex.assert_trees_all_close(host((p, s)), one_device(name), rtol=1e-5, atol=2e-6)
    assert gathers[name] <= gathers["optax"], gathers
  if kernel == P("a", None):  # both forward passes gather the kernel: the count sees them
    assert gathers["optax"] >= 2, gathers


@pytest.mark.slow
def test_sharpness_under_sharded_jit_is_one_device():
  @jax.jit
  def sharpnesses(key, params, x, y):
    loss_fn = lambda p: ls_loss(p, x, y)
    return (
      asam_jax.sharpness(loss_fn, params, rho=0.5, adaptive=True, eta=0.01, steps=2),
      asam_jax.average_sharpness(loss_fn, params, key, rho=RHO, samples=2),
    )

  key = jax.random.key(5)
  want = sharpnesses(key, f32(KW), f32(KX), f32(KY))
  assert min(want) > 0
  got = sharpnesses(key, put(KW, {"b": P(), "w": P("a", "b")}), *put((KX, KY), (P(), P())))
  # differences of losses near 2: float32 rounding of the losses
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# --- FSDP inside shard_map: params varying over the axis are sharded -----------------

MESH_D = jax.make_mesh((4,), ("d",))
FSDP_SPECS = {"b": P(), "w": P("d")}  # the kernel's rows over 4 devices, the bias replicated


def fsdp_loss(params, x, y):
  """The user's FSDP loss: gather the kernel, the mean over the batch shards."""
  w = jax.lax.all_gather(params["w"], "d", axis=0, tiled=True)
  return jax.lax.pmean(ls_loss({"b": params["b"], "w": w}, x, y), "d")


def fsdp_train(tx):
  """STEPS steps of ``tx`` under shard_map over "d", batch and kernel sharded, state alike."""

  def train(params, x, y):
    # the gradient as jax gives it: the kernel's shard, the bias's over the whole batch
    return scan_steps(tx, params, lambda p: fsdp_loss(p, x, y), STEPS)[0]

  state_specs = jax.tree.map(
    lambda a: P("d") if a.shape == KW["w"].shape else P(), jax.eval_shape(tx.init, f32(KW))
  )
  specs = (FSDP_SPECS, state_specs)
  return jax.jit(
    jax.shard_map(train, mesh=MESH_D, in_specs=(FSDP_SPECS, P("d"), P("d")), out_specs=specs)
  )


@pytest.mark.parametrize("method", ["sam", "asam", "gsam", "looksam", "momentum_sam"])
def test_fsdp_is_global_sam_equal_to_one_device(method):
  got = fsdp_train(TXS[method])(*put((KW, KX, KY), (FSDP_SPECS, P("d"), P("d")), MESH_D))
  chex.assert_trees_all_close(host(got), one_device(method), rtol=1e-5, atol=1e-6)


def test_fsdp_random_sam_draws_on_the_global_sphere():
  """Each kernel shard draws its own numbers, and eps is uniform on the whole rho-sphere.

  The loss 0.5 ||w - c||^2 has the gradient w + eps - c at w + eps, so the update
  reveals eps.
  """
  c = {"b": np.linspace(-1, 1, 4), "w": np.linspace(-2, 2, 32).reshape(8, 4)}
  tx = asam_jax.random_sam(jax.random.key(0), rho=RHO)

  def update(params, c):
    loss_fn = lambda p: jax.lax.pmean(
      0.5 * jnp.sum((p["b"] - c["b"]) ** 2)
      + 0.5 * jnp.sum(jax.lax.all_gather(p["w"] - c["w"], "d", axis=0, tiled=True) ** 2),
      "d",
    )
    return tx.update(params, tx.init(params), params, loss_fn=loss_fn)

  grads, state = jax.jit(
    jax.shard_map(
      update, mesh=MESH_D, in_specs=(FSDP_SPECS, FSDP_SPECS), out_specs=(FSDP_SPECS, P())
    )
  )(*put((KW, c), (FSDP_SPECS, FSDP_SPECS), MESH_D))
  eps = {k: np.float64(grads[k]) - (KW[k] - c[k]) for k in KW}
  np.testing.assert_allclose(np.sqrt(sum(np.sum(e**2) for e in eps.values())), RHO, rtol=1e-4)
  assert np.abs(eps["b"]).min() > 0
  shards = np.split(eps["w"], 4)
  assert all(not np.allclose(shards[0], other) for other in shards[1:])
  np.testing.assert_allclose(state.perturbation_norm, RHO, rtol=1e-6)
  want_loss = sum(0.5 * np.sum((KW[k] + eps[k] - c[k]) ** 2) for k in KW)
  np.testing.assert_allclose(state.perturbed_loss, want_loss, rtol=1e-5)


# --- tensor parallel over "model", mSAM over "data" ------------------------------------

MESH_DM = jax.make_mesh((2, 2), ("data", "model"))
TP_SPECS = {"b": P(), "w": P(None, "model")}  # the kernel's output columns over "model"
TP_TXS = [
  asam_jax.sam(RHO, axis_name="data"),
  asam_jax.asam(0.5, eta=0.01, axis_name="data"),
  asam_jax.sam(RHO, axis_name="data", sync_perturbation=True),
]


def test_tensor_parallel_with_msam_over_data_is_per_data_group():
  """Each data group (2 devices holding the kernel's halves) perturbs with its own full gradient."""

  def updates(params, x, y):
    loss_fn = lambda p: jax.lax.pmean(
      ls_loss({"b": p["b"], "w": jax.lax.all_gather(p["w"], "model", axis=1, tiled=True)}, x, y),
      "model",
    )
    grads = jax.grad(loss_fn)(asam_jax.to_varying(params, "data"))
    return [tx.update(grads, tx.init(params), params, loss_fn=loss_fn) for tx in TP_TXS]

  out = jax.jit(
    jax.shard_map(
      updates,
      mesh=MESH_DM,
      in_specs=(TP_SPECS, P("data"), P("data")),
      out_specs=[(TP_SPECS, P())] * len(TP_TXS),
    )
  )(*put((KW, KX, KY), (TP_SPECS, P("data"), P("data")), MESH_DM))
  want = [
    msam64(KW, KX, KY, 2, rho=RHO),
    msam64(KW, KX, KY, 2, rho=0.5, eta=0.01, adaptive=True),
    msam64(KW, KX, KY, 2, rho=RHO, sync=True),  # = global SAM
  ]
  for (grads, state), (want_grads, want_loss) in zip(out, want):
    assert_close(grads, want_grads)
    np.testing.assert_allclose(state.perturbed_loss, want_loss, rtol=1e-5)
  assert not np.allclose(want[0][0]["w"], want[2][0]["w"], rtol=1e-4, atol=0)


# --- refusals, each saying what to change -----------------------------------------------


def update_fn(tx, loss, local=None):
  """``params, *batch -> tx.update`` from a fresh state, the gradient taken at ``local(params)``."""

  def update(params, *batch):
    loss_fn = lambda p: loss(p, *batch)
    grads = jax.grad(loss_fn)(local(params) if local else params)
    return tx.update(grads, tx.init(params), params, loss_fn=loss_fn)

  return update


@pytest.mark.parametrize("method", METHODS)
def test_an_unbound_axis_name_is_refused_saying_where_to_call_update(method):
  update = update_fn(METHODS[method].chain(axis_name="data"), ls_loss)
  with pytest.raises(
    ValueError,
    match=r"not running under an axis of that name.*jax\.pmap\(\.\.\., axis_name='data'\), "
    r"jax\.shard_map over a mesh with an axis 'data', or jax\.vmap.*build without axis_name",
  ):
    jax.eval_shape(jax.jit(update), f32(KW), f32(KX), f32(KY))


@pytest.mark.parametrize("method", METHODS)
def test_a_device_axis_left_unnamed_is_refused_saying_to_name_it(method):
  """Under pmap, or shard_map(check_vma=False), replicated and sharded params look alike."""
  update = update_fn(METHODS[method].chain(), ls_loss)
  match = (
    r"inside pmap or shard_map\(check_vma=False\) over the axes \('data',\), which axis_name "
    r"does not name.*build with axis_name='data'.*check_vma=True"
  )
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(
      jax.pmap(update, axis_name="data", in_axes=(None, 0, 0)),
      f32(KW),
      KX.reshape(4, -1, 8),
      KY.reshape(4, -1, 4),
    )
  mesh = jax.make_mesh((4,), ("data",))
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(
      jax.shard_map(
        update,
        mesh=mesh,
        in_specs=(P(), P("data"), P("data")),
        out_specs=P(),
        check_vma=False,
      ),
      *put((KW, KX, KY), ({"b": P(), "w": P()}, P("data"), P("data")), mesh),
    )


@pytest.mark.parametrize("method", METHODS)
def test_naming_a_sharding_axis_is_refused_saying_to_drop_it(method):
  update = update_fn(METHODS[method].chain(axis_name="d"), fsdp_loss)
  with pytest.raises(
    ValueError,
    match=r"params leaf \['w'\] varies over the shard_map axis 'd'.*If the params are replicated, "
    r"give update\(\) the params as they are.*mSAM is impossible over that axis: drop 'd' from "
    r"axis_name",
  ):
    jax.eval_shape(
      jax.shard_map(
        update, mesh=MESH_D, in_specs=(FSDP_SPECS, P("d"), P("d")), out_specs=(FSDP_SPECS, P())
      ),
      *put((KW, KX, KY), (FSDP_SPECS, P("d"), P("d")), MESH_D),
    )


@pytest.mark.parametrize("method", ["gsam", "looksam", "random_sam"])
def test_sync_perturbation_without_axis_name_is_refused(method):
  with pytest.raises(ValueError, match=r"sync_perturbation=True .* needs axis_name"):
    METHODS[method].build(sync_perturbation=True)


def test_alternating_with_msam_is_refused_saying_to_sync():
  with pytest.raises(
    ValueError,
    match=r"cannot perturb each device with its own gradient \(mSAM\)\. Build tx with "
    r"sync_perturbation=True",
  ):
    asam_jax.alternating(asam_jax.sam(RHO, axis_name="data"), optax.sgd(LR))
