"""XLA:CPU runs a conv net's gradient many times slower inside a taken ``lax.cond`` branch.

A standalone reproduction (it needs only jax). It times the gradient of a small
conv net (3x3 convolutions, ReLU and 2x2 max-pooling on NHWC images) called
plainly, inside the taken branch of a ``lax.cond`` and of a ``lax.switch``,
and as the body of a ``while_loop`` run once, and, as a control, the loss
alone, plainly and inside a ``lax.cond``. For each it prints the
``dim_labels`` (dimension layouts) of the convolutions in the optimized HLO.

Outside a control-flow op every convolution is in the canonical layout
(``b01f_01io->b01f``: input NHWC, kernel HWIO) and runs as a YNNPACK fusion.
Inside one, the backward convolutions keep the layouts autodiff gave them
(``f01b_i01o->01bf`` for the kernel gradient, ``b01f_01oi->b01f`` for the
input gradient) and are emitted as XLA's generic loop nest. XLA:CPU's
``ConvCanonicalization`` pass only visits the entry computation
(``module->entry_computation()`` in xla/service/cpu/conv_canonicalization.cc),
so the convolutions in a conditional's branches or a loop's body are never
rewritten into the layout its fast kernels need. The forward convolutions are
already canonical, which is why only the gradient is slow.

Run::

  python benchmarks/xla_cpu_cond_repro.py                # 32x32x3, batch 128: about a minute
  python benchmarks/xla_cpu_cond_repro.py --sweep-flags  # and with each XLA:CPU flag in FLAGS
  python benchmarks/xla_cpu_cond_repro.py --batch 2 --size 8 --channels 4,8  # seconds
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

# XLA:CPU options that could plausibly touch convolutions, layouts or
# conditionals, each tried on the lax.cond variant by --sweep-flags.
FLAGS: tuple[tuple[str, str | bool], ...] = (
  ("xla_cpu_use_onednn", True),
  ("xla_cpu_experimental_onednn_custom_call", True),
  ("xla_cpu_use_xnnpack", True),
  ("xla_cpu_experimental_xnn_graph_fusion_mode", "XNN_GRAPH_FUSION_MODE_GREEDY"),
  ("xla_cpu_experimental_ynn_fusion_type", "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"),
  ("xla_cpu_use_fusion_emitters", False),
  ("xla_cpu_opt_preset", "CPU_OPT_PRESET_FAST_RUNTIME"),
  ("xla_cpu_scheduler_type", "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"),
  ("xla_cpu_enable_concurrency_optimized_scheduler", True),
  ("xla_cpu_copy_insertion_use_region_analysis", True),
  ("xla_cpu_enable_fast_math", True),
  ("xla_cpu_strict_dot_conv_math", True),
  ("xla_cpu_multi_thread_eigen", False),
)


def init(key: jax.Array, channels: Sequence[int]) -> list[jax.Array]:
  """3x3 HWIO kernels from 3 input channels through ``channels``."""
  sizes = [3, *channels]
  keys = jax.random.split(key, len(channels))
  return [
    jax.random.normal(k, (3, 3, c_in, c_out)) / (3 * c_in**0.5)
    for k, c_in, c_out in zip(keys, sizes[:-1], sizes[1:])
  ]


def loss(kernels: list[jax.Array], x: jax.Array) -> jax.Array:
  """Mean square of the features after conv3x3 + ReLU + 2x2 max-pool per kernel."""
  for w in kernels:
    x = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    x = jax.nn.relu(x)
    x = lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
  return jnp.mean(x**2)


def variants() -> dict[str, tuple[Callable, tuple]]:
  """The gradient, plainly and inside each control-flow op, and the loss alone as a control.

  Each comes with its extra arguments. The predicate, index and trip count are
  arguments, so XLA cannot fold the control flow away; the loop's body reads
  its carry, so the gradient cannot be hoisted out of it.
  """
  grad = jax.grad(loss)
  keep = lambda kernels, x: kernels
  return {
    "grad": (grad, ()),
    "grad in lax.cond": (lambda k, x, take: lax.cond(take, grad, keep, k, x), (True,)),
    "grad in lax.switch": (lambda k, x, index: lax.switch(index, [keep, grad], k, x), (1,)),
    "grad in while_loop": (lambda k, x, n: lax.fori_loop(0, n, lambda _, k: grad(k, x), k), (1,)),
    # The forward convolutions are canonical as written, inside a branch too.
    "loss": (loss, ()),
    "loss in lax.cond": (
      lambda k, x, take: lax.cond(take, loss, lambda k, x: jnp.zeros(()), k, x),
      (True,),
    ),
  }


def canonical(dim_labels: str) -> bool:
  """Whether ``dim_labels`` is the layout XLA:CPU's fast convolutions take: NHWC, HWIO."""
  lhs, rhs, out = re.fullmatch(r"(\w+)_(\w+)->(\w+)", dim_labels).groups()
  spatial = "".join(map(str, range(len(lhs) - 2)))
  return lhs == out == f"b{spatial}f" and rhs == f"{spatial}io"


def convolutions(hlo: str) -> list[tuple[str, bool]]:
  """Each convolution of an optimized HLO: its ``dim_labels``, and whether YNNPACK runs it."""
  ynn = set(re.findall(r"calls=%([\w.-]+).*\"kind\":\"__ynn_fusion\"", hlo))
  out, computation = [], None
  for line in hlo.splitlines():
    header = re.match(r"(?:ENTRY )?%([\w.-]+) \(", line)
    if header:
      computation = header.group(1)
    labels = re.search(r" convolution\(.*dim_labels=([\w>-]+)", line)
    if labels:
      out.append((labels.group(1), computation in ynn))
  return out


def describe(convs: list[tuple[str, bool]]) -> str:
  """How many convolutions have each layout, are canonical, and run in YNNPACK."""
  counts = collections.Counter(labels for labels, _ in convs)
  layouts = ", ".join(f"{n} x {labels}" for labels, n in counts.items())
  n_canonical = sum(canonical(labels) for labels, _ in convs)
  n_ynn = sum(in_ynn for _, in_ynn in convs)
  return f"{n_canonical}/{len(convs)} canonical, {n_ynn}/{len(convs)} in YNNPACK: {layouts}"


def interleaved_ms(calls: dict[str, tuple[Callable, tuple]], repeats: int) -> dict[str, float]:
  """Median milliseconds per call of each compiled function, timed in interleaved rounds.

  Each is called once to warm up, then once per round, so that a change in the
  machine's load hits all of them alike.
  """
  for fn, args in calls.values():
    jax.block_until_ready(fn(*args))
  times: dict[str, list[float]] = {name: [] for name in calls}
  for _ in range(repeats):
    for name, (fn, args) in calls.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - t0)
  return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def compare(cases: dict[str, tuple[Callable, tuple, dict | None]], repeats: int) -> None:
  """Compiles each ``(fn, args, compiler_options)``, times them interleaved, prints a table.

  One line per case: its milliseconds, their ratio to the first case's, and
  its convolutions' layouts; a case whose options XLA refuses says so.
  """
  calls, layouts = {}, {}
  for name, (fn, args, options) in cases.items():
    try:
      compiled = jax.jit(fn, compiler_options=options).lower(*args).compile()
    except jax.errors.JaxRuntimeError as e:
      print(f"{'refused':>20}  {name}: {str(e).splitlines()[0]}")
      continue
    calls[name] = (compiled, args)
    layouts[name] = describe(convolutions(compiled.as_text()))
  ms = interleaved_ms(calls, repeats)
  first = next(iter(ms))
  print(f"{'ms':>10} {'x ' + first:>9}  case: convolutions")
  for name, t in ms.items():
    print(f"{t:10.1f} {t / ms[first]:9.2f}  {name}: {layouts[name]}", flush=True)


def cpu() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
  except OSError:
    models = []
  return f"{models[0] if models else platform.processor()}, {os.cpu_count()} cores"


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--size", type=int, default=32, help="image height and width")
  parser.add_argument("--channels", default="32,64,128", help="comma-separated, one per conv")
  parser.add_argument(
    "--repeats", type=int, default=3, help="timed rounds of one call each, the median is printed"
  )
  parser.add_argument(
    "--sweep-flags", action="store_true", help="also time the lax.cond case with each of FLAGS"
  )
  args = parser.parse_args(argv)

  channels = [int(c) for c in args.channels.split(",")]
  kernels = init(jax.random.key(0), channels)
  x = jax.random.normal(jax.random.key(1), (args.batch, args.size, args.size, 3))
  load = "/".join(f"{v:.1f}" for v in os.getloadavg())
  print(f"jax {jax.__version__}, jaxlib {jax.lib.__version__}, {jax.default_backend()} backend")
  print(f"CPU: {cpu()}; load average {load}")
  print(
    f"a conv net of {len(channels)} x (conv3x3 + relu + maxpool2), channels 3-"
    f"{'-'.join(map(str, channels))}, on {args.size}x{args.size}x3, batch {args.batch}; "
    f"median of {args.repeats} interleaved rounds"
  )
  cases = {name: (fn, (kernels, x, *extra), None) for name, (fn, extra) in variants().items()}
  compare(cases, args.repeats)
  if args.sweep_flags:
    print("\nthe lax.cond case with one XLA:CPU flag each:")
    fn, cond_args, _ = cases["grad in lax.cond"]
    flagged = {f"... {flag}={value}": (fn, cond_args, {flag: value}) for flag, value in FLAGS}
    compare({name: cases[name] for name in ("grad", "grad in lax.cond")} | flagged, args.repeats)


if __name__ == "__main__":
  main()
