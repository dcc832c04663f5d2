"""Checks that turn bad hyperparameters into clear errors instead of NaNs."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _injected_message(name: str, what: str, who: str, statics: tuple[str, ...]) -> str:
  return (
    f"{name} is traced, but it {what} and must be static. optax.inject_hyperparams "
    f"injects every numeric argument, defaults included: build with "
    f"optax.inject_hyperparams(asam_jax.{who}, static_args={statics!r})."
  )


def check_p(p: Any, who: str = "sam", statics: tuple[str, ...] = ("p",)) -> float:
  """Returns ``p`` as a float after checking that it names an l_p ball.

  Args:
    p: the norm of the perturbation ball: a real number >= 1, or ``inf``.
    who: the constructor, for the message.
    statics: its arguments that ``optax.inject_hyperparams`` must leave static.

  Returns:
    ``float(p)``.

  Raises:
    TypeError: ``p`` is not a real number, or is traced.
    ValueError: ``p`` is NaN or smaller than 1.
  """
  if isinstance(p, jax.core.Tracer):
    raise TypeError(_injected_message("p", "picks the formula", who, statics))
  if isinstance(p, (jax.Array, np.ndarray)) and p.shape == ():
    p = p.item()
  if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)):
    raise TypeError(f"p must be a real number >= 1 or float('inf'), got {p!r}.")
  p = float(p)
  if math.isnan(p) or p < 1:
    raise ValueError(
      f"p must be >= 1, got {p}: the perturbation ball ||T^-1 eps||_p <= rho "
      "is only convex for p >= 1. Use p=2 (SAM/ASAM) or p=float('inf')."
    )
  return p


def check_nonnegative(name: str, value: Any) -> None:
  """Checks a hyperparameter that is a float, a concrete array or a schedule.

  Traced values (e.g. the ones ``optax.inject_hyperparams`` feeds in under
  ``jit``) cannot be inspected and pass through; they were checked when the
  transformation was built outside ``jit``.

  Args:
    name: the hyperparameter's name, for the error message.
    value: a number, a scalar array, or a schedule ``count -> value``.

  Raises:
    TypeError: ``value`` is not a scalar.
    ValueError: ``value`` is negative or not finite.
  """
  if callable(value):
    try:
      value = value(jnp.zeros([], jnp.int32))
    except Exception as e:
      raise TypeError(
        f"{name} is callable, so it must be an optax schedule: a function "
        f"of the step count. Calling it with count=0 failed: {e}"
      ) from e
    name = f"{name}(0), the schedule's first value,"
  if isinstance(value, jax.core.Tracer):
    return
  array = np.asarray(value)
  if array.shape != () or not np.issubdtype(array.dtype, np.number):
    raise TypeError(f"{name} must be a real scalar, got {value!r}.")
  if not np.isfinite(array) or array < 0:
    raise ValueError(f"{name} must be finite and >= 0, got {array.item()}.")


def check_positive(name: str, value: Any) -> None:
  """Checks a static, strictly positive and finite float such as ``eps``."""
  if callable(value):
    raise TypeError(f"{name} must be a number, not a schedule, got {value!r}.")
  check_nonnegative(name, value)
  if not isinstance(value, jax.core.Tracer) and np.asarray(value) <= 0:
    raise ValueError(
      f"{name} must be > 0, got {value}: it guards the division by the "
      "gradient norm, so 0 would give NaN on a zero gradient."
    )


def guard(value: Any, dtype: Any) -> Any:
  """A hyperparameter as used at run time: NaN where it is negative or not finite.

  A schedule that crosses zero, or a value set through
  ``optax.inject_hyperparams`` under ``jit``, cannot be checked when the
  transformation is built. Turned into NaN, it makes the update NaN, so that
  ``optax.apply_if_finite`` skips the step instead of taking a plausible
  wrong one. Python numbers were checked at construction and pass as they are.
  """
  if isinstance(value, (int, float)):
    return value
  value = jnp.asarray(value, dtype)
  return jnp.where(jnp.isfinite(value) & (value >= 0), value, jnp.nan)


def static_int(
  name: str, value: Any, *, minimum: int, who: str, statics: tuple[str, ...], meaning: str
) -> int:
  """Checks an int that shapes the computation (a count of steps), which must not be traced.

  Args:
    name: the argument's name.
    value: its value.
    minimum: the smallest value allowed.
    who: the constructor, for the message.
    statics: its arguments that ``optax.inject_hyperparams`` must leave static.
    meaning: what the argument is, for the message.

  Returns:
    ``value``.

  Raises:
    TypeError: ``value`` is an array, as ``optax.inject_hyperparams`` passes
      it without ``static_args``.
    ValueError: ``value`` is not an int >= ``minimum``.
  """
  if isinstance(value, (jax.Array, np.ndarray)):
    raise TypeError(_injected_message(name, f"is {meaning}", who, statics))
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum} ({meaning}), got {value!r}.")
  return int(value)


def in_interval(
  name: str, value: Any, *, low: float, high: float, closed_low: bool, meaning: str
) -> Any:
  """A hyperparameter in ``[low, high)`` (or ``(low, high]`` when not ``closed_low``).

  Checked now when concrete; when traced (``optax.inject_hyperparams``), an
  invalid value becomes NaN at run time, which makes the update NaN.
  """
  if isinstance(value, jax.core.Tracer):
    above = value >= low if closed_low else value > low
    below = value < high if closed_low else value <= high
    return jnp.where(above & below, value, jnp.nan)
  above = value >= low if closed_low else value > low
  below = value < high if closed_low else value <= high
  if not (above and below):
    interval = f"[{low}, {high})" if closed_low else f"({low}, {high}]"
    raise ValueError(f"{name} must be in {interval}, got {value}: it is {meaning}.")
  return value


def only_state(state: Any, kind: type, constructors: str) -> Any:
  """The one ``kind`` inside an optimizer state (a chain's tuple, ``nnx.Optimizer``'s ``opt_state``)."""
  found = [
    s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, kind)) if isinstance(s, kind)
  ]
  if len(found) != 1:
    raise ValueError(
      f"state must contain exactly one {kind.__name__} (the state of {constructors}), "
      f"found {len(found)}."
    )
  return found[0]
