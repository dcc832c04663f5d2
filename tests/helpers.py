"""What the test modules share: the problems, the jitted loops, the tree assertions, the HLO
reading and the registry of methods.

The float64 references written from the papers live in reference.py and the
peers' ports in peers/; this module only serves them problems and loops.
"""

import dataclasses
import functools
import re
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference

import asam_jax

# --- a least-squares model whose gradient NumPy computes in closed form ------

RNG = np.random.default_rng(0)
X = RNG.normal(size=(32, 5))
Y = RNG.normal(size=(32, 3))
W0 = {"b": RNG.normal(size=3), "w": RNG.normal(size=(5, 3))}  # leaves in jax's (sorted) order


def ls_loss(params, x, y):
  r = x @ params["w"] + params["b"] - y
  return 0.5 * jnp.mean(jnp.sum(r**2, axis=-1))


def ls_loss64(w, x, y):
  r = x @ w["w"] + w["b"] - y
  return 0.5 * np.mean(np.sum(r**2, axis=-1))


def ls_grad64(w, x, y):
  r = x @ w["w"] + w["b"] - y
  return {"b": r.mean(0), "w": x.T @ r / len(x)}


def sam_grad64(w, x, y, *, rho, eta=0.0, adaptive=False, adaptive_flags=None, p=2.0, g=None):
  """The SAM/ASAM gradient grad L(w + eps) and eps, all in float64."""
  g = ls_grad64(w, x, y) if g is None else g
  flags = [adaptive] * 2 if adaptive_flags is None else adaptive_flags
  e = reference.perturbation(
    [g["b"], g["w"]], [w["b"], w["w"]], rho=rho, eta=eta, adaptive=flags, p=p
  )
  wp = {"b": w["b"] + e[0], "w": w["w"] + e[1]}
  return ls_grad64(wp, x, y), {"b": e[0], "w": e[1]}, ls_loss64(wp, x, y)


def mean(trees):
  return jax.tree.map(lambda *a: np.mean(a, 0), *trees)


def msam64(w, x, y, num_groups, *, sync=False, **kwargs):
  """The mSAM reference: (mean perturbed gradient, mean perturbed loss) over equal groups."""
  xs, ys = np.split(x, num_groups), np.split(y, num_groups)
  g = mean([ls_grad64(w, a, b) for a, b in zip(xs, ys)]) if sync else None
  per_group = [sam_grad64(w, a, b, g=g, **kwargs) for a, b in zip(xs, ys)]
  return mean([d[0] for d in per_group]), np.mean([d[2] for d in per_group])


def f32(tree):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


@functools.partial(jax.jit, static_argnums=0)
def one_update(tx, params, x, y):
  """One tx.update from a fresh state, as a user would call it."""
  loss_fn = lambda p: ls_loss(p, x, y)
  state = tx.init(params)
  grads = jax.grad(loss_fn)(params)
  return tx.update(grads, state, params, loss_fn=loss_fn)


def ls_step(tx):
  """A jitted training step of ``tx`` on the least-squares problem."""

  @jax.jit
  def step(params, state):
    loss_fn = lambda p: ls_loss(p, X, Y)
    updates, state = tx.update(jax.grad(loss_fn)(params), state, params, loss_fn=loss_fn)
    return optax.apply_updates(params, updates), state

  return step


# --- the same problem as one flat float64 vector, for the papers' algorithms ---------


def flat(tree):
  """A {"b", "w"} pytree as one float64 vector, and back."""
  return reference.flat([tree["b"], tree["w"]])


def unflat(v):
  return {"b": v[:3], "w": v[3:].reshape(5, 3)}


def grad64(v):
  """The float64 least-squares gradient at a flat weight vector."""
  return flat(ls_grad64(unflat(v), X, Y))


W0_FLAT = flat(W0)


# --- jitted training loops ---------------------------------------------------------


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


# --- a small ReLU MLP on two spirals ---------------------------------------------------


def mlp_init(key, sizes):
  keys = jax.random.split(key, len(sizes) - 1)
  return [
    {"w": jax.random.normal(k, (m, n)) * jnp.sqrt(2.0 / m), "b": jnp.zeros(n)}
    for k, m, n in zip(keys, sizes[:-1], sizes[1:])
  ]


def mlp_apply(params, x):
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  return x @ params[-1]["w"] + params[-1]["b"]


def xent(params, x, labels):
  return optax.softmax_cross_entropy_with_integer_labels(mlp_apply(params, x), labels).mean()


def spirals(n, key):
  t = jax.random.uniform(key, (n,)) * 3 * jnp.pi
  labels = (jnp.arange(n) % 2).astype(jnp.int32)
  r = t / (3 * jnp.pi) + 0.1
  angle = t + jnp.pi * labels
  return jnp.stack([r * jnp.cos(angle), r * jnp.sin(angle)], 1), labels


def train(tx, params, x, labels, steps):
  def body(carry, _):
    params, state = carry
    loss_fn = lambda p: xent(p, x, labels)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    return (optax.apply_updates(params, updates), state), loss

  (params, state), losses = jax.lax.scan(body, (params, tx.init(params)), None, length=steps)
  return params, state, losses


def rescale(params, key, low=0.5, high=1.5):
  """A random positive per-neuron rescaling that leaves a ReLU MLP's function unchanged.

  Each hidden neuron's incoming weights and bias are multiplied by a > 0 and its
  outgoing weights divided by a.
  """
  params = [dict(layer) for layer in params]
  for i, k in enumerate(jax.random.split(key, len(params) - 1)):
    a = jax.random.uniform(k, params[i]["b"].shape, minval=low, maxval=high)
    params[i]["w"] = params[i]["w"] * a
    params[i]["b"] = params[i]["b"] * a
    params[i + 1]["w"] = params[i + 1]["w"] / a[:, None]
  return params


# --- trees --------------------------------------------------------------------------


def assert_close(got, want, rtol=2e-5, atol=1e-6):
  """chex's comparison, by default with the tolerances of float32 results against float64
  references (NumPy compares the two in float64)."""
  chex.assert_trees_all_close(got, want, rtol=rtol, atol=atol)


def assert_trees_differ(got, want, atol=1e-3):
  """Some leaf differs by more than ``atol``: the check beside it could fail."""
  gap = max(
    float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))
  )
  assert gap > atol, gap


def host(tree):
  """``tree`` as NumPy arrays, PRNG keys as their key data."""
  is_key = lambda a: jnp.issubdtype(a.dtype, jax.dtypes.prng_key)
  return jax.tree.map(lambda a: np.asarray(jax.random.key_data(a) if is_key(a) else a), tree)


def perturbed_params(grads, params, *, rho, eta=0.0, adaptive=False):
  """w + eps in float32, eps from the float64 reference; ``adaptive`` for every leaf, or a
  list of one bool per leaf."""
  g, w = jax.tree.leaves(grads), jax.tree.leaves(params)
  flags = [adaptive] * len(w) if isinstance(adaptive, bool) else adaptive
  e = reference.perturbation(g, w, rho=rho, eta=eta, adaptive=flags)
  new = [jnp.asarray(np.asarray(a, np.float64) + b, jnp.float32) for a, b in zip(w, e)]
  return jax.tree.unflatten(jax.tree.structure(params), new)


# --- the tiers ------------------------------------------------------------------------------


def tiered(values, fast):
  """``values`` as pytest parameters, those not in ``fast`` marked slow: the fast tier keeps
  a few representatives of a parametrization, the full run takes every one."""
  out = []
  for v in values:
    marks = () if v in fast else pytest.mark.slow
    out.append(
      pytest.param(*v, marks=marks) if isinstance(v, tuple) else pytest.param(v, marks=marks)
    )
  return out


# --- the peers' base optimizer ------------------------------------------------------------


def sgd_base(lr, momentum=0.0, weight_decay=0.0):
  """torch.optim.SGD as the ports' base_step, its state kept in a closure; ``lr`` a number or a
  function of the step (a schedule, as the peers' schedulers set it per step)."""
  from peers import torch_sgd, torch_sgd_init

  state, step = [None], [0]

  def base_step(params, grads):
    if state[0] is None:
      state[0] = torch_sgd_init(params)
    rate = lr(step[0]) if callable(lr) else lr
    params, state[0] = torch_sgd(
      params, grads, state[0], lr=rate, momentum=momentum, weight_decay=weight_decay
    )
    step[0] += 1
    return params

  return base_step


# --- the registry of methods ------------------------------------------------------------

# STEPS = 3 with looksam's k = 2: a full step, a reuse step and a full step.
RHO, LR, STEPS = 0.2, 0.1, 3


@dataclasses.dataclass(frozen=True)
class Method:
  """One of asam_jax's transformations, as every test over all of them builds it.

  ``hyperparameters`` gives the keyword arguments that the float64 references
  of test_parallel check. It is a function because a PRNG key made at import
  would start jax's backend, and multihost_worker imports this module before
  it calls ``jax.distributed.initialize``. ``reference`` is set where the step
  is SAM's own: the arguments of ``sam_grad64`` (and ``perturbed_params``) that give it.
  """

  make: Callable[..., optax.GradientTransformation]
  hyperparameters: Callable[[], dict[str, Any]]
  # update needs loss_fn=, the closure of the loss at the batch
  closure: bool = True
  # a whole optimizer: no base optimizer is chained after it
  optimizer: bool = False
  # the arguments that optax.inject_hyperparams must leave static
  static_args: tuple[str, ...] = ()
  reference: dict[str, Any] | None = None

  @property
  def kwargs(self) -> dict[str, Any]:
    return self.hyperparameters()

  def build(self, **kwargs):
    """The transformation with ``kwargs`` added to (or replacing) the registry's."""
    return self.make(**{**self.kwargs, **kwargs})

  def chain(self, **kwargs):
    """``build`` followed by ``sgd(LR)``, a whole optimizer alone: an ``optax.chain`` either
    way, so that every ``update`` takes ``loss_fn=`` (and drops it where unused)."""
    tx = self.build(**kwargs)
    return optax.chain(tx) if self.optimizer else optax.chain(tx, optax.sgd(LR))


METHODS = {
  "sam": Method(
    asam_jax.sam,
    lambda: dict(rho=RHO),
    static_args=("p", "ascent_steps"),
    reference=dict(rho=RHO),
  ),
  "asam": Method(
    asam_jax.asam,
    lambda: dict(rho=0.5, eta=0.01),
    static_args=("p", "ascent_steps"),
    reference=dict(rho=0.5, eta=0.01, adaptive=True),
  ),
  "gsam": Method(asam_jax.gsam, lambda: dict(rho=RHO, alpha=0.3)),
  "looksam": Method(asam_jax.looksam, lambda: dict(rho=RHO, k=2, alpha=0.7), static_args=("k",)),
  "random_sam": Method(asam_jax.random_sam, lambda: dict(key=jax.random.key(7), rho=RHO)),
  "fisher_sam": Method(
    asam_jax.fisher_sam, lambda: dict(rho=RHO, eta=1.0), static_args=("p", "ascent_steps")
  ),
  "friendly_sam": Method(asam_jax.friendly_sam, lambda: dict(rho=RHO, sigma=1.0, lmbda=0.9)),
  "esam": Method(
    asam_jax.esam,
    lambda: dict(rho=RHO, beta=0.5, gamma=1.0, key=jax.random.key(3)),
    static_args=("gamma",),
  ),
  "bayesian_sam": Method(
    asam_jax.bayesian_sam,
    lambda: dict(learning_rate=LR, rho=0.01, num_data=1000.0, key=jax.random.key(5)),
    optimizer=True,
  ),
  "momentum_sam": Method(
    asam_jax.momentum_sam,
    lambda: dict(learning_rate=LR, rho=RHO, momentum=0.9),
    closure=False,
    optimizer=True,
  ),
  "momentum_sam_adamw": Method(
    asam_jax.momentum_sam_adamw,
    lambda: dict(rho=RHO, learning_rate=0.05, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01),
    closure=False,
    optimizer=True,
  ),
}
# The methods whose step is SAM's, checked against the float64 perturbation itself.
WITH_REFERENCE = tuple(name for name, method in METHODS.items() if method.reference)


# --- compiled HLO text: which operations run where ----------------------------------------

_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) .*\{$")
_INSTRUCTION = re.compile(r"=\s*\S+(?:\s*\([^)]*\))?\s+([a-z][a-z0-9\-]*)\(")
_CALLS = re.compile(
  r"(?:calls|to_apply|body|condition|branch_computations)=\{?([^}\s]+(?:,\s*%[^,}\s]+)*)\}?"
)


def computations(hlo: str) -> dict[str, tuple[set[str], set[str]]]:
  """Each computation's opcodes and the computations it calls."""
  out, name = {}, None
  for line in hlo.splitlines():
    if m := _COMPUTATION.match(line.strip()):
      name = m.group(1)
      out[name] = (set(), set())
    elif name and (m := _INSTRUCTION.search(line)):
      out[name][0].add(m.group(1))
      for called in _CALLS.findall(line):
        out[name][1].update(c.strip().lstrip("%") for c in called.split(","))
  return out


def ops_inside_conditionals(hlo: str) -> set[str]:
  """The opcodes that run inside a branch of some ``conditional``, however deeply nested."""
  comps = computations(hlo)
  todo = [
    c.strip().lstrip("%")
    for line in hlo.splitlines()
    if " conditional(" in line
    for group in re.findall(r"branch_computations=\{([^}]*)\}", line)
    for c in group.split(",")
  ]
  seen, ops = set(), set()
  while todo:
    name = todo.pop()
    if name in seen or name not in comps:
      continue
    seen.add(name)
    ops |= comps[name][0]
    todo.extend(comps[name][1])
  return ops
