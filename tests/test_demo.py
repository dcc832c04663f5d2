"""The demo: its data, its optimizer against a float64 reference, and its command line."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference

from asam_jax import demo

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
W0 = [RNG.normal(size=3), RNG.normal(size=(5, 3))]  # bias, kernel: jax's leaf order


def ls_grad64(w):
  r = X @ w[1] + w[0] - Y
  return [r.mean(0), X.T @ r / len(X)]


@pytest.mark.parametrize(
  ("method", "convention", "adaptive"),
  [("sgd", "all", None), ("sam", "all", [False, False]), ("asam", "all", [True, True]),
   ("asam", "kernels", [False, True])],
)  # fmt: skip
def test_make_optimizer_matches_reference(method, convention, adaptive):
  rho, eta, lr, wd, total = 0.3, 0.05, 0.1, 5e-4, 4
  tx = demo.make_optimizer(
    method, rho=rho, eta=eta, convention=convention, learning_rate=lr, total_steps=total,
    weight_decay=wd,
  )  # fmt: skip
  params = {"bias": jnp.asarray(W0[0], jnp.float32), "kernel": jnp.asarray(W0[1], jnp.float32)}
  loss_fn = lambda p: 0.5 * jnp.mean(jnp.sum((X @ p["kernel"] + p["bias"] - Y) ** 2, -1))
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
  for got, want in zip([params["bias"], params["kernel"]], w):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-6)


def test_make_optimizer_refuses_unknown_names():
  with pytest.raises(ValueError, match="method must be one of"):
    demo.make_optimizer("adam")
  with pytest.raises(ValueError, match="convention must be one of"):
    demo.make_optimizer("asam", convention="biases")


# --- the command line ---------------------------------------------------------


def test_demo_writes_table_plot_and_json(tmp_path, capsys):
  # One epoch everywhere in this file, so that the tests share compiled epochs.
  runs = demo.main(["--models", "mlp", "--seeds", "2", "--epochs", "1", "--out", str(tmp_path)])
  printed = capsys.readouterr().out
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["runs"] == json.loads(json.dumps(runs))
  assert [(r["model"], r["method"], r["rho"]) for r in runs] == [
    ("mlp", "sgd", 0.0),
    ("mlp", "sam", demo.TUNED_RHO["mlp"]["sam"]),
    ("mlp", "asam", demo.TUNED_RHO["mlp"]["asam"]),
  ]
  for run in runs:
    assert np.shape(run["test_acc"]) == (2, 1) and len(run["train_acc"]) == 2
    # One epoch is enough to be well above chance (10%) on MNIST-1D.
    assert min(curve[-1] for curve in run["test_acc"]) > 0.2
    assert all(ms > 0 for ms in run["ms_per_step"])
  table = (tmp_path / "results.md").read_text()
  assert table.count("\n| mlp |") == 3 and "| mlp | ASAM |" in printed
  assert (tmp_path / "test_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_options_reach_the_runs(tmp_path):
  args = ["--models", "mlp", "--methods", "sam", "asam", "--seeds", "1", "--epochs", "1"]
  args += ["--sam-rho", "0.07", "--asam-rho", "0.3", "--eta", "0.02"]
  args += ["--asam-convention", "kernels", "--out", str(tmp_path)]
  runs = demo.main(args)
  assert [(r["method"], r["rho"], r["eta"]) for r in runs] == [
    ("sam", 0.07, None),
    ("asam", 0.3, 0.02),
  ]
  assert json.loads((tmp_path / "results.json").read_text())["config"]["asam_convention"] == (
    "kernels"
  )


def test_sweep_validates_every_rho_with_one_compilation_per_method(tmp_path):
  misses = demo._epoch_fn.cache_info().misses
  runs = demo.main(
    ["--sweep", "--models", "mlp", "--seeds", "1", "--epochs", "1", "--out", str(tmp_path)]
  )
  assert [(r["method"], r["rho"]) for r in runs] == [("sgd", 0.0)] + [
    (method, rho) for method, grid in demo.SWEEP_RHO.items() for rho in grid
  ]
  # rho lives in the optimizer state, so the whole grid shares one executable per method.
  assert demo._epoch_fn.cache_info().misses - misses == 3
  assert "validation accuracy" in (tmp_path / "sweep.md").read_text()
  assert not (tmp_path / "results.json").exists()


def test_train_is_deterministic_given_the_seed():
  data = demo.load_mnist1d()
  a, b = (demo.train("mlp", "asam", 5, data, epochs=1, rho=0.5) for _ in range(2))
  assert a["test_acc"] == b["test_acc"] and a["loss"] == b["loss"]


def test_the_variants_run_in_the_demo_with_sams_rho(tmp_path):
  variants = ["gsam", "looksam", "msam", "random_sam"]
  args = ["--models", "mlp", "--methods", *variants, "--seeds", "1", "--epochs", "1"]
  runs = demo.main([*args, "--out", str(tmp_path)])
  assert [(r["method"], r["rho"]) for r in runs] == [
    (m, demo.TUNED_RHO["mlp"]["sam"]) for m in variants
  ]
  for run in runs:
    assert run["test_acc"][0][-1] > 0.2, run["method"]  # well above chance after one epoch
  assert "| mlp | LOOKSAM |" in (tmp_path / "results.md").read_text()


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
