"""Mask helpers."""

import jax.numpy as jnp
import pytest

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
