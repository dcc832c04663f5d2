"""Step time, compile time and memory of SAM/ASAM against SGD and optax.contrib.sam.

Run::

  python benchmarks/benchmark.py                          # every workload, ~11 min on 2 CPU cores
  python benchmarks/benchmark.py --quick --workloads mlp  # seconds: checks that it runs
  python benchmarks/benchmark.py --workloads wide_mlp --hlo-dir hlo/  # and dump the HLO

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
two gradients) tell what a method cannot skip.
Writes ``benchmark.json`` and ``benchmark.md`` to ``--out``.

To add a method, add a row to ``METHODS``: a name and a :class:`Method`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
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

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

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


def _cpu_model() -> str:
  try:
    cpuinfo = Path("/proc/cpuinfo").read_text()
  except OSError:
    return platform.processor() or platform.machine()
  models = [
    line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")
  ]
  return models[0] if models else platform.machine()


def _machine() -> dict[str, Any]:
  device = jax.devices()[0]
  return {
    "backend": jax.default_backend(),
    "device": device.device_kind,
    "device_count": jax.device_count(),
    "cpu_count": os.cpu_count(),
    "platform": platform.platform(),
    "processor": _cpu_model(),
    "python": platform.python_version(),
    "jax": jax.__version__,
    "optax": optax.__version__,
    "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
  }


def markdown(report: dict[str, Any]) -> str:
  """The results as markdown tables: one row per workload and method, then ratios."""
  lines = [
    "| workload | method | step (ms) | compile (s) | peak memory (MB) | extra memory (param copies) |",
    "|---|---|---:|---:|---:|---:|",
  ]
  for wname, w in report["workloads"].items():
    for name, r in w["methods"].items():
      mem = r["memory"]
      extra = w["ratios"].get(f"extra memory {name} (parameter copies)")
      lines.append(
        f"| {wname} | {name} | {r['step_ms']:.2f} | {r['lower_s'] + r['compile_s']:.2f} | "
        + (f"{mem['peak_bytes'] / 1e6:.1f}" if mem else "n/a")
        + " | "
        + (f"{extra:.2f}" if extra is not None else "")
        + " |"
      )
  labels = sorted({k for w in report["workloads"].values() for k in w["ratios"]}, key=_order)
  labels = [k for k in labels if not k.startswith("extra memory")]
  lines += ["", "| ratio | " + " | ".join(report["workloads"]) + " |"]
  lines.append("|---|" + "---:|" * len(report["workloads"]))
  for label in labels:
    cells = [w["ratios"].get(label) for w in report["workloads"].values()]
    lines.append(
      f"| {label} | " + " | ".join("" if c is None else f"{c:.2f}" for c in cells) + " |"
    )
  lines += [
    "",
    "| workload | parameters | parameters (MB) | XLA scratch, one gradient (MB) | two gradients in sequence (MB) | one read of the parameters (ms) | one gradient (ms) | the same inside lax.cond (ms) |",
    "|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for wname, w in report["workloads"].items():
    one, two = w["one_gradient_temp_bytes"], w["two_gradients_temp_bytes"]
    probe = w["cond_probe"]
    lines.append(
      f"| {wname} | {w['n_params']:,} | {w['param_bytes'] / 1e6:.2f} | "
      + (f"{one / 1e6:.1f} | {two / 1e6:.1f} |" if one is not None else "n/a | n/a |")
      + f" {w['read_ms']:.3f} | {probe['grad_ms']:.2f} | {probe['grad_in_cond_ms']:.2f} |"
    )
  m = report["machine"]
  lines += [
    "",
    f"{m['backend']} ({m['device']}, {m['cpu_count']} cores, {m['processor']}), "
    f"jax {m['jax']}, optax {m['optax']}; load average before "
    f"{_fmt_load(m['load_average'])}, after {_fmt_load(report['load_average_after'])}; "
    f"{'quick' if report['quick'] else 'full'} run, median of {report['rounds']} interleaved rounds.",
  ]
  return "\n".join(lines) + "\n"


def _order(label: str) -> tuple[int, str]:
  return (0 if label.startswith("step") else 1, label)


def _fmt_load(load):
  return "n/a" if load is None else "/".join(f"{x:.1f}" for x in load)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="few, short rounds: checks that it runs")
  parser.add_argument("--out", type=Path, default=RESULTS)
  parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated")
  parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
  parser.add_argument("--hlo-dir", type=Path, help="also write each compiled step's HLO here")
  parser.add_argument("--rounds", type=int, help="timed rounds (default 9, or 3 with --quick)")
  parser.add_argument(
    "--compile-repeats", type=int, help="compilations per step (default 3, or 1 with --quick)"
  )
  args = parser.parse_args(argv)

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
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "command": " ".join(
      ["python benchmarks/benchmark.py", *(sys.argv[1:] if argv is None else argv)]
    ),
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
  report["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None

  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "benchmark.json").write_text(json.dumps(report, indent=2) + "\n")
  table = markdown(report)
  (args.out / "benchmark.md").write_text(table)
  print(table)
  return report


if __name__ == "__main__":
  main()
