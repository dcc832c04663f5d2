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
