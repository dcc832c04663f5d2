"""Data-parallel SAM and its variants: pmap, shard_map, sharded jit, groups, several processes.

Every mode is checked against a per-group float64 NumPy reference: each group
(device) perturbs with its own gradient, and the perturbed gradients are
averaged (Foret et al. 2021, Section 4.1, m-sharpness); with
``sync_perturbation`` against one device with the whole batch. The variants'
references are their papers' update rules applied per device (GSAM, LookSAM),
the same keys drawn on one device (random SAM), and the Momentum-SAM authors'
update rule on the averaged gradient.
"""

import functools
import os
import pathlib
import socket
import subprocess
import sys

import chex
import jax
import multihost_worker
import numpy as np
import optax
import pytest
import reference
from helpers import (
  LR,
  METHODS,
  RHO,
  STEPS,
  W0,
  W0_FLAT,
  WITH_REFERENCE,
  X,
  Y,
  assert_close,
  f32,
  flat,
  host,
  ls_grad64,
  ls_loss,
  ls_loss64,
  mean,
  msam64,
  sam_grad64,
  scan_steps,
  tiered,
  unflat,
)
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from peers import msam as msam_port

import asam_jax

N = 4  # conftest.py forces 4 host devices


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
  txs = [asam_jax.sam(rho=RHO, axis_name="data", sync_perturbation=s) for s in (False, True)]
  txs += [asam_jax.asam(rho=0.5, axis_name="data")]
  # the variants that read the incoming gradient (random_sam only takes its structure)
  txs += [variant(m, "data") for m in ("gsam", "looksam", "momentum_sam", "momentum_sam_adamw")]
  txs += [variant("looksam", "data", sync=True), variant("alternating", "data", sync=True)]
  for tx in txs:
    with pytest.raises(
      ValueError,
      match=r"invariant over the shard_map axis 'data'.*grads = "
      r"jax\.grad\(loss_fn\)\(asam_jax\.to_varying\(params, 'data'\)\)",
    ):
      shard_map_update(tx, naive=True)(f32(W0), XS, YS)


# --- the variants, per device ----------------------------------------------------------

# The references below read the hyperparameters the registry builds with.
ALPHA_GSAM = METHODS["gsam"].kwargs["alpha"]
K, ALPHA_LOOK = METHODS["looksam"].kwargs["k"], METHODS["looksam"].kwargs["alpha"]
RANDOM_KEY = METHODS["random_sam"].kwargs["key"]
ADAMW = METHODS["momentum_sam_adamw"].kwargs


def variant(method, axis_name, sync=False):
  """``method`` with ``axis_name``, chained with SGD unless it is an optimizer itself.

  Every result is an ``optax.chain``, so every ``update`` takes (or ignores) ``loss_fn``.
  """
  dp = dict(axis_name=axis_name, **({"sync_perturbation": True} if sync else {}))
  if method == "alternating":
    # closure-free: 2 calls (ascent, descent) per SAM step; with axis_name only in sync mode
    return optax.chain(asam_jax.alternating(METHODS["sam"].build(**dp), optax.sgd(LR)))
  return METHODS[method].chain(**dp)


def calls(method):
  return 2 * STEPS if method == "alternating" else STEPS


def parts(n):
  """The batch as n equal groups of consecutive examples, as n devices hold it."""
  return list(zip(np.split(X, n), np.split(Y, n)))


def grad64(v, part):
  return flat(ls_grad64(unflat(v), *part))


def loss64(v, part):
  return ls_loss64(unflat(v), *part)


def ascents64(v, groups, sync, perturb=None):
  """``(g, g_p, L(w + eps))`` per perturbation: one per group, or one from the mean ``g`` (sync).

  ``g_p`` is the gradient at ``w + eps`` of the group's own data (with sync, of the whole
  batch: the groups' mean), with ``eps = perturb(g)``, by default rho g / ||g|| (Foret et al.,
  eq. 2).
  """
  perturb = perturb or (lambda g: reference.perturbation([g], [v], rho=RHO)[0])
  gs = [grad64(v, part) for part in groups]
  if sync:
    g = np.mean(gs, 0)
    e = perturb(g)
    at = [(grad64(v + e, part), loss64(v + e, part)) for part in groups]
    return [(g, np.mean([a[0] for a in at], 0), np.mean([a[1] for a in at]))]
  out = []
  for g, part in zip(gs, groups):
    e = perturb(g)
    out.append((g, grad64(v + e, part), loss64(v + e, part)))
  return out


def descent64(perturb_at, n, sync, steps=STEPS):
  """SGD on the mean of the groups' g_p, ``perturb_at(t, v)`` giving step t's ``g -> eps``."""
  v = W0_FLAT
  for t in range(steps):
    found = ascents64(v, parts(n), sync, perturb_at(t, v))
    v = v - LR * np.mean([g_p for _, g_p, _ in found], 0)
  return dict(params=unflat(v), perturbed_loss=np.mean([f[2] for f in found]))


def fisher_trajectory64(n, sync):
  """Each group's ball is its own Fisher's, T = (1 + eta g^2)^-1/2 (Kim et al., eq. 5)."""
  eta = METHODS["fisher_sam"].kwargs["eta"]
  return descent64(
    lambda t, v: (
      lambda g: reference.perturbation([g], [v], rho=RHO, t=reference.fisher_t([g], eta))[0]
    ),
    n,
    sync,
  )


def friendly_trajectory64(n, sync):
  """Li et al.'s code per group: d = g - sigma m (SAM first), m the running mean of the mean g."""
  kw = METHODS["friendly_sam"].kwargs
  v, m = W0_FLAT, None
  for _ in range(STEPS):
    mean_g = np.mean([grad64(v, part) for part in parts(n)], 0)
    prev = m
    perturb = lambda g, prev=prev, v=v: reference.perturbation(
      [g if prev is None else g - kw["sigma"] * prev], [v], rho=RHO
    )[0]
    found = ascents64(v, parts(n), sync, perturb)
    m = mean_g if m is None else kw["lmbda"] * m + (1 - kw["lmbda"]) * mean_g
    v = v - LR * np.mean([g_p for _, g_p, _ in found], 0)
  return dict(params=unflat(v), perturbed_loss=np.mean([f[2] for f in found]), momentum=unflat(m))


def esam_trajectory64(n, sync):
  """Du et al.'s SWP per group, the drawn leaves the same on every device: (rho / beta) m g / ||m g||."""
  kw = METHODS["esam"].kwargs
  key, masks = kw["key"], []
  for _ in range(STEPS):
    key, draw = jax.random.split(key)
    drawn = np.asarray(jax.random.bernoulli(draw, kw["beta"], (2,)))
    masks.append(np.concatenate([np.full(3, drawn[0]), np.full(15, drawn[1])]).astype(float))
  want = descent64(
    lambda t, v: lambda g: reference.perturbation([g * masks[t]], [v], rho=RHO / kw["beta"])[0],
    n,
    sync,
  )
  return dict(want, norm=RHO / kw["beta"] if masks[-1].any() else 0.0)


def gsam_trajectory64(n, sync):
  """Zhuang et al.'s Algorithm 1 per group, averaged: d = g_p - alpha g_perp with
  g_perp = g - (<g, g_p> / ||g_p||^2) g_p."""
  v = W0_FLAT
  for _ in range(STEPS):
    found = ascents64(v, parts(n), sync)
    d = np.mean([g_p - ALPHA_GSAM * (g - (g @ g_p) / (g_p @ g_p) * g_p) for g, g_p, _ in found], 0)
    v = v - LR * d
  return dict(params=unflat(v), perturbed_loss=np.mean([f[2] for f in found]))


def orthogonal64(g, g_s):
  """g_v = g_s - ||g_s|| cos(theta) g / ||g||, theta the angle between g and g_s."""
  cos = g @ g_s / (np.linalg.norm(g) * np.linalg.norm(g_s))
  return g_s - np.linalg.norm(g_s) * cos * g / np.linalg.norm(g)


def looksam_trajectory64(n, sync):
  """Liu et al.'s Algorithm 1 per group.

  Every k-th step each group's g_s and g_v (orthogonal64), both averaged over the groups; in
  between each group's g + alpha (||g|| / ||g_v||) g_v, averaged. With sync, one group: the
  mean g and the whole batch's g_s.
  """
  v, g_v = W0_FLAT, np.zeros_like(W0_FLAT)
  for t in range(STEPS):
    if t % K == 0:
      found = ascents64(v, parts(n), sync)
      d = np.mean([g_s for _, g_s, _ in found], 0)
      g_v = np.mean([orthogonal64(g, g_s) for g, g_s, _ in found], 0)
      perturbed_loss = np.mean([f[2] for f in found])
    else:
      gs = [grad64(v, part) for part in parts(n)]
      gs = [np.mean(gs, 0)] if sync else gs
      d = np.mean([g + ALPHA_LOOK * np.linalg.norm(g) / np.linalg.norm(g_v) * g_v for g in gs], 0)
    v = v - LR * d
  return dict(params=unflat(v), perturbed_loss=perturbed_loss, orthogonal=unflat(g_v))


@functools.cache
def random_draws():
  """Each step's eps, drawn on one device: first the one every device draws with sync, from
  split(key)[1], then device i's, from fold_in(split(key)[1], i); and the last key."""
  draw_eps = jax.jit(lambda k: asam_jax.random_perturbation(k, f32(W0), rho=RHO))
  key, eps = RANDOM_KEY, []
  for _ in range(STEPS):
    key, draw = jax.random.split(key)
    keys = [draw, *(jax.random.fold_in(draw, i) for i in range(N))]
    eps.append([flat(draw_eps(k)) for k in keys])
  return eps, jax.random.key_data(key)


def random_sam_trajectory64(n, sync):
  """Each device's gradient at w + its own eps (the same eps with sync), averaged."""
  assert n == N
  v = W0_FLAT
  draws, key = random_draws()
  for eps in draws:
    eps = [eps[0]] * n if sync else eps[1:]
    at = [(grad64(v + e, part), loss64(v + e, part)) for e, part in zip(eps, parts(n))]
    v = v - LR * np.mean([a[0] for a in at], 0)
  return dict(params=unflat(v), perturbed_loss=np.mean([a[1] for a in at]), key=key)


def momentum_trajectory64(n, adamw):
  """The Momentum-SAM authors' MSAM / AdamW_MSAM (float64 ports) on the groups' mean gradient."""
  w = {"b": W0["b"], "w": W0["w"]}
  state = msam_port.adamw_msam_init(w) if adamw else msam_port.msam_init(w)
  for _ in range(STEPS):
    g = mean([ls_grad64(w, *part) for part in parts(n)])
    if adamw:
      kw = dict(betas=(ADAMW["b1"], ADAMW["b2"]), eps=ADAMW["eps"], lr=ADAMW["learning_rate"])
      w, state = msam_port.adamw_msam_step(
        w, g, state, weight_decay=ADAMW["weight_decay"], rho=RHO, **kw
      )
    else:
      w, state = msam_port.msam_step(w, g, state, lr=LR, momentum=0.9, weight_decay=0.0, rho=RHO)
  if adamw:
    return dict(
      params=w, momentum=state["exp_avg"], nu=state["exp_avg_sq"], scale=state["norm_factor"]
    )
  return dict(params=w, momentum=state["momentum_buffer"], scale=RHO * state["inverse_norm_buffer"])


def alternating_trajectory64(n, sync):
  """Global SAM, one step per two calls."""
  assert sync
  v = W0_FLAT
  for _ in range(STEPS):
    v = v - LR * flat(sam_grad64(unflat(v), X, Y, rho=RHO)[0])
  return dict(params=unflat(v))


@functools.cache
def trajectory64(method, n, sync=False):
  """The float64 reference of ``variant(method, ..., sync)`` on n devices (or groups)."""
  return {
    "gsam": gsam_trajectory64,
    "looksam": looksam_trajectory64,
    "random_sam": random_sam_trajectory64,
    "momentum_sam": lambda n, _: momentum_trajectory64(n, adamw=False),
    "momentum_sam_adamw": lambda n, _: momentum_trajectory64(n, adamw=True),
    "alternating": alternating_trajectory64,
    "fisher_sam": fisher_trajectory64,
    "friendly_sam": friendly_trajectory64,
    "esam": esam_trajectory64,
  }[method](n, sync)


def check_reference(method, sync, params, state, n=N):
  """One device's params and state after the run against the float64 trajectory."""
  want = trajectory64(method, n, sync)
  assert_close(params, want["params"])
  (inner, *_) = state
  if method == "looksam":
    assert_close(inner.orthogonal, want["orthogonal"])
    inner = inner.sam
  if "perturbed_loss" in want:
    np.testing.assert_allclose(inner.perturbed_loss, want["perturbed_loss"], rtol=1e-5)
    np.testing.assert_allclose(inner.perturbation_norm, want.get("norm", RHO), rtol=1e-5)
  if method == "friendly_sam":
    assert_close(inner.momentum, want["momentum"])
  if method == "random_sam":
    np.testing.assert_array_equal(inner.key, want["key"])
  if method.startswith("momentum_sam"):
    assert_close(inner.momentum, want["momentum"])
    np.testing.assert_allclose(inner.scale, want["scale"], rtol=1e-5)
    if "nu" in want:
      assert_close(inner.nu, want["nu"], atol=1e-9)
  assert int(inner.count) == calls(method)


VARIANT_CASES = [
  ("gsam", False),
  ("gsam", True),
  ("looksam", False),
  ("looksam", True),
  ("random_sam", False),
  ("random_sam", True),
  ("momentum_sam", False),
  ("momentum_sam_adamw", False),
  ("alternating", True),
  ("fisher_sam", False),
  ("fisher_sam", True),
  ("friendly_sam", False),
  ("friendly_sam", True),
  ("esam", False),
  ("esam", True),
]


@functools.cache
def pmap_run(method, sync):
  """The run under pmap, every device's params and state (looksam by its lax.cond on the count)."""
  tx = variant(method, "data", sync)

  @functools.partial(jax.pmap, axis_name="data", in_axes=(None, 0, 0))
  def train(params, x, y):
    return scan_steps(tx, params, lambda p: ls_loss(p, x, y), calls(method))[0]

  return host(train(f32(W0), X.reshape(N, -1, 5), Y.reshape(N, -1, 3)))


def device(tree, i):
  return jax.tree.map(lambda a: a[i], tree)


# The fast tier: a decomposition, a cond, an optimizer, a direction with a state.
FAST_VARIANTS = (
  ("gsam", False),
  ("looksam", True),
  ("momentum_sam", False),
  ("friendly_sam", False),
)


@pytest.mark.parametrize("method, sync", tiered(VARIANT_CASES, FAST_VARIANTS))
def test_variants_under_pmap_stay_replicated_and_match_the_reference(method, sync):
  run = pmap_run(method, sync)
  # every device's params and state, bit for bit
  chex.assert_trees_all_equal(*[device(run, i) for i in range(N)])
  check_reference(method, sync, *device(run, 0))
  if method in ("gsam", "looksam", "random_sam", "fisher_sam", "friendly_sam", "esam") and not sync:
    # the per-device reference is not the global one: the test tells the modes apart
    msam_w, global_w = (trajectory64(method, N, s)["params"]["w"] for s in (False, True))
    assert not np.allclose(msam_w, global_w, rtol=1e-4, atol=0)


@pytest.mark.parametrize("method, sync", tiered(VARIANT_CASES, FAST_VARIANTS[:2]))
def test_variants_under_shard_map_equal_pmap(method, sync):
  """Unrolled steps, looksam's branch picked by full_step=, params replicated (P())."""
  tx = variant(method, "data", sync)

  def train(params, x, y):
    loss_fn = lambda p: ls_loss(p, x, y)
    state = tx.init(params)
    for t in range(calls(method)):
      extra = {"full_step": t % K == 0} if method == "looksam" else {}
      grads = jax.grad(loss_fn)(asam_jax.to_varying(params, "data"))
      updates, state = tx.update(grads, state, params, loss_fn=loss_fn, **extra)
      params = optax.apply_updates(params, updates)
    return params, state

  run = jax.jit(
    jax.shard_map(train, mesh=MESH, in_specs=(P(), P("data"), P("data")), out_specs=P())
  )
  chex.assert_trees_all_close(
    host(run(f32(W0), XS, YS)), device(pmap_run(method, sync), 0), rtol=1e-6, atol=1e-6
  )


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


@pytest.mark.parametrize("num_groups", [1, 4, 8])
@pytest.mark.parametrize("method", WITH_REFERENCE)
def test_grouped_update_matches_per_group_reference(method, num_groups):
  tx = METHODS[method].build(axis_name="groups")
  updates, state, loss = grouped_step(tx, num_groups, f32(W0), X, Y)
  want, perturbed_loss = msam64(W0, X, Y, num_groups, **METHODS[method].reference)
  assert_close(updates, want)
  np.testing.assert_allclose(state.perturbed_loss, perturbed_loss, rtol=1e-5)
  np.testing.assert_allclose(loss, ls_loss64(W0, X, Y), rtol=1e-5)  # equal groups: the mean
  assert int(state.count) == 1


@pytest.mark.parametrize("method", ["gsam", "looksam", "random_sam"])
def test_grouped_update_variants_match_per_group_reference(method):
  """N groups on one device, 3 steps (looksam: full, reuse, full), as N devices under pmap."""
  tx = variant(method, "groups")

  @jax.jit
  def train(params):
    def body(carry, _):
      params, state = carry
      updates, state, _ = asam_jax.grouped_update(
        tx,
        state,
        params,
        (X, Y),
        loss_fn=lambda p, batch: ls_loss(p, *batch),
        num_groups=N,
        axis_name="groups",
      )
      return (optax.apply_updates(params, updates), state), None

    return jax.lax.scan(body, (params, tx.init(params)), None, length=STEPS)[0]

  check_reference(method, False, *host(train(f32(W0))))


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sam", "looksam"])
def test_two_processes_match_the_single_process_run(tmp_path, method):
  """2 processes x 2 CPU devices, gloo collectives, equal the 4-device run here.

  looksam (k = 2, 3 steps) runs a full step, a reuse step and a full step.
  """
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
          [sys.executable, str(worker), str(i), str(port), str(out), method],
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

  params, state = multihost_worker.train(MESH, method)
  if method == "sam":
    w = W0
    for _ in range(STEPS):  # the float64 mSAM trajectory
      g, perturbed_loss = msam64(w, X, Y, N, rho=RHO)
      w = jax.tree.map(lambda a, b: a - LR * b, w, g)
    assert_close(params, w)
    np.testing.assert_allclose(state.perturbed_loss, perturbed_loss, rtol=1e-5)
  else:
    check_reference(method, False, params, (state,))
  here = jax.tree.leaves((params, state))
  for out in outs:
    with np.load(out) as got:
      saved = [got[f"arr_{i}"] for i in range(len(got.files))]
    # atol: LookSAM's g_v = g_s - c g is a difference of near-equal vectors, in which the
    # float32 rounding of sums taken in another order (gloo's) shows at ~1e-7 absolute.
    chex.assert_trees_all_close(saved, here, rtol=1e-6, atol=1e-6)


# --- the example ---------------------------------------------------------------------------


@pytest.mark.slow
def test_data_parallel_example_runs_and_its_modes_agree():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the script sets its own
  result = subprocess.run(
    [
      sys.executable,
      pathlib.Path(__file__).parents[1] / "notebooks" / "data_parallel.py",  # in the checkout
      *("--steps", "3", "--batch-size", "32"),
    ],
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


# --- one perturbation per group of devices -------------------------------------------


@pytest.mark.slow
def test_group_sync_is_google_research_sams_inner_group_size_on_8_devices():
  """group_sync_worker.py, on 8 forced CPU devices: google-research/sam's inner_group_size=2
  rule for sam, and every variant with sync_perturbation synced over "inner" equal to one
  device per group."""
  worker = pathlib.Path(__file__).with_name("group_sync_worker.py")
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
    NPROC="16",  # spare CPU launch threads, see conftest.py
    PYTHONPATH=os.pathsep.join([str(worker.parent), os.environ.get("PYTHONPATH", "")]),
  )
  run = subprocess.run(
    [sys.executable, str(worker)], env=env, capture_output=True, text=True, timeout=600
  )
  assert run.returncode == 0 and run.stdout.strip().endswith("ok"), (run.stdout + run.stderr)[
    -3000:
  ]


@pytest.mark.parametrize(
  "axis_name, sync",
  [
    ("data", "inner"),
    (("outer", "inner"), "other"),
    (("outer", "inner"), ("inner", "other")),
    ("data", None),
    ("data", 1),
    ("data", ()),
  ],
)
def test_a_sync_that_is_not_a_bool_or_some_of_the_axes_is_refused(axis_name, sync):
  for make in (asam_jax.sam, asam_jax.gsam, asam_jax.random_sam):
    kwargs = {"key": jax.random.key(0)} if make is asam_jax.random_sam else {}
    with pytest.raises(ValueError, match=r"sync_perturbation must be True, False, or an axis name"):
      make(axis_name=axis_name, sync_perturbation=sync, **kwargs)
