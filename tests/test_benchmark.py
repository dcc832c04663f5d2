"""benchmarks/: the quick run, the README rendered from the JSON, the cond repro. No timings asserted."""

import importlib.util
import json
import math
import re
import shutil
import sys
from pathlib import Path

import jax
import pytest

_BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
  spec = importlib.util.spec_from_file_location(name, _BENCHMARKS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  # dataclasses look their module up in sys.modules.
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


benchmark = _load("benchmark")
repro = _load("xla_cpu_cond_repro")


@pytest.mark.slow
def test_quick_run_writes_json_and_readme(tmp_path):
  readme = tmp_path / "README.md"
  shutil.copy(benchmark.README, readme)
  benchmark.main(
    [
      "--quick",
      "--workloads",
      "mlp",
      "--rounds",
      "2",
      "--out",
      str(tmp_path),
      "--readme",
      str(readme),
    ]
  )
  report = json.loads((tmp_path / "benchmark.json").read_text())

  assert report["quick"] is True
  assert report["compile_repeats"] == 1
  assert set(report["machine"]) >= {"backend", "device", "cpu_count", "jax", "load_average"}
  assert list(report["workloads"]) == ["mlp"]
  mlp = report["workloads"]["mlp"]
  assert mlp["n_params"] == 40 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10
  assert mlp["param_bytes"] == 4 * mlp["n_params"]
  on_cpu = jax.default_backend() == "cpu"
  expected = [
    n
    for n in benchmark.STANDARD_METHODS
    if benchmark.METHODS[n].backend in (None, jax.default_backend())
  ]
  assert list(mlp["methods"]) == expected
  assert {"looksam_k5_static", "fisher_sam", "friendly_sam", "esam", "bayesian_sam"} <= set(
    expected
  )
  if on_cpu:
    assert {"sgd_memsched", "sam_memsched", "asam_p2_memsched"} <= set(expected)
  assert {"one_gradient_temp_bytes", "two_gradients_temp_bytes"} <= set(mlp)
  for probe in (mlp["read_ms"], mlp["cond_probe"]["grad_ms"], mlp["cond_probe"]["grad_in_cond_ms"]):
    assert math.isfinite(probe)
  # Rounds of whole LookSAM cycles.
  assert mlp["steps_per_round"] % benchmark.LOOKSAM_K == 0
  for result in mlp["methods"].values():
    assert len(result["step_ms_rounds"]) == 2
    for key in ("step_ms", "lower_s", "compile_s", "last_loss"):
      assert math.isfinite(result[key])
    assert result["hlo"]["kernels"] >= 1
    memory = result["memory"]
    if memory is not None:  # memory_analysis() is optional per backend
      assert memory["peak_bytes"] == (
        memory["argument_bytes"]
        + memory["output_bytes"]
        - memory["alias_bytes"]
        + memory["temp_bytes"]
      )
  assert {
    "step sam/sgd",
    "step asam_p2/sam",
    "step looksam_k5_static/sgd",
    "step fisher_sam/sam",
    "step friendly_sam/sam",
    "step esam/sam",
    "step bayesian_sam/sgd",
    "kernels sam/optax_sam",
  } <= set(mlp["ratios"])

  text = readme.read_text()
  assert text == benchmark.render_readme(text, benchmark.sections(report))
  for name in mlp["methods"]:
    assert f"| mlp | {name} |" in text
  assert "| ours ≤ 1.0 × optax_sam | mlp | " in text
  # The workloads this run left out are marked, not dropped.
  assert "| GSAM ≤ 1.4 × sam | wide_mlp | not measured |" in text
  assert "| SAM kernels ≤ 1.2 × optax_sam | not measured |" in text
  if on_cpu:
    assert "| mlp | sam | " in text.split("<!-- generated scheduler")[1]


@pytest.mark.slow
def test_quick_run_of_the_leaves_and_transformer_workloads(tmp_path):
  """Tiny versions (--quick): 4 leaves timed, 32 compiled only, a scan, a 2-block NNX model."""
  readme = tmp_path / "README.md"
  shutil.copy(benchmark.README, readme)
  names = ["leaves_8", "leaves_2000", "leaves_1024_scan", "transformer"]
  out = ["--out", str(tmp_path), "--readme", str(readme)]
  benchmark.main(["--quick", "--rounds", "1", "--workloads", ",".join(names), *out])
  report = json.loads((tmp_path / "benchmark.json").read_text())
  assert list(report["workloads"]) == names
  leaves = {n: report["workloads"][n] for n in names[:3]}
  assert [w["n_leaves"] for w in leaves.values()] == [4, 32, 2]
  assert leaves["leaves_1024_scan"]["scan"] and leaves["leaves_1024_scan"]["layers"] == 8
  assert leaves["leaves_2000"]["compile_only"] and "cond_probe" not in leaves["leaves_2000"]
  transformer = report["workloads"]["transformer"]
  assert transformer["family"] == "transformer"
  assert transformer["n_leaves"] == 2 * 16 + 4  # blocks, embedding, positions, final LayerNorm
  for name, w in report["workloads"].items():
    defaults = benchmark.WORKLOADS[name].methods
    assert list(w["methods"]) == list(defaults)
    for method, r in w["methods"].items():
      hlo = r["hlo"]
      assert hlo["kernels"] >= 1 and hlo["instructions"] > hlo["kernels"]
      assert sum(hlo["kernel_opcodes"].values()) == hlo["kernels"]
      assert ("step_ms" in r) is not w["compile_only"]
      if method != "optax_sam":
        for metric in ("compile", "kernels", "instructions"):
          assert math.isfinite(w["ratios"][f"{metric} {method}/optax_sam"])
        if not w["compile_only"]:
          assert math.isfinite(w["ratios"][f"step {method}/optax_sam"])
    if not w["compile_only"]:
      assert math.isfinite(w["ratios"]["step optax_sam/sgd"])
  # The scan's loop body counts once: its kernels are in a while loop.
  assert leaves["leaves_1024_scan"]["methods"]["sam"]["hlo"]["kernels_in_loops"] > 0
  # SAM's overflow guard is a conditional; the p = inf ball needs none.
  assert leaves["leaves_8"]["methods"]["sam"]["hlo"]["conditionals"] == 1
  assert leaves["leaves_8"]["methods"]["sam_pinf"]["hlo"]["conditionals"] == 0

  text = readme.read_text()
  assert text == benchmark.render_readme(text, benchmark.sections(report))
  assert "| leaves_2000 | sam | — | — | " in text
  assert "| transformer | bayesian_sam | " in text
  assert "| sam | " in text.split("<!-- generated leaves")[1]
  assert "| SAM kernels ≤ 1.2 × optax_sam | " in text
  assert "| ours ≤ 1.0 × optax_sam | transformer | " in text


# A module with every kind of instruction hlo_stats tells apart, counted by hand:
# kernels are the dot and the copy of the entry, the add, fusion and copy of the
# loop's body, the compare of its condition and the reduce of one branch.
HAND_HLO = """\
HloModule test, entry_computation_layout={(f32[8]{0}, f32[8,8]{1,0})->(f32[8]{0}, f32[])}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%fused (p0: f32[8], p1: f32[8]) -> f32[8] {
  %p0 = f32[8]{0} parameter(0)
  %p1 = f32[8]{0} parameter(1)
  %m = f32[8]{0} multiply(%p0, %p1)
  ROOT %r = f32[8]{0} add(%m, %p1)
}

%body (state: (s32[], f32[8])) -> (s32[], f32[8]) {
  %state = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%state), index=0
  %x = f32[8]{0} get-tuple-element(%state), index=1
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  %y = f32[8]{0} fusion(%x, %x), kind=kLoop, calls=%fused
  %c = f32[8]{0} copy(%y)
  ROOT %out = (s32[], f32[8]{0}) tuple(%next, %c)
}

%cond (state: (s32[], f32[8])) -> pred[] {
  %state = (s32[], /*index=1*/f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%state), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%then (x: f32[8]) -> f32[] {
  %x = f32[8]{0} parameter(0)
  %zero = f32[] constant(0)
  ROOT %r = f32[] reduce(%x, %zero), dimensions={0}, to_apply=%add
}

%else (x: f32[8]) -> f32[] {
  %x = f32[8]{0} parameter(0)
  ROOT %z = f32[] constant(0)
}

ENTRY %main (v: f32[8], w: f32[8,8]) -> (f32[8], f32[]) {
  %v = f32[8]{0} parameter(0)
  %w = f32[8,8]{1,0} parameter(1)
  %d = f32[8]{0} dot(%w, %v), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %b = f32[8]{0} bitcast(%d)
  %zero = s32[] constant(0)
  %init = (s32[], f32[8]{0}) tuple(%zero, %b)
  %loop = (s32[], f32[8]{0}) while(%init), condition=%cond, body=%body, metadata={op_name="while/body=%else"}
  %x = f32[8]{0} get-tuple-element(%loop), index=1
  %p = pred[] constant(true)
  %c = f32[] conditional(%p, %x, %x), true_computation=%then, false_computation=%else
  %w2 = f32[8,8]{1,0} copy(%w)
  %barrier = f32[8,8]{1,0} opt-barrier(%w2)
  ROOT %out = (f32[8]{0}, f32[]) tuple(%x, %c)
}
"""


def test_hlo_stats_counts_a_hand_checked_module():
  stats = benchmark.hlo_stats(HAND_HLO, param_shapes=[(8,), (8, 8), ()])
  assert stats["kernel_opcodes"] == {
    "dot": 1,
    "copy": 2,
    "add": 1,
    "fusion": 1,
    "compare": 1,
    "reduce": 1,
  }
  assert stats["kernels"] == 7
  assert stats["kernels_in_loops"] == 4  # the body's add, fusion and copy, the condition's compare
  assert stats["kernels_in_branches"] == 1  # the reduce; the other branch is a constant
  assert stats["copies"] == 2
  assert stats["fusions"] == 1
  assert (stats["whiles"], stats["conditionals"]) == (1, 1)
  # f32[8] from the dot, the fusion and the body's copy, f32[8,8] from the entry's copy.
  assert stats["param_sized_writes"] == 4
  # Every instruction of the 7 computations, the fused one and the reducer included.
  assert stats["instructions"] == 3 + 4 + 8 + 4 + 3 + 2 + 13


def test_hlo_stats_of_a_compiled_step_and_of_two_together():
  x = jax.numpy.ones((4, 4))
  text = jax.jit(lambda x: jax.numpy.tanh(x @ x) * 2).lower(x).compile().as_text()
  stats = benchmark.hlo_stats(text, [(4, 4)])
  assert 1 <= stats["kernels"] <= stats["instructions"]
  assert stats["whiles"] == stats["conditionals"] == 0
  both = benchmark._sum_stats([stats, stats])
  assert both["kernels"] == 2 * stats["kernels"]
  assert sum(both["kernel_opcodes"].values()) == both["kernels"]
  with pytest.raises(ValueError, match="ENTRY"):
    benchmark.hlo_stats("HloModule empty\n")


def _fake_leaves(n_leaves, compile_s, kernels, *, scan=False):
  methods = {
    name: {
      "lower_s": 0.0,
      "compile_s": seconds,
      "memory": None,
      "hlo": {"kernels": k, "instructions": 10 * k, "copies": 0},
    }
    for name, seconds, k in zip(("optax_sam", "sam"), compile_s, kernels)
  }
  return {
    "family": "leaves",
    "n_leaves": n_leaves,
    "scan": scan,
    "layers": n_leaves // 2 if not scan else 512,
    "compile_only": True,
    "methods": methods,
    "ratios": {},
  }


def test_leaves_tables_give_ratios_to_optax_and_the_growth_exponent():
  report = {
    "workloads": {
      "leaves_1024": _fake_leaves(1024, (10.0, 11.0), (1000, 1100)),
      "leaves_2000": _fake_leaves(2048, (20.0, 44.0), (2000, 2200)),
    }
  }
  lines = benchmark._leaves_table(report)
  compile_row = next(line for line in lines if line.startswith("| sam | 11.0"))
  # Compile time doubles for optax (exponent 1) and quadruples for ours (exponent 2).
  assert compile_row == "| sam | 11.0 (1.10) | 44.0 (2.20) | 2.00 |"
  assert "| optax_sam | 1,000 (1.00) | 2,000 (1.00) | 1.00 |" in lines
  cells = {
    (t.method, t.metric): [benchmark._compile_cell(report, t, n) for n in report["workloads"]]
    for t in benchmark.COMPILE_TARGETS
  }
  assert cells["sam", "compile"] == ["1.10 met", "2.20 **missed**"]
  assert cells["sam", "kernels"] == ["1.10 met", "1.10 met"]
  assert cells["sam_p1", "kernels"] == ["not measured", "not measured"]
  assert benchmark._compile_cell(report, benchmark.COMPILE_TARGETS[0], "transformer") == (
    "not measured"
  )


@pytest.mark.parametrize(
  ("page", "results"),
  [("README.md", benchmark.RESULTS), ("GPU.md", benchmark.RESULTS / "gpu")],
)
def test_committed_readme_tables_are_rendered_from_the_committed_json(tmp_path, page, results):
  """--report on a copy of each page reproduces it: numbers and text cannot drift apart."""
  committed = benchmark.HERE / page
  readme = tmp_path / page
  shutil.copy(committed, readme)
  benchmark.main(["--report", "--out", str(results), "--readme", str(readme)])
  assert readme.read_text() == committed.read_text()


def test_readme_without_a_sections_markers_is_refused():
  report = json.loads((benchmark.RESULTS / "benchmark.json").read_text())
  text = benchmark.README.read_text()
  begin = text.index("<!-- generated targets")
  end = text.index("<!-- end generated targets -->")
  with pytest.raises(ValueError, match="expected"):
    benchmark.render_readme(text[:begin] + text[end:], benchmark.sections(report))


def test_unknown_workload_is_refused_with_the_choices(capsys):
  with pytest.raises(SystemExit):
    benchmark.main(["--quick", "--workloads", "resnet"])
  assert "choose from ['mlp'" in capsys.readouterr().err


def test_workload_groups_and_method_lists():
  assert benchmark.WORKLOAD_GROUPS["leaves"] == [
    "leaves_8",
    "leaves_128",
    "leaves_1024",
    "leaves_2000",
    "leaves_1024_scan",
  ]
  assert benchmark.WORKLOADS["leaves_2000"].compile_only
  for name, workload in benchmark.WORKLOADS.items():
    assert set(workload.methods) <= set(benchmark.METHODS), name
    assert workload.family == "standard" or "optax_sam" in workload.methods
  # The p = inf, 1 and 3 balls run where the linearity in the leaves is measured.
  assert {"sam_pinf", "sam_p1", "sam_p3"} <= set(benchmark.LEAVES_METHODS)
  assert {"fisher_sam", "friendly_sam", "esam", "bayesian_sam"} <= set(
    benchmark.TRANSFORMER_METHODS
  )


@pytest.mark.slow
def test_cond_repro_runs_and_reads_the_layouts(capsys):
  repro.main(["--batch", "2", "--size", "8", "--channels", "4", "--repeats", "1"])
  out = capsys.readouterr().out
  assert f"jax {jax.__version__}" in out
  lines = {
    name: re.search(rf"^ +[\d.]+ +[\d.]+  {re.escape(name)}: (.*)$", out, re.MULTILINE).group(1)
    for name in repro.variants()
  }
  # One conv: its forward, and the kernel's gradient (none for the input's).
  assert lines["grad"].startswith("2/2 canonical")
  assert lines["loss in lax.cond"].startswith("1/1 canonical")


def test_canonical_layouts():
  assert repro.canonical("b01f_01io->b01f")
  assert repro.canonical("b0f_0io->b0f")
  assert not repro.canonical("f01b_i01o->01bf")
  assert not repro.canonical("b01f_01oi->b01f")
