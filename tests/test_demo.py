"""The demo and its research harness.

The demo (asam_jax.demo, in the package): its data, its optimizer against a
float64 reference, and its command line. The harness (notebooks/demo, in the
checkout): the variants and ASAM's conventions, the sweep, and the records
committed beside it.
"""

import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference

import asam_jax
from asam_jax import _provenance, demo

ROOT = Path(__file__).resolve().parent.parent
# The harness runs from the checkout (python -m notebooks.demo). Appended, not
# prepended, so that the asam_jax imported stays the installed one.
if str(ROOT) not in sys.path:
  sys.path.append(str(ROOT))
from notebooks.demo import cli, experiments, records  # noqa: E402

# --- data ---------------------------------------------------------------------


def test_mnist1d_is_generated_locally_and_leaves_numpy_alone(monkeypatch):
  import requests

  def no_network(*args, **kwargs):
    raise AssertionError("load_mnist1d tried to download")

  monkeypatch.setattr(requests, "get", no_network)
  demo.load_mnist1d.cache_clear()
  np.random.seed(123)  # noqa: NPY002
  expected_next = np.random.rand()  # noqa: NPY002
  np.random.seed(123)  # noqa: NPY002
  data = demo.load_mnist1d()
  assert np.random.rand() == expected_next  # noqa: NPY002
  assert data["x"].shape == (4000, 40) and data["x_test"].shape == (1000, 40)
  assert data["x"].dtype == np.float32 and data["y"].dtype == np.int32
  assert set(np.unique(data["y"])) == set(range(10)) == set(np.unique(data["y_test"]))
  assert demo.load_mnist1d() is data  # cached for the process


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.6, 1.0])
def test_flip_labels_corrupts_exactly_the_fraction(fraction):
  y = np.random.default_rng(0).integers(0, 10, 1000).astype(np.int32)
  original = y.copy()
  noisy = demo.flip_labels(y, fraction, seed=3)
  assert noisy.dtype == y.dtype and (y == original).all()
  assert (noisy != y).sum() == round(1000 * fraction)
  assert noisy.min() >= 0 and noisy.max() <= 9
  if fraction >= 0.2:
    # Every wrong class is reachable from every class.
    assert len(np.unique((noisy[noisy != y] - y[noisy != y]) % 10)) == 9
  np.testing.assert_array_equal(noisy, demo.flip_labels(y, fraction, seed=3))


def test_flip_labels_refuses_a_fraction_outside_0_1():
  with pytest.raises(ValueError, match=r"in \[0, 1\]"):
    demo.flip_labels(np.zeros(3, np.int32), 1.5)


# --- the optimizer, two steps against float64 NumPy ---------------------------

RNG = np.random.default_rng(0)
X, Y = RNG.normal(size=(16, 5)), RNG.normal(size=(16, 3))
# bias, kernel, scale (jax's leaf order): a linear layer followed by a per-output scale, as a
# normalization layer has, so that the three ASAM conventions scale different leaves.
W0 = [RNG.normal(size=3), RNG.normal(size=(5, 3)), 1 + 0.3 * RNG.normal(size=3)]


def ls_grad64(w):
  bias, kernel, scale = w
  z = X @ kernel
  r = z * scale + bias - Y
  return [r.mean(0), X.T @ (r * scale) / len(X), (z * r).mean(0)]


@pytest.mark.parametrize(
  ("method", "convention", "adaptive"),
  [("sgd", "all", None), ("sam", "all", [False, False, False]),
   ("asam", "all", [True, True, True]), ("asam", "weights", [False, True, True]),
   ("asam", "kernels", [False, True, False])],
)  # fmt: skip
def test_make_optimizer_matches_reference(method, convention, adaptive):
  rho, eta, lr, wd, total = 0.3, 0.05, 0.1, 5e-4, 4
  options = {"rho": rho, "eta": eta, "learning_rate": lr, "total_steps": total, "weight_decay": wd}
  # The demo's three methods scale every leaf; the harness's ASAM takes a convention.
  if convention == "all":
    tx = demo.make_optimizer(method, **options)
  else:
    tx = experiments.make_optimizer(method, convention=convention, **options)
  names = ["bias", "kernel", "scale"]
  params = {name: jnp.asarray(w, jnp.float32) for name, w in zip(names, W0)}
  loss_fn = lambda p: (
    0.5 * jnp.mean(jnp.sum(((X @ p["kernel"]) * p["scale"] + p["bias"] - Y) ** 2, -1))
  )
  state = tx.init(params)
  w, trace = [a.copy() for a in W0], None
  for count in range(2):
    updates, state = tx.update(jax.grad(loss_fn)(params), state, params, loss_fn=loss_fn)
    params = optax.apply_updates(params, updates)
    # SAM/ASAM first, then weight decay, then SGD with momentum 0.9 and a cosine schedule.
    g = ls_grad64(w)
    if adaptive is not None:
      eps = reference.perturbation(g, w, rho=rho, eta=eta, adaptive=adaptive)
      g = ls_grad64([a + e for a, e in zip(w, eps)])
    u = [gi + wd * wi for gi, wi in zip(g, w)]
    trace = u if trace is None else [ui + 0.9 * ti for ui, ti in zip(u, trace)]
    step = lr * 0.5 * (1 + np.cos(np.pi * count / total))
    w = [wi - step * ti for wi, ti in zip(w, trace)]
  for name, want in zip(names, w):
    np.testing.assert_allclose(np.asarray(params[name], np.float64), want, rtol=1e-5, atol=1e-6)


def test_the_conventions_differ_on_the_reference_problem():
  """The parametrization above is not vacuous: the three conventions give three updates."""
  finals = []
  for convention in experiments.CONVENTIONS:
    tx = experiments.make_optimizer("asam", rho=0.3, eta=0.05, convention=convention)
    params = {name: jnp.asarray(w, jnp.float32) for name, w in zip(["bias", "kernel", "scale"], W0)}
    loss_fn = lambda p: (
      0.5 * jnp.mean(jnp.sum(((X @ p["kernel"]) * p["scale"] + p["bias"] - Y) ** 2, -1))
    )
    updates, _ = tx.update(jax.grad(loss_fn)(params), tx.init(params), params, loss_fn=loss_fn)
    finals.append(np.concatenate([np.ravel(u) for u in jax.tree.leaves(updates)]))
  for i in range(3):
    for j in range(i):
      assert np.abs(finals[i] - finals[j]).max() > 1e-4, (
        experiments.CONVENTIONS[i],
        experiments.CONVENTIONS[j],
      )


def test_make_optimizer_refuses_unknown_names():
  with pytest.raises(ValueError, match="method must be one of"):
    demo.make_optimizer("gsam")  # a variant: the harness's
  with pytest.raises(ValueError, match="method must be one of"):
    experiments.make_optimizer("adam")
  with pytest.raises(ValueError, match="convention must be one of"):
    experiments.make_optimizer("asam", convention="biases")


# --- the demo's command line --------------------------------------------------


@pytest.mark.slow
def test_demo_prints_the_table_and_draws_the_plot(tmp_path, capsys):
  # One epoch everywhere in this file, so that the tests share compiled epochs.
  runs = demo.main(["--models", "mlp", "--seeds", "2", "--epochs", "1", "--out", str(tmp_path)])
  printed = capsys.readouterr().out
  assert [(r["model"], r["method"], r["rho"], r["eta"]) for r in runs] == [
    ("mlp", "sgd", 0.0, None),
    ("mlp", "sam", demo.TUNED_RHO["mlp"]["sam"], None),
    ("mlp", "asam", demo.TUNED_RHO["mlp"]["asam"], demo.ETA),
  ]
  for run in runs:
    assert np.shape(run["test_acc"]) == (2, 1) and len(run["train_acc"]) == 2
    # One epoch is enough to be well above chance (10%) on MNIST-1D.
    assert min(curve[-1] for curve in run["test_acc"]) > 0.2
    assert all(ms > 0 for ms in run["ms_per_step"])
  assert "MNIST-1D, 2 seeds, 1 epoch, batch 100, SGD momentum 0.9, peak lr 0.1 (cosine)" in printed
  assert f"\n{demo.table(runs)}\n" in printed and printed.count("\n| mlp |") == 3
  # The machine line: where and how it ran, but no commit (the package runs no git).
  command = f"python -m asam_jax.demo --models mlp --seeds 2 --epochs 1 --out {tmp_path}"
  assert f"Run: `{command}`, finished 20" in printed and "asam_jax at" not in printed
  assert f"jax {jax.__version__}, optax {optax.__version__}" in printed
  assert sorted(p.name for p in tmp_path.iterdir()) == ["test_accuracy.png"]
  assert (tmp_path / "test_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_package_runs_no_git():
  for module in (demo, _provenance):
    assert "subprocess" not in inspect.getsource(module), module.__name__


def test_the_provenance_of_a_run():
  run = _provenance.Run()
  meta = run.meta("a command", git_commit="abc")
  assert list(meta) == [
    "command", "date", "machine", "versions", "git_commit", "load_before", "load_after", "wall_s",
    "cpu_s",
  ]  # fmt: skip
  assert meta["machine"]["cores"] >= 1 and meta["machine"]["cpu"]
  assert meta["machine"]["jax_backend"] == jax.default_backend()
  assert (
    meta["versions"]["jax"] == jax.__version__ and meta["versions"]["optax"] == optax.__version__
  )
  assert meta["versions"]["asam_jax"] == asam_jax.__version__
  assert len(meta["load_before"]) == len(meta["load_after"]) == 3
  assert meta["wall_s"] >= 0 and meta["cpu_s"] >= 0 and meta["date"].startswith("20")
  assert _provenance.describe(meta).endswith(f"flax {meta['versions']['flax']}, asam_jax at abc.")


@pytest.mark.slow
def test_cnn_ln_has_a_layer_norm_after_each_convolution_and_trains():
  model = demo.MODELS["cnn_ln"]()
  params = model.init(jax.random.key(0), jnp.zeros((1, 40)))["params"]
  assert sorted(params) == [
    "Conv_0", "Conv_1", "Conv_2", "Dense_0", "LayerNorm_0", "LayerNorm_1", "LayerNorm_2"
  ]  # fmt: skip
  assert all(params[f"LayerNorm_{i}"]["scale"].shape == (16,) for i in range(3))
  # The CNN's own parameters are named and initialized as in the plain CNN.
  plain = demo.MODELS["cnn"]().init(jax.random.key(0), jnp.zeros((1, 40)))["params"]
  for name in ["Conv_0", "Conv_1", "Conv_2", "Dense_0"]:
    for leaf in ["kernel", "bias"]:
      np.testing.assert_array_equal(params[name][leaf], plain[name][leaf])
  # weight_mask scales the LayerNorm scales too, kernel_mask does not.
  weights, kernels = asam_jax.weight_mask(params), asam_jax.kernel_mask(params)
  assert weights["LayerNorm_0"] == {"scale": True, "bias": False}
  assert kernels["LayerNorm_0"] == {"scale": False, "bias": False}
  result = demo.train("cnn_ln", "asam", 0, demo.load_mnist1d(), epochs=1, rho=0.1)
  assert result["test_acc"][0] > 0.15  # above chance (10%) after one epoch


@pytest.mark.slow
def test_train_is_deterministic_given_the_seed():
  data = demo.load_mnist1d()
  a, b = (demo.train("mlp", "asam", 5, data, epochs=1, rho=0.5) for _ in range(2))
  assert a["test_acc"] == b["test_acc"] and a["loss"] == b["loss"]


def test_demo_on_a_core_install_names_the_extra_to_install():
  """Without Flax (a core install), --help says which extra to install instead of a traceback."""
  hide_flax = (
    "import sys, runpy; sys.modules['flax'] = None; sys.argv = ['demo', '--help']; "
    "runpy.run_module('asam_jax.demo', run_name='__main__')"
  )
  result = subprocess.run([sys.executable, "-c", hide_flax], capture_output=True, text=True)
  assert result.returncode == 1
  assert "pip install 'asam_jax[demo]'" in result.stderr and "missing: flax" in result.stderr
  assert "Traceback" not in result.stderr


# --- the harness: python -m notebooks.demo ------------------------------------


@pytest.mark.slow
def test_harness_writes_table_plot_and_json(tmp_path, capsys):
  runs = cli.main(["--models", "mlp", "--seeds", "2", "--epochs", "1", "--out", str(tmp_path)])
  printed = capsys.readouterr().out
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["runs"] == json.loads(json.dumps(runs))
  meta = saved["meta"]
  assert (
    meta["command"]
    == f"python -m notebooks.demo --models mlp --seeds 2 --epochs 1 --out {tmp_path}"
  )
  assert {"machine", "versions", "git_commit", "load_before", "wall_s", "cpu_s"} <= set(meta)
  assert [(r["model"], r["method"], r["rho"], r["convention"]) for r in runs] == [
    ("mlp", "sgd", 0.0, None),
    ("mlp", "sam", demo.TUNED_RHO["mlp"]["sam"], None),
    ("mlp", "asam", demo.TUNED_RHO["mlp"]["asam"], "all"),
  ]
  table = (tmp_path / "results.md").read_text()
  assert table == records.render_markdown(saved)
  assert table.count("\n| mlp |") == 3 and "| mlp | ASAM |" in printed
  assert f"Run: `{meta['command']}`" in table
  assert (tmp_path / "test_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_the_harness_trains_what_the_demo_trains(tmp_path):
  """Its comparison is the demo's, bit for bit: the same accuracies, only recorded."""
  args = ["--models", "mlp", "--seeds", "1", "--epochs", "1"]
  shipped = demo.main([*args, "--out", str(tmp_path / "demo")])
  recorded = cli.main([*args, "--out", str(tmp_path / "harness")])
  for a, b in zip(shipped, recorded, strict=True):
    assert {k: b[k] for k in a if k != "ms_per_step"} == {k: a[k] for k in a if k != "ms_per_step"}


@pytest.mark.slow
def test_harness_options_reach_the_runs(tmp_path):
  args = ["--models", "mlp", "--methods", "sam", "asam", "--seeds", "1", "--epochs", "1"]
  args += ["--sam-rho", "0.07", "--asam-rho", "0.3", "--eta", "0.02"]
  args += ["--asam-convention", "kernels", "--out", str(tmp_path)]
  runs = cli.main(args)
  assert [(r["method"], r["rho"], r["eta"], r["convention"]) for r in runs] == [
    ("sam", 0.07, None, None),
    ("asam", 0.3, 0.02, "kernels"),
  ]
  assert json.loads((tmp_path / "results.json").read_text())["config"]["asam_convention"] == (
    "kernels"
  )


@pytest.mark.slow
def test_sweep_validates_every_rho_with_one_compilation_per_method(tmp_path):
  misses = demo._epoch_fn.cache_info().misses
  runs = cli.main(
    ["--sweep", "--models", "mlp", "--seeds", "1", "--epochs", "1", "--out", str(tmp_path)]
  )
  assert [(r["method"], r["rho"]) for r in runs] == [("sgd", 0.0)] + [
    (method, rho) for method, grid in experiments.SWEEP_RHO.items() for rho in grid
  ]
  # rho lives in the optimizer state, so the whole grid shares one executable per method.
  assert demo._epoch_fn.cache_info().misses - misses == 3
  assert "validation accuracy" in (tmp_path / "sweep.md").read_text()
  assert not (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_conventions_mode_writes_the_table(tmp_path):
  args = ["--conventions", "--models", "mlp", "cnn_ln", "--seeds", "1", "--epochs", "1"]
  runs = cli.main([*args, "--asam-rho", "0.1", "--out", str(tmp_path)])
  conventions = experiments.CONVENTIONS
  assert [(r["model"], r["method"], r["convention"]) for r in runs] == [
    (m, "asam", c) for m in ["mlp", "cnn_ln"] for c in conventions
  ]
  by = {(r["model"], r["convention"]): r for r in runs}
  # On the MLP the official code's weights are its kernels: that run is not repeated.
  assert by["mlp", "kernels"]["same_as"] == "weights"
  assert by["mlp", "kernels"]["test_acc"] == by["mlp", "weights"]["test_acc"]
  assert [by["cnn_ln", c]["scaled_leaves"] for c in conventions] == [14, 7, 4]
  assert not any("same_as" in by["cnn_ln", c] for c in conventions)
  saved = json.loads((tmp_path / "conventions.json").read_text())
  assert saved["kind"] == "conventions" and saved["runs"] == json.loads(json.dumps(runs))
  table = (tmp_path / "conventions.md").read_text()
  assert table == records.render_markdown(saved)
  assert "| model | ρ | all | weights | kernels |" in table and "\n| cnn_ln | 0.1 | " in table
  assert not (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_report_rerenders_the_markdown_without_training(tmp_path, monkeypatch):
  cli.main(["--models", "mlp", "--methods", "sgd", "--seeds", "1", "--epochs", "1",
            "--out", str(tmp_path / "run")])  # fmt: skip
  markdown = tmp_path / "run" / "results.md"
  written = markdown.read_text()
  markdown.write_text("stale")
  (tmp_path / "run" / "test_accuracy.png").unlink()
  monkeypatch.setattr(demo, "train", lambda *a, **k: pytest.fail("--report trained"))
  assert cli.main(["--report", str(tmp_path)]) == []
  assert markdown.read_text() == written
  assert (tmp_path / "run" / "test_accuracy.png").read_bytes()[:4] == b"\x89PNG"


COMMITTED = sorted((ROOT / "notebooks" / "demo").rglob("*.json"))


def test_the_demo_records_are_committed():
  kinds = sorted(p.stem for p in COMMITTED)
  assert {"results", "sweep", "conventions"} <= set(kinds), kinds


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.parent.name))
def test_committed_markdown_is_rendered_from_the_committed_json(path):
  record = json.loads(path.read_text())
  assert path.with_suffix(".md").read_text() == records.render_markdown(record), (
    f"{path.with_suffix('.md')} is stale: run python -m notebooks.demo --report {path.parent}"
  )
  meta = record["meta"]
  assert {"command", "date", "machine", "load_before", "load_after", "wall_s", "versions"} <= set(
    meta
  )
  if records.KINDS[record["kind"]]:
    assert (path.parent / records.KINDS[record["kind"]]).exists()


def test_the_notebooks_readme_quotes_the_committed_demo_rows():
  readme = (ROOT / "notebooks" / "README.md").read_text()
  rows = {line for path in COMMITTED for line in path.with_suffix(".md").read_text().splitlines()}
  quoted = [line for line in readme.splitlines() if re.match(r"\| (mlp|cnn|cnn_ln) \|", line)]
  assert len(quoted) > 20
  assert [line for line in quoted if line not in rows] == [], "notebooks/README.md is stale"


@pytest.mark.slow
def test_sweep_grid_options(tmp_path):
  args = ["--sweep", "--models", "mlp", "--seeds", "1", "--epochs", "1"]
  runs = cli.main([*args, "--sam-rhos", "0.3", "--asam-rhos", "0.4", "0.6", "--out", str(tmp_path)])
  assert [(r["method"], r["rho"]) for r in runs] == [
    ("sgd", 0.0), ("sam", 0.3), ("asam", 0.4), ("asam", 0.6)
  ]  # fmt: skip
  runs = cli.main([*args, "--methods", "sam", "--sam-rhos", "0.3", "--out", str(tmp_path)])
  assert [(r["method"], r["rho"]) for r in runs] == [("sam", 0.3)]
  with pytest.raises(SystemExit):
    cli.main(["--sam-rhos", "0.3", "--out", str(tmp_path)])  # the grid is --sweep's


@pytest.mark.slow
def test_the_variants_run_in_the_harness_with_sams_rho(tmp_path):
  variants = list(experiments.VARIANTS)
  args = ["--models", "mlp", "--methods", *variants, "--seeds", "1", "--epochs", "1"]
  runs = cli.main([*args, "--out", str(tmp_path)])
  assert [(r["method"], r["rho"]) for r in runs] == [
    (m, demo.TUNED_RHO["mlp"]["sam"]) for m in variants
  ]
  for run in runs:
    assert run["test_acc"][0][-1] > 0.2, run["method"]  # well above chance after one epoch
  assert "| mlp | LOOKSAM |" in (tmp_path / "results.md").read_text()
