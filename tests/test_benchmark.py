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
  expected = [n for n, m in benchmark.METHODS.items() if m.backend in (None, jax.default_backend())]
  assert list(mlp["methods"]) == expected
  assert "looksam_k5_static" in expected
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
    memory = result["memory"]
    if memory is not None:  # memory_analysis() is optional per backend
      assert memory["peak_bytes"] == (
        memory["argument_bytes"]
        + memory["output_bytes"]
        - memory["alias_bytes"]
        + memory["temp_bytes"]
      )
  assert {"step sam/sgd", "step asam_p2/sam", "step looksam_k5_static/sgd"} <= set(mlp["ratios"])

  text = readme.read_text()
  assert text == benchmark.render_readme(text, benchmark.sections(report))
  for name in mlp["methods"]:
    assert f"| mlp | {name} |" in text
  assert "| ours ≤ 1.0 × optax_sam | mlp | " in text
  if on_cpu:
    assert "| mlp | sam | " in text.split("<!-- generated scheduler")[1]


def test_committed_readme_tables_are_rendered_from_the_committed_json(tmp_path):
  """--report on a copy of the README reproduces it: numbers and text cannot drift apart."""
  readme = tmp_path / "README.md"
  shutil.copy(benchmark.README, readme)
  benchmark.main(["--report", "--out", str(benchmark.RESULTS), "--readme", str(readme)])
  assert readme.read_text() == benchmark.README.read_text()


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
