"""The ascent every SAM-type transformation shares: perturb, step out, take the gradient there.

An :class:`Ascent` holds what defines the perturbation: its radius, the ball's
geometry ``T`` (SAM's identity, ASAM's ``|w| + eta``, Fisher SAM's
``(1 + eta g^2)^-1/2``), ``p``, the masks, the devices and the number of
ascent steps. Per update it builds a :class:`Ball` at the unperturbed weights,
and :meth:`Ascent.climb` moves out along a direction and takes the gradient
there. The variants change only what they hand it: a direction (Friendly
SAM's ``g - sigma m``, ESAM's drawn leaves, random SAM's sphere), a radius
factor, or the loss of the last pass (ESAM's selected examples).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeAlias

import chex
import jax
import jax.numpy as jnp
import optax

from asam_jax import _validation
from asam_jax._ball import Ball, is_low_precision, make_ball
from asam_jax._layout import Layout, check_sync, resolve
from asam_jax._masks import Mask, resolve_masks
from asam_jax._maximizer import real_gradient

ScalarOrSchedule: TypeAlias = float | jax.Array | Callable[[chex.Numeric], chex.Numeric]
# A direction maps a leaf's index and its gradient (real coordinates) to the vector to follow.
Direction: TypeAlias = Callable[[int, chex.Array], chex.Array]


def value_at(value: Any, count: chex.Array) -> Any:
  """A hyperparameter at step ``count``: a schedule is called, a number passes."""
  return value(count) if callable(value) else value


def missing_loss_fn(who: str) -> str:
  return (
    f"{who} evaluates the gradient at perturbed weights, so update needs the "
    "loss as a closure over the current batch: "
    "tx.update(grads, state, params, loss_fn=lambda p: loss(p, batch)). "
    "In a loop that cannot pass one (Flax's stock TrainState, a framework that "
    "calls tx.update itself), use asam_jax.alternating(tx, optimizer) instead."
  )


def check_call(who: str, loss_fn: Any, params: Any) -> None:
  """Says how to call ``update`` when the loss closure or the weights are missing or partial."""
  if loss_fn is None:
    raise TypeError(missing_loss_fn(who))
  if params is None:
    raise ValueError(f"{who} perturbs the weights, so update needs params: " + missing_loss_fn(who))
  masked = lambda x: isinstance(x, optax.MaskedNode)
  if any(masked(x) for x in jax.tree.leaves(params, is_leaf=masked)):
    raise ValueError(
      f"{who} was given params with optax.MaskedNode placeholders: it sits inside "
      "optax.masked or optax.multi_transform, which hand it only some of the params. "
      "loss_fn needs all of them to evaluate the loss at w + eps, so put it outside and "
      f"say which leaves it perturbs with perturb_mask: optax.chain(asam_jax.{who}(..., "
      "perturb_mask=mask), optax.masked(optimizer, mask))."
    )


def scalar_loss(loss_fn: Callable[[Any], Any], has_aux: bool) -> Callable[[Any], chex.Array]:
  """Wraps ``loss_fn`` to return the bare loss as an array, or to say why it cannot."""

  def loss(params):
    out = loss_fn(params)
    if has_aux:
      if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError(
          f"has_aux=True needs loss_fn to return (loss, aux), got {type(out).__name__}."
        )
      out = out[0]
    elif isinstance(out, (tuple, list)):
      raise TypeError(
        "loss_fn returned a tuple. If it returns (loss, aux), build the "
        "transformation with has_aux=True."
      )
    out = jnp.asarray(out)
    if out.shape != () or not jnp.issubdtype(out.dtype, jnp.floating):
      raise TypeError(
        f"loss_fn must return a scalar float loss, got shape {out.shape} and "
        f"dtype {out.dtype}. Reduce it over the batch, e.g. with .mean(), and "
        "compute it in floating point."
      )
    return out

  return loss


_WARNED: set[str] = set()


def warn_low_precision(who: str, names: Sequence[str]) -> None:
  """Warns once per process that params below float32 round most of a small eps away."""
  if who in _WARNED:
    return
  _WARNED.add(who)
  warnings.warn(
    f"{who} perturbs params stored below float32 ({', '.join(names[:3])}"
    f"{', ...' if len(names) > 3 else ''}): w + eps is rounded to their dtype, which keeps 8 "
    "(bfloat16) or 11 (float16) significant bits, so the part of eps below |w| 2^-8 (or "
    "2^-11) is lost, most of a small eps. The state's perturbation_norm reports the radius "
    "reached after rounding. Keep float32 master weights and compute in low precision "
    "inside the loss (jmp.get_policy('params=float32,compute=bfloat16,output=float32'); see "
    "the README's mixed-precision section).",
    stacklevel=4,
  )


def value_and_grad_at(
  loss_fn: Callable[[Any], Any], has_aux: bool, perturbed: Any, layout: Layout
) -> tuple[chex.Array, Any]:
  """``L(w + eps)`` and this device's gradient there: the one extra pass SAM pays for.

  Integer leaves (left out by ``perturb_mask``) get a zero of their own dtype in
  place of the ``float0`` gradient of ``jax.grad(..., allow_int=True)``, which
  no arithmetic (nor ``optax.apply_updates``) accepts.
  """
  value, grads = jax.value_and_grad(scalar_loss(loss_fn, has_aux), allow_int=True)(
    layout.local(perturbed)
  )
  float0 = jax.dtypes.float0
  grads = jax.tree.map(
    lambda g, w: jnp.zeros_like(w) if jnp.result_type(g) == float0 else g, grads, perturbed
  )
  return value, grads


class Ascent(NamedTuple):
  """The perturbation of a SAM-type transformation, and where it is evaluated.

  Attributes:
    who: the constructor's name, for error messages.
    rho: the radius, a number or a schedule of the step count.
    eta: the geometry's coefficient (ASAM's offset, Fisher SAM's weight), likewise.
    geometry: ``"euclidean"`` (SAM), ``"adaptive"`` (ASAM) or ``"fisher"``
      (Fisher SAM), as :func:`asam_jax._ball.make_ball` builds it.
    p: the norm of the ball.
    floor: norms at most this are divided by it instead (the constructors' ``eps``).
    adaptive_mask: which leaves the geometry scales (``None``: all).
    perturb_mask: which leaves are perturbed.
    axis_name: the data-parallel axes, or ``None``.
    sync: the axes ``sync_perturbation`` averages the gradient over first
      (``()`` for per-device mSAM, every axis of ``axis_name`` for global SAM).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    steps: the number of ascent steps (1: SAM).
    projection: whether each ascent step is projected back onto the ball.
  """

  who: str
  rho: ScalarOrSchedule
  eta: ScalarOrSchedule
  geometry: str
  p: float
  floor: float
  adaptive_mask: Mask | None
  perturb_mask: Mask | None
  axis_name: Any
  sync: Any
  has_aux: bool
  steps: int = 1
  projection: bool = False

  def masks(self, params: Any) -> tuple[Any, Any]:
    """The perturbed leaves and the leaves the geometry scales, one bool per leaf."""
    return resolve_masks(
      params,
      adaptive=self.geometry != "euclidean",
      adaptive_mask=self.adaptive_mask,
      perturb_mask=self.perturb_mask,
    )

  def check_params(self, params: Any) -> None:
    """Checks the masks against the parameters, at ``init``, before any tracing."""
    self.masks(params)

  def layout(self, params: Any, grads: Any) -> Layout:
    """The devices this update runs on, or an error that says how to fix the call."""
    return resolve(self.who, self.axis_name, self.sync, params, grads)

  def ball(self, params: Any, grads: Any, count: chex.Array, layout: Layout) -> Ball:
    """The ball at ``params`` this update; Fisher SAM's ``T`` comes from ``grads``."""
    ball = make_ball(
      params,
      grads,
      rho=value_at(self.rho, count),
      eta=value_at(self.eta, count),
      geometry=self.geometry,
      p=self.p,
      floor=self.floor,
      adaptive_mask=self.adaptive_mask,
      perturb_mask=self.perturb_mask,
      layout=layout,
    )
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    if low := [paths[i] for i in ball.chosen if is_low_precision(ball.params[i])]:
      warn_low_precision(self.who, low)
    return ball

  def directions(self, ball: Ball, grads: Any, direction: Direction | None) -> list[chex.Array]:
    """The vector each chosen leaf follows: its gradient, or ``direction`` of it."""
    leaves = jax.tree.leaves(grads)
    out = [real_gradient(leaves[i]) for i in ball.chosen]
    return out if direction is None else [direction(i, d) for i, d in zip(ball.chosen, out)]

  def advance(
    self,
    ball: Ball,
    eps: list[chex.Array] | None,
    grads: Any,
    direction: Direction | None = None,
    rho: Any = None,
  ) -> tuple[list[chex.Array], chex.Array | None]:
    """One ascent step from ``eps`` (``None``: from ``w``) along ``grads``, and its radius.

    Returns the radius ``None`` for an unprojected sum of steps, whose radius would cost a pass.
    """
    more, reached = ball.maximizer(self.directions(ball, grads, direction), rho=rho)
    if eps is None:
      return more, reached
    eps = [a + b for a, b in zip(eps, more)]
    return ball.project(eps) if self.projection else (eps, None)

  def climb(
    self,
    ball: Ball,
    grads: Any,
    loss_fn: Callable[[Any], Any],
    *,
    direction: Direction | None = None,
    first: Callable[[Ball], list[chex.Array]] | None = None,
    rho_factor: Any = 1,
    last: Callable[[Any], tuple[chex.Array, Any]] | None = None,
  ) -> tuple[chex.Array, Any, chex.Array]:
    """Ascends from the ball's centre and returns the loss, the gradient and the radius at the end.

    Args:
      ball: the ball of this update.
      grads: the gradient the first step follows (through ``layout.ascent_gradient``).
      loss_fn: the loss closure.
      direction: maps each leaf's gradient to the vector followed, at every step.
      first: instead of ``grads``, ``ball -> u``: the first step's point of
        the ball's coordinates, per chosen leaf (random SAM's draw on the sphere).
      rho_factor: multiplies the radius of every step (ESAM's ``1 / beta``).
      last: ``perturbed params -> (loss, gradient)`` for the last pass, in place
        of ``loss_fn``'s value and gradient.

    Returns:
      ``(L(w + eps), g, ||T^-1 eps||_p)`` with ``g`` the gradient at
      ``w + eps``: this device's own, or averaged over the synced axes.
    """
    layout = ball.layout
    if first is None:
      eps, reached = ball.maximizer(
        self.directions(ball, grads, direction), rho=ball.rho * rho_factor
      )
    else:
      eps, reached = ball.maximizer(first(ball), in_ball=True, rho=ball.rho * rho_factor)
    for _ in range(self.steps - 1):
      _, g = value_and_grad_at(loss_fn, self.has_aux, ball.shift(eps), layout)
      g = layout.ascent_gradient(g)
      eps, reached = self.advance(ball, eps, g, direction, ball.rho * rho_factor)
    perturbed = ball.shift(eps)
    if reached is None or any(is_low_precision(ball.params[i]) for i in ball.chosen):
      reached = ball.reached(perturbed)
    if last is None:
      loss, g = value_and_grad_at(loss_fn, self.has_aux, perturbed, layout)
    else:
      loss, g = last(layout.local(perturbed))
    return loss, layout.perturbed_gradient(g), reached


def make_ascent(
  who: str,
  rho: ScalarOrSchedule,
  eta: ScalarOrSchedule = 0.0,
  *,
  geometry: str = "euclidean",
  p: float = 2,
  eps: float = 0.0,
  adaptive_mask: Mask | None = None,
  perturb_mask: Mask | None = None,
  axis_name: Any = None,
  sync_perturbation: Any = False,
  has_aux: bool = False,
  ascent_steps: int = 1,
  ascent_projection: bool = False,
) -> Ascent:
  """Checks a constructor's arguments and returns its :class:`Ascent`."""
  # The arguments that optax.inject_hyperparams must leave static.
  statics = ("p", "ascent_steps")
  p = _validation.check_p(p, who, statics)
  _validation.check_nonnegative("rho", rho)
  _validation.check_nonnegative("eta", eta)
  _validation.check_nonnegative("eps", eps)
  sync = check_sync(axis_name, sync_perturbation)
  steps = _validation.static_int(
    "ascent_steps",
    ascent_steps,
    minimum=1,
    who=who,
    statics=statics,
    meaning="the number of ascent steps",
  )
  if ascent_projection and p not in (2, math.inf):
    raise ValueError(
      f"ascent_projection supports p=2 and p=float('inf'), got p={p}: those are the balls "
      "whose projection is exact."
    )
  return Ascent(
    who,
    rho,
    eta,
    geometry,
    p,
    eps,
    adaptive_mask,
    perturb_mask,
    axis_name,
    sync,
    has_aux,
    steps,
    ascent_projection,
  )
