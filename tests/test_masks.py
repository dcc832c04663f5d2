"""Mask helpers."""

import chex
import jax
import jax.numpy as jnp
import pytest
from helpers import tiered

import asam_jax
from asam_jax._masks import resolve_mask


def test_kernel_mask_selects_matrices_and_kernels():
  params = {
    "conv": {"kernel": jnp.ones((3, 1, 8)), "bias": jnp.ones(8)},
    "bn": {"scale": jnp.ones(8)},
    "s": jnp.ones(()),
  }
  assert asam_jax.kernel_mask(params) == {
    "conv": {"kernel": True, "bias": False},
    "bn": {"scale": False},
    "s": False,
  }


def test_prefix_masks_expand_and_callables_are_called():
  params = {"a": {"x": jnp.ones(2), "y": jnp.ones(3)}, "b": [jnp.ones(1)]}
  assert resolve_mask({"a": False, "b": True}, params, "m") == {
    "a": {"x": False, "y": False},
    "b": [True],
  }
  assert resolve_mask(lambda p: {"a": True, "b": [False]}, params, "m") == {
    "a": {"x": True, "y": True},
    "b": [False],
  }
  assert resolve_mask(None, params, "m") == {"a": {"x": True, "y": True}, "b": [True]}


def test_mask_errors_say_what_is_wrong():
  params = {"a": jnp.ones(2), "b": jnp.ones(3)}
  with pytest.raises(ValueError, match="m must be a pytree of bools with the structure of params"):
    resolve_mask({"a": True}, params, "m")
  with pytest.raises(TypeError, match=r"m leaves must be Python bools.*\['b'\]"):
    resolve_mask({"a": True, "b": jnp.array(True)}, params, "m")


def test_weight_mask_selects_what_pytorch_names_weight_in_flax_nnx_and_equinox():
  import equinox as eqx
  import flax.linen as nn
  import jax
  from flax import nnx

  class Linen(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.BatchNorm(use_running_average=True)(nn.Conv(4, (3,))(x))
      x = nn.LayerNorm()(x) + self.param("pos_embedding", nn.initializers.zeros, (5, 4))
      return nn.Dense(2)(nn.Embed(7, 4)(jnp.zeros((), int)) + x)

  linen = Linen().init(jax.random.key(0), jnp.ones((1, 5, 1)))["params"]
  assert asam_jax.weight_mask(linen) == {
    "BatchNorm_0": {"bias": False, "scale": True},
    "Conv_0": {"bias": False, "kernel": True},
    "Dense_0": {"bias": False, "kernel": True},
    "Embed_0": {"embedding": True},
    "LayerNorm_0": {"bias": False, "scale": True},
    "pos_embedding": False,
  }

  class NNX(nnx.Module):
    def __init__(self, rngs):
      self.conv, self.norm = nnx.Conv(1, 4, (3,), rngs=rngs), nnx.LayerNorm(4, rngs=rngs)
      self.cls = nnx.Param(jnp.zeros((1, 4)))

  state = nnx.state(NNX(nnx.Rngs(0)), nnx.Param)
  mask = asam_jax.weight_mask(nnx.to_pure_dict(state))
  assert mask == {
    "cls": False,
    "conv": {"bias": False, "kernel": True},
    "norm": {"bias": False, "scale": True},
  }
  # The Variable-wrapped State gives the same leaves.
  assert jax.tree.leaves(asam_jax.weight_mask(state)) == jax.tree.leaves(mask)

  model = eqx.nn.Sequential([eqx.nn.Linear(3, 4, key=jax.random.key(0)), eqx.nn.LayerNorm(4)])
  params = eqx.filter(model, eqx.is_inexact_array)
  assert jax.tree.leaves(asam_jax.weight_mask(params)) == [True, False, True, False]


# --- layers stacked for lax.scan -------------------------------------------------------

L, D = 3, 4


def _layers(key):
  ks = jax.random.split(key, 2 * L + 2)
  blocks = [
    {
      "dense": {
        "kernel": jax.random.normal(ks[2 * i], (D, D)) / 2,
        "bias": 0.1 * jax.random.normal(ks[2 * i + 1], (D,)),
      },
      "norm": {"scale": 1 + 0.1 * jax.random.normal(ks[2 * i + 1], (D,))},
    }
    for i in range(L)
  ]
  embed = {"embedding": jax.random.normal(ks[-1], (5, D))}
  return embed, blocks


def _unstacked_loss(params, x):
  h = params["embed"]["embedding"][x]
  for block in params["blocks"]:
    h = jnp.tanh(h @ block["dense"]["kernel"] + block["dense"]["bias"]) * block["norm"]["scale"]
  return jnp.mean(h**2)


def _stacked_loss(params, x):
  def layer(h, block):
    return jnp.tanh(h @ block["dense"]["kernel"] + block["dense"]["bias"]) * block["norm"][
      "scale"
    ], None

  h, _ = jax.lax.scan(layer, params["embed"]["embedding"][x], params["blocks"])
  return jnp.mean(h**2)


def _stack(blocks):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)


MASKS = {
  "all": (None, None),
  "weight_mask": (asam_jax.weight_mask, asam_jax.weight_mask),
  "kernel_mask": (
    asam_jax.kernel_mask,
    lambda p: asam_jax.kernel_mask(p, stacked_axes={"blocks": 1, "embed": 0}),
  ),
}


@pytest.mark.parametrize(
  "method, mask",
  tiered(
    [(m, k) for m in ("sam", "asam", "gsam") for k in MASKS],
    [("asam", "kernel_mask")],
  ),
)
def test_stacked_layers_give_the_updates_of_the_unstacked_ones(method, mask):
  embed, blocks = _layers(jax.random.key(0))
  x = jnp.arange(5)
  unstacked = {"embed": embed, "blocks": blocks}
  stacked = {"embed": embed, "blocks": _stack(blocks)}
  flat_mask, stacked_mask = MASKS[mask]
  kwargs = {} if method == "sam" else dict(adaptive=True) if method == "gsam" else {}
  make = {"sam": asam_jax.sam, "asam": asam_jax.asam, "gsam": asam_jax.gsam}[method]

  def update(params, loss, adaptive_mask):
    extra = {} if method == "sam" else dict(adaptive_mask=adaptive_mask, eta=0.01)
    tx = make(rho=0.3, **kwargs, **extra)
    loss_fn = lambda p: loss(p, x)
    return tx.update(jax.grad(loss_fn)(params), tx.init(params), params, loss_fn=loss_fn)[0]

  flat = update(unstacked, _unstacked_loss, flat_mask)
  got = update(stacked, _stacked_loss, stacked_mask)
  chex.assert_trees_all_close(
    got, {"embed": flat["embed"], "blocks": _stack(flat["blocks"])}, rtol=1e-5, atol=1e-7
  )


def test_kernel_mask_counts_only_the_axes_after_the_stacked_ones():
  embed, blocks = _layers(jax.random.key(0))
  stacked = {"embed": embed, "blocks": _stack(blocks)}
  mask = asam_jax.kernel_mask(stacked, stacked_axes={"blocks": 1, "embed": 0})
  assert mask == {
    "embed": {"embedding": True},
    "blocks": {"dense": {"kernel": True, "bias": False}, "norm": {"scale": False}},
  }
  # Without stacked_axes the stacked bias would read as a kernel: refused, with both fixes.
  with pytest.raises(
    ValueError, match=r"\['blocks'\]\['dense'\]\['bias'\].*stacked_axes=1.*stacked_axes=0"
  ):
    asam_jax.kernel_mask(stacked)
  with pytest.raises(ValueError, match="a pytree prefix of params"):
    asam_jax.kernel_mask(stacked, stacked_axes={"blocks": 1})
  # A genuinely 2-D bias (nn.DenseGeneral's) is a kernel when the caller says so.
  general = {"query": {"kernel": jnp.ones((4, 2, 2)), "bias": jnp.ones((2, 2))}}
  assert asam_jax.kernel_mask(general, stacked_axes=0)["query"]["bias"]
