"""Smoke test of benchmarks/benchmark.py: --quick on the small MLP. Never asserts timings."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "benchmark.py"


def _load():
  spec = importlib.util.spec_from_file_location("benchmark", _SCRIPT)
  module = importlib.util.module_from_spec(spec)
  # dataclasses look their module up in sys.modules.
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


benchmark = _load()


def test_quick_run_writes_json_and_table(tmp_path):
  benchmark.main(["--quick", "--workloads", "mlp", "--rounds", "2", "--out", str(tmp_path)])
  report = json.loads((tmp_path / "benchmark.json").read_text())

  assert report["quick"] is True
  assert report["compile_repeats"] == 1
  assert set(report["machine"]) >= {"backend", "device", "cpu_count", "jax", "load_average"}
  assert list(report["workloads"]) == ["mlp"]
  mlp = report["workloads"]["mlp"]
  assert mlp["n_params"] == 40 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10
  assert mlp["param_bytes"] == 4 * mlp["n_params"]
  assert list(mlp["methods"]) == list(benchmark.METHODS)
  assert {"one_gradient_temp_bytes", "two_gradients_temp_bytes"} <= set(mlp)
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
  assert {"step sam/sgd", "step asam_p2/sam", "step asam_pinf/sam", "step sam/optax_sam"} <= set(
    mlp["ratios"]
  )
  table = (tmp_path / "benchmark.md").read_text()
  for name in benchmark.METHODS:
    assert f"| mlp | {name} |" in table


def test_unknown_workload_is_refused_with_the_choices(capsys):
  with pytest.raises(SystemExit):
    benchmark.main(["--quick", "--workloads", "resnet"])
  assert "choose from ['mlp'" in capsys.readouterr().err
