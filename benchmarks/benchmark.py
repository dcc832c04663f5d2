"""Step time, compile time and memory of SAM/ASAM against SGD and optax.contrib.sam.

Run::

  python benchmarks/benchmark.py                          # every workload, ~11 min on 2 CPU cores
  python benchmarks/benchmark.py --quick --workloads mlp --out /tmp/bench  # seconds: checks that it runs
  python benchmarks/benchmark.py --workloads wide_mlp --hlo-dir hlo/  # and dump the HLO
  python benchmarks/benchmark.py --report                 # only rewrite benchmarks/README.md's tables

Every method is a cycle of jitted train steps ``(params, opt_state, batch) ->
(params, opt_state, loss)`` that take the clean gradient and call the
transformation, with params and optimizer state donated. All methods of a
workload are timed in the same process in interleaved rounds (one measurement
of each method per round, each from a copy of the initial weights, after a
warm-up), and the median over rounds is reported, so that a change in machine
load hits every method alike. Compile time is ``lower()`` plus ``compile()``
of a fresh jit, the median of several; memory is the compiled step's
``memory_analysis()``. Cheap probes per workload (one read of the parameters,
one gradient, the same gradient inside ``lax.cond``, XLA's scratch for one and
two gradients) give the floors the ``TARGETS`` are set against.

Writes ``benchmark.json`` to ``--out`` and renders the tables of
``benchmarks/README.md`` from it, between its ``<!-- generated NAME ... -->``
and ``<!-- end generated NAME -->`` markers.

To add a method, add a row to ``METHODS``: a name and a :class:`Method`; to
add a target, a :class:`Target` to ``TARGETS``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

import asam_jax
from asam_jax import _provenance

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE / "README.md"

# Small, so that over one round (every round restarts from the initial weights)
# the loss stays near its initial value; see bench_workload.
LEARNING_RATE = 1e-4
MOMENTUM = 0.9
SAM_RHO = 0.05
ASAM_RHO = 0.5
ASAM_ETA = 0.01
# p = inf moves every weight by rho (|w| + eta); at rho = 0.5 the perturbed loss
# is ~1000x the clean one, which no one would train with.
ASAM_INF_RHO = 0.02
LOOKSAM_K = 5
# Momentum-SAM's radius is along the momentum, the paper's default.
MSAM_RHO = 0.3
# XLA:CPU's scheduler that orders instructions to lower peak memory.
MEMORY_SCHEDULER = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
MEMSCHED = "_memsched"


def _base() -> optax.GradientTransformation:
  """The outer optimizer every method shares."""
  return optax.sgd(LEARNING_RATE, momentum=MOMENTUM)


def _with_loss_fn(loss_fn: Callable[[Any], jax.Array]) -> dict[str, Any]:
  return {"loss_fn": loss_fn}


def _with_grad_fn(loss_fn: Callable[[Any], jax.Array]) -> dict[str, Any]:
  # optax.contrib.sam's opaque mode calls grad_fn(params, adversarial_step).
  return {"grad_fn": lambda params, _: jax.grad(loss_fn)(params)}


@dataclasses.dataclass(frozen=True)
class Method:
  """One row of the table.

  Attributes:
    make: builds the transformation.
    extra_args: the keyword arguments its ``update`` needs, given the loss
      closure ``params -> scalar`` over the current batch.
    cycle: the static keyword arguments of ``update`` at each step of the
      cycle a training loop repeats; equal entries share one compiled step.
      Rounds run whole cycles.
    compiler_options: XLA options for ``jax.jit``.
    backend: the only backend whose compiler takes ``compiler_options``, or
      None for any.
  """

  make: Callable[[], optax.GradientTransformation]
  extra_args: Callable[[Callable[[Any], jax.Array]], dict[str, Any]] = _with_loss_fn
  cycle: tuple[dict[str, Any], ...] = ({},)
  compiler_options: dict[str, Any] | None = None
  backend: str | None = None


def _looksam() -> optax.GradientTransformation:
  return optax.chain(asam_jax.looksam(rho=SAM_RHO, k=LOOKSAM_K), _base())


METHODS: dict[str, Method] = {
  "sgd": Method(_base, lambda _: {}),
  "sam": Method(lambda: optax.chain(asam_jax.sam(rho=SAM_RHO), _base())),
  "asam_p2": Method(lambda: optax.chain(asam_jax.asam(rho=ASAM_RHO, eta=ASAM_ETA), _base())),
  "asam_pinf": Method(
    lambda: optax.chain(asam_jax.asam(rho=ASAM_INF_RHO, eta=ASAM_ETA, p=math.inf), _base())
  ),
  # The variants: GSAM pays two gradients like SAM; LookSAM 1 + 1/k; Momentum-SAM
  # and random SAM one (random SAM's clean pass is only the step's own).
  "gsam": Method(lambda: optax.chain(asam_jax.gsam(rho=SAM_RHO, alpha=0.01), _base())),
  # One compiled step whose lax.cond runs the full step every k-th call.
  "looksam_k5": Method(_looksam, cycle=({},) * LOOKSAM_K),
  # A full and a reuse step, the branch chosen at trace time: no conditional.
  "looksam_k5_static": Method(
    _looksam, cycle=({"full_step": True},) + ({"full_step": False},) * (LOOKSAM_K - 1)
  ),
  "momentum_sam": Method(
    lambda: asam_jax.momentum_sam(LEARNING_RATE, rho=MSAM_RHO, momentum=MOMENTUM), lambda _: {}
  ),
  "random_sam": Method(
    lambda: optax.chain(asam_jax.random_sam(jax.random.key(0), rho=SAM_RHO), _base())
  ),
  # The JAX anchor, with the adversarial chain optax documents for SAM.
  "optax_sam": Method(
    lambda: optax.contrib.sam(
      _base(),
      optax.chain(optax.contrib.normalize(), optax.sgd(SAM_RHO)),
      opaque_mode=True,
    ),
    _with_grad_fn,
  ),
}
# The same steps under the memory-optimized scheduler, to compare scratch memory.
METHODS |= {
  name + MEMSCHED: dataclasses.replace(
    METHODS[name], compiler_options=MEMORY_SCHEDULER, backend="cpu"
  )
  for name in ("sgd", "sam", "asam_p2")
}


# --- workloads: plain JAX models, random data (only the time matters) ---


def _dense(key, n_in, n_out):
  return {
    "w": jax.random.normal(key, (n_in, n_out)) * math.sqrt(2 / n_in),
    "b": jnp.zeros(n_out),
  }


def _cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _mlp_init(sizes):
  def init(key):
    keys = jax.random.split(key, len(sizes) - 1)
    return [_dense(k, a, b) for k, a, b in zip(keys, sizes[:-1], sizes[1:])]

  return init


def _mlp_loss(params, batch):
  x, y = batch
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  return _cross_entropy(x @ params[-1]["w"] + params[-1]["b"], y)


def _conv_init(kernel, channels, n_classes, flat):
  def init(key):
    keys = jax.random.split(key, len(channels))
    convs = [
      {
        "w": jax.random.normal(k, (*kernel, c_in, c_out))
        * math.sqrt(2 / (math.prod(kernel) * c_in)),
        "b": jnp.zeros(c_out),
      }
      for k, c_in, c_out in zip(keys[:-1], channels[:-1], channels[1:])
    ]
    return {"convs": convs, "head": _dense(keys[-1], flat, n_classes)}

  return init


def _conv_loss(dims):
  def loss(params, batch):
    x, y = batch
    pool = (1, *(2,) * (x.ndim - 2), 1)
    for layer in params["convs"]:
      x = jax.lax.conv_general_dilated(
        x, layer["w"], (1,) * (x.ndim - 2), "SAME", dimension_numbers=dims
      )
      x = jax.nn.relu(x + layer["b"])
      x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, pool, pool, "VALID")
    x = x.reshape(x.shape[0], -1)
    return _cross_entropy(x @ params["head"]["w"] + params["head"]["b"], y)

  return loss


@dataclasses.dataclass(frozen=True)
class Workload:
  description: str
  init: Callable[[jax.Array], Any]
  loss: Callable[[Any, Any], jax.Array]
  input_shape: tuple[int, ...]
  n_classes: int = 10

  def batch(self, key):
    kx, ky = jax.random.split(key)
    return (
      jax.random.normal(kx, self.input_shape),
      jax.random.randint(ky, self.input_shape[:1], 0, self.n_classes),
    )


WORKLOADS: dict[str, Workload] = {
  "mlp": Workload(
    "MLP 40-128-128-10, MNIST-1D size, batch 128",
    _mlp_init([40, 128, 128, 10]),
    _mlp_loss,
    (128, 40),
  ),
  "cnn1d": Workload(
    "1-D CNN 3x(conv5+pool) 32-64-64, MNIST-1D size, batch 128",
    _conv_init((5,), [1, 32, 64, 64], 10, 5 * 64),
    _conv_loss(("NWC", "WIO", "NWC")),
    (128, 40, 1),
  ),
  "conv32": Workload(
    "CNN 3x(conv3x3+pool) 32-64-128 on 32x32x3, batch 128 (compute-bound)",
    _conv_init((3, 3), [3, 32, 64, 128], 10, 4 * 4 * 128),
    _conv_loss(("NHWC", "HWIO", "NHWC")),
    (128, 32, 32, 3),
  ),
  "wide_mlp": Workload(
    "MLP 1024-4096-4096-10, 21M parameters, batch 16 (parameter-bound)",
    _mlp_init([1024, 4096, 4096, 10]),
    _mlp_loss,
    (16, 1024),
  ),
}


# --- measuring ---


def _distinct(cycle: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[int]]:
  """The distinct entries of ``cycle``, and the index of each step's entry among them."""
  distinct: list[dict[str, Any]] = []
  for static in cycle:
    if static not in distinct:
      distinct.append(static)
  return distinct, [distinct.index(static) for static in cycle]


def make_step(
  method: Method,
  tx: optax.GradientTransformation,
  loss: Callable[[Any, Any], jax.Array],
  static: dict[str, Any],
):
  """The jitted train step of ``tx`` called with ``static``; params and optimizer state donated."""

  def step(params, opt_state, batch):
    loss_fn = lambda p: loss(p, batch)
    value, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params, **method.extra_args(loss_fn), **static)
    return optax.apply_updates(params, updates), opt_state, value

  return jax.jit(step, donate_argnums=(0, 1), compiler_options=method.compiler_options)


def _memory(compiled) -> dict[str, int] | None:
  try:
    stats = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError):
    return None
  if stats is None:
    return None
  fields = ("argument", "output", "alias", "temp")
  out = {f"{f}_bytes": int(getattr(stats, f"{f}_size_in_bytes")) for f in fields}
  # Donated outputs reuse their argument's buffer (alias), so they count once.
  out["peak_bytes"] = (
    out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
  )
  return out


def _tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _gradient_temp_bytes(loss, params, batch) -> dict[str, int | None]:
  """XLA's scratch memory for one gradient, and for two in sequence (no optimizer).

  The difference is what any two-gradient method pays over SGD before its own
  overhead, since XLA need not reuse the first pass's activation buffers.
  """
  grad = jax.grad(loss)
  two = lambda p, b: grad(jax.tree.map(jnp.add, p, grad(p, b)), b)
  out = {}
  for label, fn in (("one_gradient", grad), ("two_gradients", two)):
    memory = _memory(jax.jit(fn).lower(params, batch).compile())
    out[f"{label}_temp_bytes"] = memory and memory["temp_bytes"]
  return out


def _median_ms(fn: Callable, args: tuple, repeats: int = 5) -> float:
  """Median milliseconds per call of a jitted ``fn``, after one call to compile and warm up."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def _read_ms(params) -> float:
  """Milliseconds for one pass that reads every parameter (their sum): the floor of a read of w."""
  return _median_ms(jax.jit(lambda p: sum(jnp.sum(x) for x in jax.tree.leaves(p))), (params,))


def _cond_probe(loss, params, batch) -> dict[str, float]:
  """Milliseconds for one gradient, plainly and inside a taken ``lax.cond`` branch.

  LookSAM's skipped steps need a real conditional; this measures what the
  backend charges for running the gradient inside one (benchmarks/xla_cpu_cond_repro.py).
  """
  grad = jax.jit(jax.grad(loss))
  in_cond = jax.jit(lambda p, b, take: jax.lax.cond(take, jax.grad(loss), lambda p, b: p, p, b))
  return {
    "grad_ms": _median_ms(grad, (params, batch)),
    "grad_in_cond_ms": _median_ms(in_cond, (params, batch, True)),
  }


def _timed_run(cycle, start, batch, steps) -> tuple[float, float]:
  """Seconds per step over ``steps`` steps of ``cycle`` from a copy of ``start``, and the last loss."""
  # A copy, since the step donates its inputs; made before the clock starts.
  params, opt_state = jax.block_until_ready(jax.tree.map(jnp.copy, start))
  t0 = time.perf_counter()
  for i in range(steps):
    params, opt_state, value = cycle[i % len(cycle)](params, opt_state, batch)
  jax.block_until_ready((params, opt_state, value))
  return (time.perf_counter() - t0) / steps, float(value)


def _compile(method: Method, tx, loss, start, batch) -> tuple[list, float, float]:
  """Lowers and compiles fresh jits of ``method``'s distinct steps.

  Returns:
    The compiled steps, one per distinct entry of ``method.cycle``, and the
    seconds to lower them all and to compile them all.
  """
  distinct, _ = _distinct(method.cycle)
  steps = [make_step(method, tx, loss, static) for static in distinct]
  t0 = time.perf_counter()
  lowered = [step.lower(*start, batch) for step in steps]
  t1 = time.perf_counter()
  compiled = [step.compile() for step in lowered]
  t2 = time.perf_counter()
  return compiled, t1 - t0, t2 - t1


def bench_workload(
  workload_name: str,
  workload: Workload,
  methods: dict[str, Method],
  *,
  rounds: int,
  round_seconds: float,
  compile_repeats: int,
  hlo_dir: Path | None = None,
) -> dict[str, Any]:
  """Compiles and times every method on ``workload``, interleaved."""
  key_params, key_batch = jax.random.split(jax.random.key(0))
  params = workload.init(key_params)
  batch = workload.batch(key_batch)
  txs = {name: method.make() for name, method in methods.items()}
  starts = {name: (params, tx.init(params)) for name, tx in txs.items()}
  results = {name: {"lower_s_rounds": [], "compile_s_rounds": []} for name in methods}
  compiled = {}
  # A fresh jit per repeat, since jax caches both lowering and compilation.
  for _ in range(compile_repeats):
    for name, method in methods.items():
      compiled[name], lower_s, compile_s = _compile(
        method, txs[name], workload.loss, starts[name], batch
      )
      results[name]["lower_s_rounds"].append(lower_s)
      results[name]["compile_s_rounds"].append(compile_s)
  cycles = {}
  for name, r in results.items():
    r["lower_s"] = statistics.median(r["lower_s_rounds"])
    r["compile_s"] = statistics.median(r["compile_s_rounds"])
    memories = [_memory(c) for c in compiled[name]]
    # The largest, since the steps of a cycle run one at a time.
    r["memory"] = None if None in memories else max(memories, key=lambda m: m["peak_bytes"])
    distinct, index = _distinct(methods[name].cycle)
    cycles[name] = [compiled[name][i] for i in index]
    if hlo_dir is not None:
      for static, c in zip(distinct, compiled[name]):
        suffix = "".join(f"_{k}={v}" for k, v in static.items())
        (hlo_dir / f"{workload_name}_{name}{suffix}.hlo.txt").write_text(c.as_text())
    r["step_ms_rounds"] = []

  # Rounds of whole cycles, so that a method whose steps differ (LookSAM) is
  # timed at its average cost: each round restarts at its first step.
  period = math.lcm(*(len(cycle) for cycle in cycles.values()))
  # Warm-up: one period of each, timed to size the rounds on the slowest method.
  warm = {name: _timed_run(cycles[name], starts[name], batch, period)[0] for name in methods}
  steps = period * max(1, round(round_seconds / max(warm.values()) / period))

  # Every round restarts from the initial weights: trained on for long on one
  # batch, the loss reaches 0 and the gradients denormal floats, which are slow
  # on CPUs and would time the arithmetic, not the method.
  for _ in range(rounds):
    for name in methods:
      seconds, loss = _timed_run(cycles[name], starts[name], batch, steps)
      results[name]["step_ms_rounds"].append(1e3 * seconds)
      results[name]["last_loss"] = loss
  for r in results.values():
    r["step_ms"] = statistics.median(r["step_ms_rounds"])

  return {
    "description": workload.description,
    "n_params": sum(x.size for x in jax.tree.leaves(params)),
    "param_bytes": _tree_bytes(params),
    "batch_size": workload.input_shape[0],
    "steps_per_round": steps,
    "rounds": rounds,
    "methods": results,
    "ratios": _ratios(results, _tree_bytes(params)),
    **_gradient_temp_bytes(workload.loss, params, batch),
    "read_ms": _read_ms(params),
    "cond_probe": _cond_probe(workload.loss, params, batch),
  }


def _ratios(results: dict[str, dict[str, Any]], param_bytes: int) -> dict[str, float]:
  """SAM/SGD, ASAM/SAM and ours/optax for time; compile and memory against SGD."""
  out = {}

  def ratio(label, num, den, key):
    if num in results and den in results:
      out[label] = key(results[num]) / key(results[den])

  step = lambda r: r["step_ms"]
  compile_s = lambda r: r["lower_s"] + r["compile_s"]
  ratio("step sam/sgd", "sam", "sgd", step)
  ratio("step asam_p2/sam", "asam_p2", "sam", step)
  ratio("step asam_pinf/sam", "asam_pinf", "sam", step)
  ratio("step sam/optax_sam", "sam", "optax_sam", step)
  ratio("step gsam/sam", "gsam", "sam", step)
  for name in ("looksam_k5", "looksam_k5_static", "momentum_sam", "random_sam"):
    ratio(f"step {name}/sgd", name, "sgd", step)
  for name in results:
    if name != "sgd":
      ratio(f"compile {name}/sgd", name, "sgd", compile_s)
  ratio("compile sam/optax_sam", "sam", "optax_sam", compile_s)
  if "sgd" in results and results["sgd"]["memory"]:
    base = results["sgd"]["memory"]["peak_bytes"]
    for name, r in results.items():
      if name != "sgd" and r["memory"]:
        out[f"extra memory {name} (parameter copies)"] = (
          r["memory"]["peak_bytes"] - base
        ) / param_bytes
  return out


def _machine() -> dict[str, Any]:
  """The machine line's fields, from the provenance the demo and the notebooks record too."""
  machine, versions = _provenance.machine(), _provenance.versions()
  return {
    "backend": machine["jax_backend"],
    "device": machine["device"],
    "device_count": jax.device_count(),
    "cpu_count": machine["cores"],
    "platform": platform.platform(),
    "processor": machine["cpu"],
    "python": versions["python"],
    "jax": versions["jax"],
    "optax": versions["optax"],
    "load_average": _provenance.load_average(),
  }


# --- targets: each result against its floor, the work no implementation can skip ---


@dataclasses.dataclass(frozen=True)
class Target:
  """One line per workload of the targets table: met when ``result <= bound``.

  Each function takes one workload's results (``report["workloads"][name]``).

  Attributes:
    label: the target, as the table shows it.
    workloads: the workloads it is checked on.
    result: the measured value.
    bound: the largest value that meets the target.
    floor: the value of the work the method cannot skip, from the probes.
    unit: written after the result; bound and floor are in the same unit.
    paired: the methods whose per-round step times give the spread of a
      time ratio (rounds are interleaved, so round i of both ran side by side).
  """

  label: str
  workloads: tuple[str, ...]
  result: Callable[[dict[str, Any]], float]
  bound: Callable[[dict[str, Any]], float]
  floor: Callable[[dict[str, Any]], float]
  unit: str
  paired: tuple[str, str] | None = None


ALL_WORKLOADS = tuple(WORKLOADS)


def _step_ms(method: str, *, reads: float = 0, grads: float = 0) -> Callable[[dict], float]:
  """``method``'s step time plus ``reads`` parameter reads and ``grads`` gradients (probes)."""

  def ms(w):
    total = w["methods"][method]["step_ms"]
    if reads:
      total += reads * w["read_ms"]
    if grads:
      total += grads * w["cond_probe"]["grad_ms"]
    return total

  return ms


def _temp_mb(method: str) -> Callable[[dict], float]:
  return lambda w: w["methods"][method]["memory"]["temp_bytes"] / 1e6


def _time_target(
  name: str,
  workloads: tuple[str, ...],
  method: str,
  reference: str,
  floor: Callable[[dict], float],
  *,
  bound: float | None = None,
  slack: float | None = None,
) -> Target:
  """``method``'s step time over ``reference``'s, with its floor (ms) over the same.

  Met at most ``bound``, or, where the target is the floor itself, at most
  ``slack`` times the floor.
  """
  over = lambda ms: lambda w: ms(w) / w["methods"][reference]["step_ms"]
  if slack is None:
    label, limit = f"{name} ≤ {bound} × {reference}", lambda w: bound
  else:
    label, limit = f"{name} ≤ {slack} × floor", lambda w: slack * over(floor)(w)
  return Target(
    label,
    workloads,
    result=over(_step_ms(method)),
    bound=limit,
    floor=over(floor),
    unit="",
    paired=(method, reference),
  )


def _scratch_target(
  name: str,
  workloads: tuple[str, ...],
  method: str,
  floor: Callable[[dict], float],
  *,
  slack: float = 1.0,
  copies: int = 0,
) -> Target:
  """``method``'s XLA scratch (MB), met at most ``slack`` x the floor + ``copies`` of the parameters."""
  label = f"{name} scratch ≤ " + ("floor" if slack == 1 else f"{slack} × floor")
  if copies:
    label += f" + {copies} parameter copy"
  return Target(
    label,
    workloads,
    result=_temp_mb(method),
    bound=lambda w: slack * floor(w) + copies * w["param_bytes"] / 1e6,
    floor=floor,
    unit=" MB",
  )


_ASAM = {"asam_p2": "ASAM p = 2", "asam_pinf": "ASAM p = ∞"}

TARGETS: tuple[Target, ...] = (
  _time_target("SAM", ("conv32",), "sam", "sgd", _step_ms("sgd", grads=1), bound=2.0),
  *(
    _time_target(label, workloads, method, "sam", _step_ms("sam", reads=1), bound=bound)
    for method, label in _ASAM.items()
    for bound, workloads in ((1.06, ("wide_mlp",)), (1.02, ("cnn1d", "conv32")))
  ),
  # Parity: optax's step does the same work, so the floor is any SAM's.
  _time_target("ours", ALL_WORKLOADS, "sam", "optax_sam", _step_ms("sgd", grads=1), bound=1.0),
  # GSAM's <g, g_p> reads both gradients, ||g_p|| g_p again, and its combination
  # reads g beside g_p: four reads more than SAM (and g stays alive meanwhile).
  _time_target("GSAM", ALL_WORKLOADS, "gsam", "sam", _step_ms("sam", reads=4), slack=1.05),
  # Momentum-SAM's norm of v = mu m + g reads m and g before the fused update can.
  _time_target(
    "Momentum-SAM", ALL_WORKLOADS, "momentum_sam", "sgd", _step_ms("sgd", reads=2), slack=1.05
  ),
  _time_target(
    f"LookSAM k = {LOOKSAM_K}, static",
    ("cnn1d", "conv32"),
    "looksam_k5_static",
    "sgd",
    _step_ms("sgd", grads=1 / LOOKSAM_K),
    bound=1.25,
  ),
  # Two gradients in sequence already take more scratch than one (XLA does not
  # reuse every activation buffer); SAM may add one parameter-sized buffer.
  _scratch_target(
    "SAM", ALL_WORKLOADS, "sam", lambda w: w["two_gradients_temp_bytes"] / 1e6, copies=1
  ),
  *(
    _scratch_target(label, ("wide_mlp",), m, _temp_mb("sam"), slack=1.05)
    for m, label in _ASAM.items()
  ),
)


def _spread(w: dict[str, Any], paired: tuple[str, str]) -> str:
  """The interquartile range of the per-round ratios of two methods' step times."""
  num, den = (w["methods"][m]["step_ms_rounds"] for m in paired)
  ratios = [a / b for a, b in zip(num, den)]
  if len(ratios) < 2:
    return ""
  q1, _, q3 = statistics.quantiles(ratios, n=4)
  return f" ({q1:.2f}–{q3:.2f})"


def _target_rows(report: dict[str, Any]) -> list[str]:
  rows = []
  for target in TARGETS:
    for wname in (n for n in target.workloads if n in report["workloads"]):
      w = report["workloads"][wname]
      try:
        result, bound, floor = (f(w) for f in (target.result, target.bound, target.floor))
      except (KeyError, TypeError):  # not in this run, or no memory_analysis()
        rows.append(f"| {target.label} | {wname} | not measured | | | |")
        continue
      spread = _spread(w, target.paired) if target.paired else ""
      verdict = "met" if result <= bound else "**missed**"
      rows.append(
        f"| {target.label} | {wname} | {result:.2f}{target.unit}{spread} | {bound:.2f} | "
        f"{floor:.2f} | {verdict} |"
      )
  return rows


# --- the README's generated sections ---


def _results_table(report: dict[str, Any]) -> list[str]:
  lines = [
    "| workload | method | step (ms) | compile (s) | peak memory (MB) | XLA scratch (MB) | extra memory (param copies) |",
    "|---|---|---:|---:|---:|---:|---:|",
  ]
  for wname, w in report["workloads"].items():
    for name, r in w["methods"].items():
      mem = r["memory"]
      extra = w["ratios"].get(f"extra memory {name} (parameter copies)")
      lines.append(
        f"| {wname} | {name} | {r['step_ms']:.2f} | {r['lower_s'] + r['compile_s']:.2f} | "
        + (f"{mem['peak_bytes'] / 1e6:.1f} | {mem['temp_bytes'] / 1e6:.1f}" if mem else "n/a | n/a")
        + " | "
        + (f"{extra:.2f}" if extra is not None else "")
        + " |"
      )
  m = report["machine"]
  return [
    *lines,
    "",
    f"{m['backend']} ({m['device']}, {m['cpu_count']} cores, {m['processor']}), "
    f"jax {m['jax']}, optax {m['optax']}; load average before "
    f"{_fmt_load(m['load_average'])}, after {_fmt_load(report['load_average_after'])}; "
    f"{'quick' if report['quick'] else 'full'} run of {report['date']}, median of "
    f"{report['rounds']} interleaved rounds.",
  ]


def _ratios_table(report: dict[str, Any]) -> list[str]:
  labels = sorted({k for w in report["workloads"].values() for k in w["ratios"]}, key=_order)
  labels = [k for k in labels if not k.startswith("extra memory")]
  lines = ["| ratio | " + " | ".join(report["workloads"]) + " |"]
  lines.append("|---|" + "---:|" * len(report["workloads"]))
  for label in labels:
    cells = [w["ratios"].get(label) for w in report["workloads"].values()]
    lines.append(
      f"| {label} | " + " | ".join("" if c is None else f"{c:.2f}" for c in cells) + " |"
    )
  return lines


def _probes_table(report: dict[str, Any]) -> list[str]:
  lines = [
    "| workload | parameters | parameters (MB) | XLA scratch, one gradient (MB) | two gradients in sequence (MB) | one read of the parameters (ms) | one gradient (ms) | the same inside lax.cond (ms) |",
    "|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for wname, w in report["workloads"].items():
    one, two = w["one_gradient_temp_bytes"], w["two_gradients_temp_bytes"]
    probe = w["cond_probe"]
    read = f"{w['read_ms']:.3f}" if "read_ms" in w else "n/a"
    lines.append(
      f"| {wname} | {w['n_params']:,} | {w['param_bytes'] / 1e6:.2f} | "
      + (f"{one / 1e6:.1f} | {two / 1e6:.1f}" if one is not None else "n/a | n/a")
      + f" | {read} | {probe['grad_ms']:.2f} | {probe['grad_in_cond_ms']:.2f} |"
    )
  return lines


def _targets_table(report: dict[str, Any]) -> list[str]:
  return [
    "| target | workload | result (per-round IQR) | bound | floor | met? |",
    "|---|---|---:|---:|---:|---|",
    *_target_rows(report),
  ]


def _scheduler_table(report: dict[str, Any]) -> list[str]:
  lines = [
    "| workload | method | step, default (ms) | step, memory-optimized (ms) | XLA scratch, default (MB) | XLA scratch, memory-optimized (MB) |",
    "|---|---|---:|---:|---:|---:|",
  ]
  for wname, w in report["workloads"].items():
    for name, r in w["methods"].items():
      base = w["methods"].get(name.removesuffix(MEMSCHED))
      if name.endswith(MEMSCHED) and base is not None:
        temp = [x["memory"] and f"{x['memory']['temp_bytes'] / 1e6:.1f}" for x in (base, r)]
        lines.append(
          f"| {wname} | {name.removesuffix(MEMSCHED)} | {base['step_ms']:.2f} | "
          f"{r['step_ms']:.2f} | {temp[0] or 'n/a'} | {temp[1] or 'n/a'} |"
        )
  if len(lines) == 2:
    return ["No `*_memsched` rows in this run (they run on the CPU backend only)."]
  return lines


SECTIONS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
  "results": _results_table,
  "ratios": _ratios_table,
  "probes": _probes_table,
  "targets": _targets_table,
  "scheduler": _scheduler_table,
}


def sections(report: dict[str, Any]) -> dict[str, str]:
  """The README's generated sections, by name, rendered from a report (the JSON)."""
  return {name: "\n".join(render(report)) + "\n" for name, render in SECTIONS.items()}


def _order(label: str) -> tuple[int, str]:
  return (0 if label.startswith("step") else 1, label)


def _fmt_load(load):
  return "n/a" if load is None else "/".join(f"{x:.1f}" for x in load)


_MARKED = re.compile(
  r"(?P<begin><!-- generated (?P<name>\w+) by benchmarks/benchmark\.py from "
  r"results/benchmark\.json: do not edit -->\n).*?(?P<end><!-- end generated (?P=name) -->)",
  re.DOTALL,
)


def render_readme(text: str, rendered: dict[str, str]) -> str:
  """``text`` with the lines between each pair of markers replaced by their section.

  Raises:
    ValueError: if a section has no markers in ``text``, or markers name no section.
  """
  names = [m.group("name") for m in _MARKED.finditer(text)]
  if sorted(names) != sorted(rendered):
    raise ValueError(f"the README's generated sections are {names}, expected {list(rendered)}")
  return _MARKED.sub(
    lambda m: f"{m.group('begin')}\n{rendered[m.group('name')]}\n{m.group('end')}", text
  )


def write_readme(readme: Path, report: dict[str, Any]) -> None:
  readme.write_text(render_readme(readme.read_text(), sections(report)))


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser, command: str) -> dict[str, Any]:
  """Benchmarks the chosen workloads and methods; the report that goes to the JSON."""

  def pick(names, table, what):
    chosen = [n for n in names.split(",") if n]
    unknown = [n for n in chosen if n not in table]
    if unknown:
      parser.error(f"unknown {what} {unknown}; choose from {list(table)}")
    return {n: table[n] for n in chosen}

  workloads = pick(args.workloads, WORKLOADS, "workloads")
  methods = pick(args.methods, METHODS, "methods")
  backend = jax.default_backend()
  skipped = [n for n, m in methods.items() if m.backend not in (None, backend)]
  if skipped:
    print(f"skipping {skipped}: their compiler options are not for the {backend} backend")
  methods = {n: m for n, m in methods.items() if n not in skipped}
  if args.hlo_dir is not None:
    args.hlo_dir.mkdir(parents=True, exist_ok=True)
  rounds = args.rounds or (3 if args.quick else 9)
  compile_repeats = args.compile_repeats or (1 if args.quick else 3)
  round_seconds = 0.02 if args.quick else 0.4

  report: dict[str, Any] = {
    "date": _provenance.now(),
    "command": command,
    "quick": args.quick,
    "rounds": rounds,
    "compile_repeats": compile_repeats,
    "machine": _machine(),
    "workloads": {},
  }
  for wname, workload in workloads.items():
    print(f"{wname}: {workload.description}", flush=True)
    report["workloads"][wname] = bench_workload(
      wname,
      workload,
      methods,
      rounds=rounds,
      round_seconds=round_seconds,
      compile_repeats=compile_repeats,
      hlo_dir=args.hlo_dir,
    )
  report["load_average_after"] = _provenance.load_average()
  return report


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="few, short rounds: checks that it runs")
  parser.add_argument(
    "--out", type=Path, default=RESULTS, help="where benchmark.json goes (default %(default)s)"
  )
  parser.add_argument(
    "--readme",
    type=Path,
    help="the README whose generated sections to rewrite; default benchmarks/README.md when "
    "--out is the default, since its tables name results/benchmark.json, else none",
  )
  parser.add_argument(
    "--report",
    action="store_true",
    help="run nothing: render the README's sections from --out's benchmark.json",
  )
  parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated")
  parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
  parser.add_argument("--hlo-dir", type=Path, help="also write each compiled step's HLO here")
  parser.add_argument("--rounds", type=int, help="timed rounds (default 9, or 3 with --quick)")
  parser.add_argument(
    "--compile-repeats", type=int, help="compilations per step (default 3, or 1 with --quick)"
  )
  args = parser.parse_args(argv)
  if args.readme is None and args.out.resolve() == RESULTS:
    args.readme = README

  json_path = args.out / "benchmark.json"
  if args.report:
    report = json.loads(json_path.read_text())
  else:
    command = ["python benchmarks/benchmark.py", *(sys.argv[1:] if argv is None else argv)]
    report = _run(args, parser, " ".join(command))
    args.out.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
  if args.readme is not None:
    write_readme(args.readme, report)
  print("\n".join(sections(report).values()))
  return report


if __name__ == "__main__":
  main()
