"""Step time, compile time, kernel count and memory of SAM and its family against SGD and optax.

Run::

  python benchmarks/benchmark.py                          # every workload, ~35 min on 2 CPU cores
  python benchmarks/benchmark.py --quick --workloads mlp --out /tmp/bench  # seconds: checks that it runs
  python benchmarks/benchmark.py --workloads leaves,transformer  # the compile-heavy workloads
  python benchmarks/benchmark.py --workloads wide_mlp --hlo-dir hlo/  # and dump the HLO
  python benchmarks/benchmark.py --report                 # only rewrite benchmarks/README.md's tables

Every method is a cycle of jitted train steps ``(params, opt_state, batch) ->
(params, opt_state, loss)`` that take the clean gradient and call the
transformation, with params and optimizer state donated. All methods of a
workload are timed in the same process in interleaved rounds (one measurement
of each method per round, each from a copy of the initial weights, after a
warm-up), and the median over rounds is reported, so that a change in machine
load hits every method alike. Compile time is ``lower()`` plus ``compile()``
of a fresh jit, the median of several (once on the compile-heavy workloads);
memory is the compiled step's ``memory_analysis()``; the kernel and
instruction counts are read from the compiled HLO (:func:`hlo_stats`). Cheap
probes per workload (one read of the parameters, one gradient, the same
gradient inside ``lax.cond``, XLA's scratch for one and two gradients) give the
floors the ``TARGETS`` are set against.

Writes ``benchmark.json`` to ``--out`` and renders the tables of
``benchmarks/README.md`` from it, between its ``<!-- generated NAME ... -->``
and ``<!-- end generated NAME -->`` markers.

To add a method, add a row to ``METHODS`` (and its name to the workloads'
method lists); to add a target, a :class:`Target` to ``TARGETS`` or a
:class:`CompileTarget` to ``COMPILE_TARGETS``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import platform
import re
import statistics
import sys
import time
from collections import Counter
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
# p = inf moves every weight by rho: on the leaves workloads' 2M weights of
# ~0.005, SAM's 0.05 would move each weight by ten times its size.
SAM_INF_RHO = 1e-4
# Fisher SAM's radius and Fisher weight, the paper's CIFAR defaults.
FISHER_RHO, FISHER_ETA = 0.1, 1.0
# Friendly SAM: sigma, the weight of the running mean; lmbda, its decay.
FSAM_SIGMA, FSAM_LAMBDA = 1.0, 0.9
# ESAM: each leaf perturbed with probability beta; gamma = 1 keeps the whole
# batch, so the loss closure stays the scalar one every method shares.
ESAM_BETA, ESAM_GAMMA = 0.5, 1.0
# Bayesian SAM: the radius of its ascent in the posterior's metric, and the
# number of examples the posterior is over (a CIFAR-size data set).
BSAM_RHO, BSAM_NUM_DATA = 0.01, 50_000
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


def _chained(make: Callable[[], optax.GradientTransformation]) -> Method:
  """A transformation that goes first in a chain with the shared outer optimizer."""
  return Method(lambda: optax.chain(make(), _base()))


METHODS: dict[str, Method] = {
  "sgd": Method(_base, lambda _: {}),
  "sam": _chained(lambda: asam_jax.sam(rho=SAM_RHO)),
  # The other balls: compile cost must grow linearly in the leaves for every p.
  "sam_pinf": _chained(lambda: asam_jax.sam(rho=SAM_INF_RHO, p=math.inf)),
  "sam_p1": _chained(lambda: asam_jax.sam(rho=SAM_RHO, p=1)),
  "sam_p3": _chained(lambda: asam_jax.sam(rho=SAM_RHO, p=3)),
  "asam_p2": _chained(lambda: asam_jax.asam(rho=ASAM_RHO, eta=ASAM_ETA)),
  "asam_pinf": _chained(lambda: asam_jax.asam(rho=ASAM_INF_RHO, eta=ASAM_ETA, p=math.inf)),
  # The variants: GSAM pays two gradients like SAM; LookSAM 1 + 1/k; Momentum-SAM
  # and random SAM one (random SAM's clean pass is only the step's own).
  "gsam": _chained(lambda: asam_jax.gsam(rho=SAM_RHO, alpha=0.01)),
  # One compiled step whose lax.cond runs the full step every k-th call.
  "looksam_k5": Method(_looksam, cycle=({},) * LOOKSAM_K),
  # A full and a reuse step, the branch chosen at trace time: no conditional.
  "looksam_k5_static": Method(
    _looksam, cycle=({"full_step": True},) + ({"full_step": False},) * (LOOKSAM_K - 1)
  ),
  "momentum_sam": Method(
    lambda: asam_jax.momentum_sam(LEARNING_RATE, rho=MSAM_RHO, momentum=MOMENTUM), lambda _: {}
  ),
  "random_sam": _chained(lambda: asam_jax.random_sam(jax.random.key(0), rho=SAM_RHO)),
  # Two gradients each, like SAM.
  "fisher_sam": _chained(lambda: asam_jax.fisher_sam(FISHER_RHO, FISHER_ETA)),
  "friendly_sam": _chained(lambda: asam_jax.friendly_sam(SAM_RHO, FSAM_SIGMA, FSAM_LAMBDA)),
  "esam": _chained(lambda: asam_jax.esam(SAM_RHO, ESAM_BETA, ESAM_GAMMA, key=jax.random.key(0))),
  # The optimizer itself, like Momentum-SAM: its update takes both gradients
  # with loss_fn (at a noisy sample and at the ascent) and ignores the clean one.
  "bayesian_sam": Method(
    lambda: asam_jax.bayesian_sam(
      LEARNING_RATE, BSAM_RHO, BSAM_NUM_DATA, key=jax.random.key(0), b1=MOMENTUM
    )
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

# Which methods each kind of workload runs (a run's --methods replaces them).
_P_VARIANTS = ("sam_pinf", "sam_p1", "sam_p3")
STANDARD_METHODS = tuple(m for m in METHODS if m not in _P_VARIANTS)
LEAVES_METHODS = ("sgd", "optax_sam", "sam", "asam_p2", *_P_VARIANTS, "gsam")
TRANSFORMER_METHODS = (
  "sgd",
  "optax_sam",
  "sam",
  "asam_p2",
  "gsam",
  "fisher_sam",
  "friendly_sam",
  "esam",
  "bayesian_sam",
)


# --- workloads: JAX models and one NNX model, random data (only the cost matters) ---


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


def _classification_batch(input_shape: tuple[int, ...], n_classes: int = 10):
  def batch(key):
    kx, ky = jax.random.split(key)
    return (
      jax.random.normal(kx, input_shape),
      jax.random.randint(ky, input_shape[:1], 0, n_classes),
    )

  return batch


# The leaves workloads: one residual tanh MLP of about LEAVES_PARAMS weights,
# cut into more and more layers: x <- x + tanh(x W + b), a squared error to a
# random target. The residual and W's scale 1/sqrt(width * layers) keep the
# activations and the gradients of every layer in range at any depth (no
# denormal floats, which are slow on CPUs, and no vanishing gradient).
LEAVES_PARAMS = 2_000_000
LEAVES_BATCH = 16
QUICK_LEAVES_PARAMS = 20_000


def _leaves_width(n_leaves: int, total: int) -> int:
  return round(math.sqrt(total / (n_leaves // 2)))


def _leaves_init(layers: int, width: int, scan: bool):
  def init(key):
    keys = jax.random.split(key, layers)
    scale = 1 / math.sqrt(width * layers)
    ws = [jax.random.normal(k, (width, width)) * scale for k in keys]
    if scan:  # the same weights, stacked: (layers, width, width) and (layers, width)
      return {"w": jnp.stack(ws), "b": jnp.zeros((layers, width))}
    return [{"w": w, "b": jnp.zeros(width)} for w in ws]

  return init


def _residual(x, layer):
  return x + jnp.tanh(x @ layer["w"] + layer["b"])


def _leaves_loss(params, batch):
  x, y = batch
  for layer in params:
    x = _residual(x, layer)
  return jnp.mean((x - y) ** 2)


def _scan_loss(params, batch):
  x, y = batch
  x, _ = jax.lax.scan(lambda x, layer: (_residual(x, layer), None), x, params)
  return jnp.mean((x - y) ** 2)


def _regression_batch(width: int, batch_size: int):
  def batch(key):
    kx, ky = jax.random.split(key)
    return jax.random.normal(kx, (batch_size, width)), jax.random.normal(ky, (batch_size, width))

  return batch


@dataclasses.dataclass(frozen=True)
class Workload:
  """One model, its data, the methods run on it and how.

  Attributes:
    description: for the log and the JSON.
    init: ``key -> params``.
    loss: ``(params, batch) -> scalar``.
    batch: ``key -> batch``, one random batch reused by every step.
    batch_size: the examples per batch.
    methods: the names in ``METHODS`` it runs unless ``--methods`` says otherwise.
    family: ``standard``, ``leaves`` or ``transformer``: which tables it goes to.
    compile_only: compile each method once, time no step and run no probe.
    compile_repeats: compilations per method (else the run's default).
    rounds: timed rounds (else the run's default).
    round_seconds: the target length of each method's part of a round.
    scan: the layers are stacked and run with ``lax.scan``.
    layers: the number of layers, for the leaves tables.
    quick: the small version ``--quick`` runs instead, if any.
  """

  description: str
  init: Callable[[jax.Array], Any]
  loss: Callable[[Any, Any], jax.Array]
  batch: Callable[[jax.Array], Any]
  batch_size: int
  methods: tuple[str, ...] = STANDARD_METHODS
  family: str = "standard"
  compile_only: bool = False
  compile_repeats: int | None = None
  rounds: int | None = None
  round_seconds: float | None = None
  scan: bool = False
  layers: int | None = None
  quick: Workload | None = None


def _leaves(n_leaves: int, *, scan: bool = False, compile_only: bool = False) -> Workload:
  """A leaves workload of ``n_leaves`` leaves (as a scan: the same layers stacked), and its quick one."""

  def make(n: int, total: int, quick: Workload | None) -> Workload:
    layers, width = n // 2, _leaves_width(n, total)
    shape = f"{layers} layers as a lax.scan over (L, d, d) and (L, d)" if scan else f"{n:,} leaves"
    return Workload(
      f"residual tanh MLP, {shape}, width {width}, "
      f"{layers * (width * width + width):,} parameters, batch {LEAVES_BATCH}",
      _leaves_init(layers, width, scan),
      _scan_loss if scan else _leaves_loss,
      _regression_batch(width, LEAVES_BATCH),
      LEAVES_BATCH,
      methods=LEAVES_METHODS,
      family="leaves",
      compile_only=compile_only,
      # Compiling each method at 1,024 leaves takes ~15-20 s on 2 cores, at
      # 2,000 about a minute: once is enough to see a 1.2x difference.
      compile_repeats=1,
      rounds=5,
      round_seconds=0.2,
      scan=scan,
      layers=layers,
      quick=quick,
    )

  # --quick keeps the ladder of leaf counts but not the size: 4, 8, 16 and 32 leaves.
  quick_leaves = {8: 4, 128: 8, 1024: 16, 2000: 32}[n_leaves]
  return make(n_leaves, LEAVES_PARAMS, make(quick_leaves, QUICK_LEAVES_PARAMS, None))


@functools.cache
def _lm_class():
  """The transformer's NNX module class, built on first use so that flax is imported only then."""
  from flax import nnx

  class Block(nnx.Module):
    def __init__(self, d: int, heads: int, rngs: nnx.Rngs):
      self.ln1 = nnx.LayerNorm(d, rngs=rngs)
      self.attn = nnx.MultiHeadAttention(heads, d, decode=False, keep_rngs=False, rngs=rngs)
      self.ln2 = nnx.LayerNorm(d, rngs=rngs)
      self.up = nnx.Linear(d, 4 * d, rngs=rngs)
      self.down = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x, mask):
      x = x + self.attn(self.ln1(x), mask=mask)
      return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))

  class LM(nnx.Module):
    """A causal language model: tied token embedding, learned positions, pre-LayerNorm blocks."""

    def __init__(self, vocab: int, d: int, heads: int, blocks: int, seq: int, rngs: nnx.Rngs):
      self.embed = nnx.Embed(vocab, d, rngs=rngs)
      self.pos = nnx.Param(jax.random.normal(rngs.params(), (seq, d)) * 0.02)
      self.blocks = nnx.List([Block(d, heads, rngs) for _ in range(blocks)])
      self.ln = nnx.LayerNorm(d, rngs=rngs)

    def __call__(self, tokens):
      x = self.embed(tokens) + self.pos[...][: tokens.shape[1]]
      mask = nnx.make_causal_mask(tokens)
      for block in self.blocks:
        x = block(x, mask)
      # Tied: the output projection is the token embedding's transpose.
      return self.embed.attend(self.ln(x))

  return LM


class _TransformerLM:
  """The functional wrapper the step needs: params a plain dict, the model merged in the loss."""

  def __init__(self, vocab: int, d: int, heads: int, blocks: int, seq: int):
    self.config = (vocab, d, heads, blocks, seq)
    self._graphdef = None

  def _model(self, key):
    from flax import nnx

    return _lm_class()(*self.config, rngs=nnx.Rngs(key))

  def _split(self, model):
    from flax import nnx

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
      raise ValueError("the benchmark's model must hold parameters only")
    self._graphdef = graphdef
    return nnx.to_pure_dict(params)

  def init(self, key):
    return self._split(self._model(key))

  def loss(self, params, tokens):
    from flax import nnx

    if self._graphdef is None:
      self._split(nnx.eval_shape(lambda: self._model(jax.random.key(0))))
    model = nnx.merge(self._graphdef, params)
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  def batch(self, batch_size: int):
    vocab, *_, seq = self.config
    return lambda key: jax.random.randint(key, (batch_size, seq + 1), 0, vocab)


def _transformer(vocab, d, heads, blocks, seq, batch_size, quick=None) -> Workload:
  lm = _TransformerLM(vocab, d, heads, blocks, seq)
  return Workload(
    f"causal LM, {blocks} pre-LayerNorm blocks (nnx.MultiHeadAttention, {heads} heads, MLP "
    f"{d}-{4 * d}-{d}), width {d}, vocabulary {vocab} with tied embeddings, "
    f"{seq} tokens, batch {batch_size}",
    lm.init,
    lm.loss,
    lm.batch(batch_size),
    batch_size,
    methods=TRANSFORMER_METHODS,
    family="transformer",
    compile_repeats=1,
    rounds=5,
    round_seconds=0.2,
    quick=quick,
  )


WORKLOADS: dict[str, Workload] = {
  "mlp": Workload(
    "MLP 40-128-128-10, MNIST-1D size, batch 128",
    _mlp_init([40, 128, 128, 10]),
    _mlp_loss,
    _classification_batch((128, 40)),
    128,
  ),
  "cnn1d": Workload(
    "1-D CNN 3x(conv5+pool) 32-64-64, MNIST-1D size, batch 128",
    _conv_init((5,), [1, 32, 64, 64], 10, 5 * 64),
    _conv_loss(("NWC", "WIO", "NWC")),
    _classification_batch((128, 40, 1)),
    128,
  ),
  "conv32": Workload(
    "CNN 3x(conv3x3+pool) 32-64-128 on 32x32x3, batch 128 (compute-bound)",
    _conv_init((3, 3), [3, 32, 64, 128], 10, 4 * 4 * 128),
    _conv_loss(("NHWC", "HWIO", "NHWC")),
    _classification_batch((128, 32, 32, 3)),
    128,
  ),
  "wide_mlp": Workload(
    "MLP 1024-4096-4096-10, 21M parameters, batch 16 (parameter-bound)",
    _mlp_init([1024, 4096, 4096, 10]),
    _mlp_loss,
    _classification_batch((16, 1024)),
    16,
  ),
  "leaves_8": _leaves(8),
  "leaves_128": _leaves(128),
  "leaves_1024": _leaves(1024),
  # Compiled only: does every method compile at 2,000 leaves, and how fast.
  "leaves_2000": _leaves(2000, compile_only=True),
  # The 1,024-leaf model's layers stacked and run with lax.scan: 2 leaves.
  "leaves_1024_scan": _leaves(1024, scan=True),
  # 12 blocks of 16 leaves, the embedding, the positions and the final LayerNorm: 196 leaves.
  "transformer": _transformer(512, 128, 4, 12, 64, 8, quick=_transformer(64, 32, 2, 2, 16, 4)),
}
# Names that stand for several workloads in --workloads.
WORKLOAD_GROUPS = {
  "standard": [n for n, w in WORKLOADS.items() if w.family == "standard"],
  "leaves": [n for n, w in WORKLOADS.items() if w.family == "leaves"],
}


# --- the compiled HLO: kernels, instructions, copies ---

# Instructions that launch no work of their own: arguments, literals, tuples
# and views of buffers (bitcast, get-tuple-element), and scheduling hints.
NOT_KERNELS = frozenset(
  {
    "parameter",
    "constant",
    "tuple",
    "get-tuple-element",
    "bitcast",
    "opt-barrier",
    "after-all",
    "add-dependency",
    "domain",
    "partition-id",
    "replica-id",
    "async-update",
    "async-done",
  }
)
# Control flow: not kernels themselves; the computations they run are counted
# instead, each once per instruction that calls it (however often it runs).
CONTROL_FLOW = {
  "while": ("condition", "body"),
  "conditional": ("branch_computations", "true_computation", "false_computation"),
  "call": ("to_apply",),
  "async-start": ("calls",),
}
_HEADER = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)\s*\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?[^\s=]+\s+=\s+(.*)$")
_OPCODE = re.compile(r"\s*([a-z][a-z0-9-]*)\(")
_SHAPE = re.compile(r"\b[a-z]+[0-9]*\[([0-9,]*)\]")


def _split_type(rest: str) -> tuple[str, str]:
  """An instruction's result type (a tuple's in balanced parentheses) and what follows it."""
  if rest.startswith("("):
    depth = 0
    for i, c in enumerate(rest):
      depth += (c == "(") - (c == ")")
      if depth == 0:
        return rest[: i + 1], rest[i + 1 :]
  head, _, tail = rest.partition(" ")
  return head, " " + tail


def _called(attributes: str, names: Sequence[str]) -> list[str]:
  """The computations an instruction calls through the attributes ``names``."""
  attributes = attributes.split(", metadata=")[0]
  out = []
  for name in names:
    m = re.search(rf"\b{name}=(\{{[^}}]*\}}|%?[^\s,{{}}]+)", attributes)
    if m:
      out += [c.strip().lstrip("%") for c in m.group(1).strip("{}").split(",") if c.strip()]
  return out


def _parse_hlo(text: str) -> tuple[str, dict[str, list[tuple[str, str, str]]]]:
  """The entry computation's name, and every computation's ``(opcode, type, attributes)``."""
  computations: dict[str, list[tuple[str, str, str]]] = {}
  entry, current = None, None
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = header.group(2)
      computations[current] = []
      if header.group(1):
        entry = current
    elif line.startswith("}"):
      current = None
    elif current is not None:
      m = _INSTRUCTION.match(line)
      if m:
        type_, rest = _split_type(m.group(1))
        op = _OPCODE.match(rest)
        computations[current].append((op.group(1) if op else "?", type_, rest))
  if entry is None:
    raise ValueError("no ENTRY computation in this HLO text")
  return entry, computations


def hlo_stats(text: str, param_shapes: Sequence[Sequence[int]] = ()) -> dict[str, Any]:
  """Counts in an optimized HLO module (``jax.jit(f).lower(...).compile().as_text()``).

  A *kernel* is an instruction that launches work when the program runs: an
  instruction of the entry computation, or of a computation that a ``while``
  (condition and body), a ``conditional`` (every branch), a ``call`` or an
  ``async-start`` runs, that is not in ``NOT_KERNELS`` (parameters, constants,
  tuples, get-tuple-element, bitcasts, optimization barriers) nor control
  flow itself. So a fusion counts once, whatever it fuses; a dot, a
  convolution, a custom call, a copy, a collective, or a reduce or concatenate
  left outside any fusion counts once each; a loop body counts once however
  many times it runs, and every branch of a conditional counts although one
  runs. Computations applied by other instructions (a fusion's fused
  computation, a reduce's reducer) are not walked.

  Args:
    text: the module's text.
    param_shapes: the shapes of the parameter leaves, for ``param_sized_writes``.

  Returns:
    ``kernels``; of them ``kernels_in_loops`` and ``kernels_in_branches``;
    ``copies`` (kernels whose opcode is ``copy``: materialized copies of a
    buffer); ``fusions``; ``param_sized_writes``, the kernels' result arrays
    (a tuple's elements each) with the shape of a parameter leaf, an estimate
    of the parameter-sized passes (an activation of the same shape counts
    too); ``whiles`` and ``conditionals``; ``instructions``, every
    instruction of every computation of the module, fused ones included (what
    the compiler works through); and ``kernel_opcodes``, the kernels by opcode.
  """
  entry, computations = _parse_hlo(text)
  shapes = {tuple(s) for s in param_shapes if len(s)}
  opcodes: Counter[str] = Counter()
  counts = Counter()

  def walk(name: str, in_loop: bool, in_branch: bool) -> None:
    for op, type_, rest in computations[name]:
      if op in CONTROL_FLOW:
        counts[{"while": "whiles", "conditional": "conditionals"}.get(op, "calls")] += 1
        for callee in _called(rest, CONTROL_FLOW[op]):
          walk(callee, in_loop or op == "while", in_branch or op == "conditional")
        continue
      if op in NOT_KERNELS:
        continue
      opcodes[op] += 1
      counts["kernels_in_loops"] += in_loop
      counts["kernels_in_branches"] += in_branch
      for dims in _SHAPE.findall(type_):
        counts["param_sized_writes"] += tuple(int(d) for d in dims.split(",") if d) in shapes

  walk(entry, False, False)
  return {
    "kernels": sum(opcodes.values()),
    "kernels_in_loops": counts["kernels_in_loops"],
    "kernels_in_branches": counts["kernels_in_branches"],
    "copies": opcodes["copy"],
    "fusions": opcodes["fusion"],
    "param_sized_writes": counts["param_sized_writes"],
    "whiles": counts["whiles"],
    "conditionals": counts["conditionals"],
    "instructions": sum(len(c) for c in computations.values()),
    "kernel_opcodes": dict(opcodes.most_common()),
  }


def _sum_stats(stats: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """The counts of several compiled steps together (LookSAM's static pair)."""
  out: dict[str, Any] = {k: sum(s[k] for s in stats) for k in stats[0] if k != "kernel_opcodes"}
  out["kernel_opcodes"] = dict(sum((Counter(s["kernel_opcodes"]) for s in stats), Counter()))
  return out


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


def _gradient_temp_bytes(loss, params, batch, one=None) -> dict[str, int | None]:
  """XLA's scratch memory for one gradient, and for two in sequence (no optimizer).

  The difference is what any two-gradient method pays over SGD before its own
  overhead, since XLA need not reuse the first pass's activation buffers.
  ``one``: the gradient already compiled, if it is.
  """
  grad = jax.grad(loss)
  two = lambda p, b: grad(jax.tree.map(jnp.add, p, grad(p, b)), b)
  out = {}
  for label, fn in (("one_gradient", grad), ("two_gradients", two)):
    compiled = one if fn is grad and one is not None else jax.jit(fn).lower(params, batch).compile()
    memory = _memory(compiled)
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


def _cond_probe(loss, params, batch) -> tuple[Any, dict[str, float]]:
  """Milliseconds for one gradient, plainly and inside a taken ``lax.cond`` branch.

  LookSAM's skipped steps need a real conditional; this measures what the
  backend charges for running the gradient inside one (benchmarks/xla_cpu_cond_repro.py).
  Returns the compiled gradient too, which :func:`_gradient_temp_bytes` reuses.
  """
  grad = jax.jit(jax.grad(loss)).lower(params, batch).compile()
  in_cond = jax.jit(lambda p, b, take: jax.lax.cond(take, jax.grad(loss), lambda p, b: p, p, b))
  return grad, {
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
  """Compiles and times every method on ``workload``, interleaved (only compiles if compile-only)."""
  key_params, key_batch = jax.random.split(jax.random.key(0))
  params = workload.init(key_params)
  batch = workload.batch(key_batch)
  param_shapes = [jnp.shape(x) for x in jax.tree.leaves(params)]
  txs = {name: method.make() for name, method in methods.items()}
  starts = {name: (params, tx.init(params)) for name, tx in txs.items()}
  results = {name: {"lower_s_rounds": [], "compile_s_rounds": []} for name in methods}
  compiled = {}
  # A fresh jit per repeat, since jax caches both lowering and compilation.
  for repeat in range(compile_repeats):
    for name, method in methods.items():
      compiled[name], lower_s, compile_s = _compile(
        method, txs[name], workload.loss, starts[name], batch
      )
      results[name]["lower_s_rounds"].append(lower_s)
      results[name]["compile_s_rounds"].append(compile_s)
      if repeat == 0:  # progress: the compile-heavy workloads take minutes
        print(f"  {name}: lowered in {lower_s:.2f} s, compiled in {compile_s:.2f} s", flush=True)
  cycles = {}
  for name, r in results.items():
    r["lower_s"] = statistics.median(r["lower_s_rounds"])
    r["compile_s"] = statistics.median(r["compile_s_rounds"])
    memories = [_memory(c) for c in compiled[name]]
    # The largest, since the steps of a cycle run one at a time.
    r["memory"] = None if None in memories else max(memories, key=lambda m: m["peak_bytes"])
    texts = [c.as_text() for c in compiled[name]]
    # Every step the cycle compiles, as its compile time does.
    r["hlo"] = _sum_stats([hlo_stats(t, param_shapes) for t in texts])
    distinct, index = _distinct(methods[name].cycle)
    cycles[name] = [compiled[name][i] for i in index]
    if hlo_dir is not None:
      for static, text in zip(distinct, texts):
        suffix = "".join(f"_{k}={v}" for k, v in static.items())
        (hlo_dir / f"{workload_name}_{name}{suffix}.hlo.txt").write_text(text)

  out = {
    "description": workload.description,
    "family": workload.family,
    "n_params": sum(x.size for x in jax.tree.leaves(params)),
    "n_leaves": len(param_shapes),
    "scan": workload.scan,
    "layers": workload.layers,
    "param_bytes": _tree_bytes(params),
    "batch_size": workload.batch_size,
    "compile_only": workload.compile_only,
    "compile_repeats": compile_repeats,
  }
  if workload.compile_only:
    return {**out, "methods": results, "ratios": _ratios(results, out["param_bytes"], workload)}

  for r in results.values():
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

  grad, cond_probe = _cond_probe(workload.loss, params, batch)
  return {
    **out,
    "steps_per_round": steps,
    "rounds": rounds,
    "methods": results,
    "ratios": _ratios(results, out["param_bytes"], workload),
    **_gradient_temp_bytes(workload.loss, params, batch, one=grad),
    "read_ms": _read_ms(params),
    "cond_probe": cond_probe,
  }


def _ratios(
  results: dict[str, dict[str, Any]], param_bytes: int, workload: Workload
) -> dict[str, float]:
  """Ratios of step time, compile time, kernels and instructions between methods.

  On the standard workloads: SAM/SGD, ASAM/SAM, ours/optax and each variant
  against its reference for time, compile time against SGD, SAM's and ASAM's
  kernels against optax's, and memory against SGD. On the others (leaves,
  transformer): every method against ``optax_sam`` and ``sgd``.
  """
  out = {}

  def ratio(label, num, den, key):
    if num in results and den in results:
      # Not timed (compile-only), or no HLO counts: no ratio.
      with contextlib.suppress(KeyError, TypeError):
        out[label] = key(results[num]) / key(results[den])

  step = lambda r: r["step_ms"]
  compile_s = lambda r: r["lower_s"] + r["compile_s"]
  kernels = lambda r: r["hlo"]["kernels"]
  instructions = lambda r: r["hlo"]["instructions"]
  if "sgd" in results and results["sgd"]["memory"]:
    base = results["sgd"]["memory"]["peak_bytes"]
    for name, r in results.items():
      if name != "sgd" and r["memory"]:
        out[f"extra memory {name} (parameter copies)"] = (
          r["memory"]["peak_bytes"] - base
        ) / param_bytes
  if workload.family != "standard":
    for name in results:
      for reference in ("optax_sam", "sgd"):
        if name != reference:
          ratio(f"step {name}/{reference}", name, reference, step)
      if name != "optax_sam":
        ratio(f"compile {name}/optax_sam", name, "optax_sam", compile_s)
        ratio(f"kernels {name}/optax_sam", name, "optax_sam", kernels)
        ratio(f"instructions {name}/optax_sam", name, "optax_sam", instructions)
    return out
  ratio("step sam/sgd", "sam", "sgd", step)
  for name in ("asam_p2", "asam_pinf", "gsam", "fisher_sam", "friendly_sam", "esam"):
    ratio(f"step {name}/sam", name, "sam", step)
  ratio("step sam/optax_sam", "sam", "optax_sam", step)
  for name in ("looksam_k5", "looksam_k5_static", "momentum_sam", "random_sam", "bayesian_sam"):
    ratio(f"step {name}/sgd", name, "sgd", step)
  for name in results:
    if name != "sgd":
      ratio(f"compile {name}/sgd", name, "sgd", compile_s)
  ratio("compile sam/optax_sam", "sam", "optax_sam", compile_s)
  for name in ("sam", "asam_p2"):
    ratio(f"kernels {name}/optax_sam", name, "optax_sam", kernels)
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
    floor: the value of the work the method cannot skip, from the probes
      (None where there is no estimate).
    unit: written after the result; bound and floor are in the same unit.
    paired: the methods whose per-round step times give the spread of a
      time ratio (rounds are interleaved, so round i of both ran side by side).
  """

  label: str
  workloads: tuple[str, ...]
  result: Callable[[dict[str, Any]], float]
  bound: Callable[[dict[str, Any]], float]
  floor: Callable[[dict[str, Any]], float] | None
  unit: str
  paired: tuple[str, str] | None = None


ALL_WORKLOADS = tuple(WORKLOAD_GROUPS["standard"])
LEAVES_WORKLOADS = tuple(WORKLOAD_GROUPS["leaves"])
TIMED_LEAVES = tuple(n for n in LEAVES_WORKLOADS if not WORKLOADS[n].compile_only)


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
  # The deep MLPs are parameter-bound too (2M weights, batch 16).
  _time_target("ASAM p = 2", TIMED_LEAVES, "asam_p2", "sam", _step_ms("sam", reads=1), bound=1.06),
  # Parity: optax's step does the same work, so the floor is any SAM's.
  _time_target(
    "ours",
    (*ALL_WORKLOADS, *TIMED_LEAVES, "transformer"),
    "sam",
    "optax_sam",
    _step_ms("sgd", grads=1),
    bound=1.0,
  ),
  # GSAM's <g, g_p> reads both gradients, ||g_p|| g_p again, and its combination
  # reads g beside g_p: four reads more than SAM (and g stays alive meanwhile).
  _time_target("GSAM", ALL_WORKLOADS, "gsam", "sam", _step_ms("sam", reads=4), slack=1.05),
  # The bound, measured side by side with SAM.
  _time_target("GSAM", ("wide_mlp",), "gsam", "sam", _step_ms("sam", reads=4), bound=1.4),
  # Fisher SAM's T = (1 + eta g^2)^-1/2 is a function of g, which the norm and
  # the perturbation read anyway: SAM's passes, with more arithmetic in each.
  *(
    _time_target("Fisher SAM", workloads, "fisher_sam", "sam", _step_ms("sam"), bound=bound)
    for bound, workloads in ((1.06, ("wide_mlp",)), (1.02, ("cnn1d", "conv32", "transformer")))
  ),
  # Friendly SAM's direction g - sigma m reads m in the norm and again in the
  # perturbation, where the new m is written: SAM plus a read and a write of m.
  _time_target(
    "Friendly SAM",
    (*ALL_WORKLOADS, "transformer"),
    "friendly_sam",
    "sam",
    _step_ms("sam", reads=2),
    slack=1.05,
  ),
  # With gamma = 1 ESAM is SAM on a random half of the leaves: the same two
  # gradients (the second over every leaf) and the same passes over g.
  _time_target(
    f"ESAM γ = {ESAM_GAMMA:g}",
    (*ALL_WORKLOADS, "transformer"),
    "esam",
    "sam",
    _step_ms("sam"),
    bound=1.05,
  ),
  # Bayesian SAM draws one normal number per weight and takes its two gradients
  # (at the noisy sample and at the ascent): random SAM's step (one draw, one
  # gradient, the clean pass dropped) plus a gradient, and the precision s is
  # read and written.
  _time_target(
    "Bayesian SAM",
    ALL_WORKLOADS,
    "bayesian_sam",
    "sgd",
    _step_ms("random_sam", reads=2, grads=1),
    slack=1.05,
  ),
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
  # reuse every activation buffer); SAM may add one parameter-sized buffer. On
  # the deep MLPs the activations are small, so a parameter-sized buffer shows.
  _scratch_target(
    "SAM",
    (*ALL_WORKLOADS, *TIMED_LEAVES, "transformer"),
    "sam",
    lambda w: w["two_gradients_temp_bytes"] / 1e6,
    copies=1,
  ),
  # Parity in memory too: optax's step holds the same buffers (give or take a
  # few scalars: 5% of a parameter copy).
  Target(
    "SAM scratch ≤ optax_sam's + 0.05 parameter copy",
    (*ALL_WORKLOADS, *TIMED_LEAVES, "leaves_2000", "transformer"),
    result=_temp_mb("sam"),
    bound=lambda w: _temp_mb("optax_sam")(w) + 0.05 * w["param_bytes"] / 1e6,
    floor=_temp_mb("optax_sam"),
    unit=" MB",
  ),
  _scratch_target(
    "ASAM p = 2", ("wide_mlp", *TIMED_LEAVES), "asam_p2", _temp_mb("sam"), slack=1.05
  ),
  _scratch_target("ASAM p = ∞", ("wide_mlp",), "asam_pinf", _temp_mb("sam"), slack=1.05),
)


@dataclasses.dataclass(frozen=True)
class CompileTarget:
  """``method``'s kernels or compile time at most ``bound`` x optax_sam's, on each workload.

  Attributes:
    label: the method, as the table shows it.
    method: its name in ``METHODS``.
    metric: ``kernels`` (from the compiled HLO) or ``compile`` (lower + compile, s).
    workloads: those it is checked on.
    bound: the largest ratio to optax_sam's that meets it.
  """

  label: str
  method: str
  metric: str
  workloads: tuple[str, ...]
  bound: float = 1.2


def _compile_metric(metric: str, r: dict[str, Any]) -> float:
  return r["hlo"]["kernels"] if metric == "kernels" else r["lower_s"] + r["compile_s"]


# Compile cost at optax's: SAM does the same work in every ball, ASAM one read more.
COMPILE_WORKLOADS = (*LEAVES_WORKLOADS, "transformer")
COMPILE_TARGETS: tuple[CompileTarget, ...] = tuple(
  CompileTarget(label, method, metric, workloads)
  for label, method, workloads in (
    ("SAM", "sam", COMPILE_WORKLOADS),
    ("ASAM p = 2", "asam_p2", COMPILE_WORKLOADS),
    ("SAM p = ∞", "sam_pinf", LEAVES_WORKLOADS),
    ("SAM p = 1", "sam_p1", LEAVES_WORKLOADS),
    ("SAM p = 3", "sam_p3", LEAVES_WORKLOADS),
  )
  for metric in ("kernels", "compile")
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
    for wname in target.workloads:
      w = report["workloads"].get(wname)
      try:
        result, bound = target.result(w), target.bound(w)
        floor = "" if target.floor is None else f"{target.floor(w):.2f}"
      except (KeyError, TypeError):  # not in this run, or no memory_analysis()
        rows.append(f"| {target.label} | {wname} | not measured | | | |")
        continue
      spread = _spread(w, target.paired) if target.paired else ""
      verdict = "met" if result <= bound else "**missed**"
      rows.append(
        f"| {target.label} | {wname} | {result:.2f}{target.unit}{spread} | {bound:.2f} | "
        f"{floor} | {verdict} |"
      )
  return rows


def _compile_cell(report: dict[str, Any], target: CompileTarget, wname: str) -> str:
  if wname not in target.workloads:
    return ""
  try:
    methods = report["workloads"][wname]["methods"]
    ratio = _compile_metric(target.metric, methods[target.method]) / _compile_metric(
      target.metric, methods["optax_sam"]
    )
  except (KeyError, TypeError):  # not in this run, or run before the HLO was counted
    return "not measured"
  return f"{ratio:.2f} " + ("met" if ratio <= target.bound else "**missed**")


# --- the README's generated sections ---


def _family(w: dict[str, Any]) -> str:
  return w.get("family", "standard")  # runs before the leaves workloads had none


def _hlo_cells(r: dict[str, Any]) -> str:
  """Kernels, instructions and copies; blank for a run from before the HLO was counted."""
  hlo = r.get("hlo")
  if hlo is None:
    return " |  | "
  return f"{hlo['kernels']:,} | {hlo['instructions']:,} | {hlo['copies']}"


def _schedule(report: dict[str, Any]) -> str:
  """How the rounds and compilations went, per group of workloads that share them."""
  groups: dict[str, list[str]] = {}
  for wname, w in report["workloads"].items():
    repeats = w.get("compile_repeats", report["compile_repeats"])
    compiled = "compiled once" if repeats == 1 else f"compile time the median of {repeats}"
    if w.get("compile_only"):
      how = f"{compiled}, not timed"
    else:
      how = f"median of {w.get('rounds', report['rounds'])} interleaved rounds, {compiled}"
    groups.setdefault(how, []).append(wname)
  default = (
    f"median of {report['rounds']} interleaved rounds, compile time the median of "
    f"{report['compile_repeats']}"
  )
  if list(groups) == [default]:  # as every run before the compile-heavy workloads
    return f"median of {report['rounds']} interleaved rounds."
  return "; ".join(f"{', '.join(names)}: {how}" for how, names in groups.items()) + "."


def _results_table(report: dict[str, Any]) -> list[str]:
  lines = [
    "| workload | method | step (ms) | compile (s) | kernels | HLO instructions | copies | peak memory (MB) | XLA scratch (MB) | extra memory (param copies) |",
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for wname, w in report["workloads"].items():
    for name, r in w["methods"].items():
      mem = r["memory"]
      extra = w["ratios"].get(f"extra memory {name} (parameter copies)")
      step = f"{r['step_ms']:.2f}" if "step_ms" in r else "—"
      lines.append(
        f"| {wname} | {name} | {step} | {r['lower_s'] + r['compile_s']:.2f} | "
        + _hlo_cells(r)
        + " | "
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
    f"{'quick' if report['quick'] else 'full'} run of {report['date']}, {_schedule(report)}",
  ]


def _ratios_table(report: dict[str, Any]) -> list[str]:
  workloads = {n: w for n, w in report["workloads"].items() if _family(w) == "standard"}
  if not workloads:
    return ["No standard workload in this run."]
  labels = sorted({k for w in workloads.values() for k in w["ratios"]}, key=_order)
  labels = [k for k in labels if not k.startswith("extra memory")]
  lines = ["| ratio | " + " | ".join(workloads) + " |"]
  lines.append("|---|" + "---:|" * len(workloads))
  for label in labels:
    cells = [w["ratios"].get(label) for w in workloads.values()]
    lines.append(
      f"| {label} | " + " | ".join("" if c is None else f"{c:.2f}" for c in cells) + " |"
    )
  return lines


_NOT_RUN = (
  "Not in this run: the `leaves_*` and `transformer` workloads "
  "(`python benchmarks/benchmark.py --workloads leaves,transformer`)."
)


def _scale_table(report: dict[str, Any]) -> list[str]:
  """Every method against optax's SAM and SGD on the leaves and transformer workloads."""
  lines = [
    "| workload | method | step × optax_sam | step × sgd | compile × optax_sam | kernels × optax_sam | instructions × optax_sam |",
    "|---|---|---:|---:|---:|---:|---:|",
  ]
  for wname, w in report["workloads"].items():
    if _family(w) == "standard":
      continue
    for name in w["methods"]:
      cells = [
        w["ratios"].get(f"{metric} {name}/{reference}")
        for metric, reference in (
          ("step", "optax_sam"),
          ("step", "sgd"),
          ("compile", "optax_sam"),
          ("kernels", "optax_sam"),
          ("instructions", "optax_sam"),
        )
      ]
      if name == "optax_sam":
        cells = [1.0, cells[1], 1.0, 1.0, 1.0]
      if name == "sgd":
        cells[1] = 1.0
      if w.get("compile_only"):
        cells[:2] = ["—", "—"]
      lines.append(
        f"| {wname} | {name} | "
        + " | ".join(c if isinstance(c, str) else "" if c is None else f"{c:.2f}" for c in cells)
        + " |"
      )
  return lines if len(lines) > 2 else [_NOT_RUN]


def _growth(points: list[tuple[int, float]]) -> str:
  """The exponent ``k`` of ``value ~ leaves^k`` between two leaf counts (1: linear); else blank."""
  if len(points) != 2:
    return ""
  (n1, v1), (n2, v2) = points
  return f"{math.log(v2 / v1) / math.log(n2 / n1):.2f}"


def _leaves_table(report: dict[str, Any]) -> list[str]:
  """Compile time, kernels and instructions per leaf count, each against optax_sam's."""
  leaves = {n: w for n, w in report["workloads"].items() if _family(w) == "leaves"}
  if not leaves:
    return [_NOT_RUN]
  flat = sorted(
    (n for n, w in leaves.items() if not w["scan"]), key=lambda n: leaves[n]["n_leaves"]
  )
  scanned = [n for n, w in leaves.items() if w["scan"]]
  columns = flat + scanned
  methods = list(dict.fromkeys(m for n in columns for m in leaves[n]["methods"]))

  def header(n):
    w = leaves[n]
    if w["scan"]:
      return f"scan of {w['layers']:,} layers ({w['n_leaves']} leaves)"
    return f"{w['n_leaves']:,} leaves"

  lines = []
  for title, value in (
    ("compile time (s)", lambda r: r["lower_s"] + r["compile_s"]),
    ("kernels", lambda r: r["hlo"]["kernels"]),
    ("HLO instructions", lambda r: r["hlo"]["instructions"]),
  ):
    grow = (
      f"growth, {leaves[flat[-2]]['n_leaves']:,} → {leaves[flat[-1]]['n_leaves']:,}"
      if len(flat) > 1
      else "growth"
    )
    lines += [
      f"**{title[0].upper() + title[1:]}**, and × optax_sam's at the same leaf count:",
      "",
      "| method | " + " | ".join(header(n) for n in columns) + f" | {grow} |",
      "|---|" + "---:|" * (len(columns) + 1),
    ]
    for m in methods:
      cells, points = [], []
      for n in columns:
        w = leaves[n]
        try:
          v = value(w["methods"][m])
          base = value(w["methods"]["optax_sam"])
        except (KeyError, TypeError):
          cells.append("")
          continue
        number = f"{v:.1f}" if isinstance(v, float) else f"{v:,}"
        cells.append(f"{number} ({v / base:.2f})")
        if n in flat[-2:]:
          points.append((w["n_leaves"], v))
      lines.append(f"| {m} | " + " | ".join(cells) + f" | {_growth(points)} |")
    lines.append("")
  return lines[:-1]


def _compile_targets_table(report: dict[str, Any]) -> list[str]:
  lines = [
    "| target | " + " | ".join(COMPILE_WORKLOADS) + " |",
    "|---|" + "---:|" * len(COMPILE_WORKLOADS),
  ]
  for t in COMPILE_TARGETS:
    label = f"{t.label} {t.metric} ≤ {t.bound} × optax_sam"
    cells = [_compile_cell(report, t, n) for n in COMPILE_WORKLOADS]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return lines


def _probes_table(report: dict[str, Any]) -> list[str]:
  lines = [
    "| workload | parameters | parameters (MB) | XLA scratch, one gradient (MB) | two gradients in sequence (MB) | one read of the parameters (ms) | one gradient (ms) | the same inside lax.cond (ms) |",
    "|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for wname, w in report["workloads"].items():
    if w.get("compile_only"):
      continue
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
  "scale": _scale_table,
  "leaves": _leaves_table,
  "probes": _probes_table,
  "targets": _targets_table,
  "compile_targets": _compile_targets_table,
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
  r"results/(\w+/)?benchmark\.json: do not edit -->\n).*?(?P<end><!-- end generated (?P=name) -->)",
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

  def pick(names, table, what, groups=None):
    chosen = [n for name in names.split(",") if name for n in (groups or {}).get(name, [name])]
    unknown = [n for n in chosen if n not in table]
    if unknown:
      choices = list(table) + list(groups or {})
      parser.error(f"unknown {what} {unknown}; choose from {choices}")
    return {n: table[n] for n in dict.fromkeys(chosen)}

  workloads = pick(args.workloads, WORKLOADS, "workloads", WORKLOAD_GROUPS)
  chosen_methods = None if args.methods is None else pick(args.methods, METHODS, "methods")
  backend = jax.default_backend()
  if args.hlo_dir is not None:
    args.hlo_dir.mkdir(parents=True, exist_ok=True)
  default_rounds = args.rounds or (3 if args.quick else 9)
  default_repeats = args.compile_repeats or (1 if args.quick else 3)

  report: dict[str, Any] = {
    "date": _provenance.now(),
    "command": command,
    "quick": args.quick,
    "rounds": default_rounds,
    "compile_repeats": default_repeats,
    "machine": _machine(),
    "workloads": {},
  }
  for wname, workload in workloads.items():
    if args.quick and workload.quick is not None:
      workload = workload.quick
    methods = chosen_methods or {n: METHODS[n] for n in workload.methods}
    skipped = [n for n, m in methods.items() if m.backend not in (None, backend)]
    if skipped:
      print(f"skipping {skipped}: their compiler options are not for the {backend} backend")
    methods = {n: m for n, m in methods.items() if n not in skipped}
    print(f"{wname}: {workload.description}", flush=True)
    report["workloads"][wname] = bench_workload(
      wname,
      workload,
      methods,
      rounds=args.rounds or (3 if args.quick else workload.rounds or default_rounds),
      round_seconds=0.02 if args.quick else workload.round_seconds or 0.4,
      compile_repeats=args.compile_repeats
      or (1 if args.quick else workload.compile_repeats or default_repeats),
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
  parser.add_argument(
    "--workloads",
    default=",".join(WORKLOADS),
    help="comma-separated; 'standard' and 'leaves' stand for their workloads (default: all)",
  )
  parser.add_argument(
    "--methods",
    help="comma-separated, run on every workload (default: each workload's own list)",
  )
  parser.add_argument("--hlo-dir", type=Path, help="also write each compiled step's HLO here")
  parser.add_argument(
    "--rounds",
    type=int,
    help="timed rounds of every workload (default 9, 5 on the leaves and transformer "
    "workloads, 3 with --quick)",
  )
  parser.add_argument(
    "--compile-repeats",
    type=int,
    help="compilations per step of every workload (default 3, 1 on the leaves and "
    "transformer workloads and with --quick)",
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
