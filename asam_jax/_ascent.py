"""The ascent every SAM-type transformation shares: perturb, step out, take the gradient there.

An :class:`Ascent` holds what defines the perturbation (``rho``, ``eta``,
``p``, the masks), the devices (``axis_name``, ``sync_perturbation``) and the
number of ascent steps. ``sam``, ``asam``, ``gsam``, ``looksam`` and
``alternating`` are built on one, so each mode exists once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple, TypeAlias

import chex
import jax
import jax.numpy as jnp
import optax

from asam_jax import _validation
from asam_jax._layout import Layout, check_sync, resolve
from asam_jax._masks import Mask, resolve_masks
from asam_jax._perturbation import ball_norm, ball_scale, perturbation_with_norm, project

ScalarOrSchedule: TypeAlias = float | jax.Array | Callable[[chex.Numeric], chex.Numeric]


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


def value_and_grad_at(
  loss_fn: Callable[[Any], Any], has_aux: bool, params: Any, eps: Any, layout: Layout
) -> tuple[chex.Array, Any]:
  """``L(w + eps)`` and this device's gradient there: the one extra pass SAM pays for."""
  perturbed = layout.local(optax.apply_updates(params, eps))
  return jax.value_and_grad(scalar_loss(loss_fn, has_aux))(perturbed)


class Ascent(NamedTuple):
  """The perturbation of a SAM-type transformation, and where it is evaluated.

  Attributes:
    who: the constructor's name, for error messages.
    rho: the radius, a number or a schedule of the step count.
    eta: ASAM's offset in ``T_w = diag(|w| + eta)``, likewise.
    adaptive: whether ``T_w`` scales (ASAM) or not (SAM).
    p: the norm of the ball.
    eps: norms at most this are divided by it instead.
    adaptive_mask: which leaves ``T_w`` scales.
    perturb_mask: which leaves are perturbed.
    axis_name: the data-parallel axes, or ``None``.
    sync: whether the perturbation is global over ``axis_name``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    steps: the number of ascent steps (1: SAM).
    projection: whether each ascent step is projected back onto the ball.
  """

  who: str
  rho: ScalarOrSchedule
  eta: ScalarOrSchedule
  adaptive: bool
  p: float
  eps: float
  adaptive_mask: Mask | None
  perturb_mask: Mask | None
  axis_name: Any
  sync: bool
  has_aux: bool
  steps: int = 1
  projection: bool = False

  def check_params(self, params: Any) -> None:
    """Checks the masks against the parameters, at ``init``, before any tracing."""
    resolve_masks(
      params,
      adaptive=self.adaptive,
      adaptive_mask=self.adaptive_mask,
      perturb_mask=self.perturb_mask,
    )

  def layout(self, params: Any, grads: Any) -> Layout:
    """The devices this update runs on, or an error that says how to fix the call."""
    return resolve(self.who, self.axis_name, self.sync, params, grads)

  def perturb(
    self, grads: Any, params: Any, count: chex.Array, layout: Layout
  ) -> tuple[Any, chex.Array]:
    """``eps`` for the gradient ``grads`` at ``params``, and ``||T^-1 eps||_p``."""
    return perturbation_with_norm(
      grads,
      params,
      rho=value_at(self.rho, count),
      eta=value_at(self.eta, count),
      adaptive=self.adaptive,
      p=self.p,
      eps=self.eps,
      adaptive_mask=self.adaptive_mask,
      perturb_mask=self.perturb_mask,
      layout=layout,
    )

  def step(
    self, eps: Any, grads: Any, params: Any, count: chex.Array, layout: Layout
  ) -> tuple[Any, chex.Array | None]:
    """``eps`` plus one ascent step along ``grads`` (projected if asked), and its radius.

    Args:
      eps: the perturbation so far, or ``None`` before the first step.
      grads: the gradient at ``w + eps``, already through ``layout.ascent_gradient``.
      params: the unperturbed weights ``w``, whose ``T_w`` scales every step.
      count: the step count the schedules are evaluated at.
      layout: the devices.

    Returns:
      The new perturbation and ``||T^-1 eps||_p``, or ``None`` for the radius
      of an unprojected sum of steps, which would cost a pass.
    """
    more, reached = self.perturb(grads, params, count, layout)
    if eps is None:
      return more, reached
    eps = jax.tree.map(lambda a, b: (a + b).astype(a.dtype), eps, more)
    if not self.projection:
      return eps, None
    return project(eps, self._ball(params, count), value_at(self.rho, count), self.p, layout)

  def radius(self, eps: Any, params: Any, count: chex.Array, layout: Layout) -> chex.Array:
    """``||T^-1 eps||_p`` of an accumulated perturbation."""
    return ball_norm(eps, self._ball(params, count), self.p, layout)

  def _ball(self, params, count):
    return ball_scale(
      params,
      eta=value_at(self.eta, count),
      adaptive=self.adaptive,
      adaptive_mask=self.adaptive_mask,
      perturb_mask=self.perturb_mask,
    )

  def climb(
    self, grads: Any, params: Any, count: chex.Array, loss_fn: Callable[[Any], Any], layout: Layout
  ) -> tuple[chex.Array, Any, chex.Array]:
    """Ascends from ``params`` and returns the loss, the gradient and the radius at the end.

    Args:
      grads: the gradient the first step perturbs with, already through
        ``layout.ascent_gradient``.
      params: the weights ``w``.
      count: the step count the schedules are evaluated at.
      loss_fn: the loss closure.
      layout: the devices.

    Returns:
      ``(L(w + eps), g, ||T^-1 eps||_p)`` with ``g`` the gradient at
      ``w + eps``: this device's own, or, with ``sync``, averaged already.
    """
    eps, reached = self.step(None, grads, params, count, layout)
    for _ in range(self.steps - 1):
      _, grads = value_and_grad_at(loss_fn, self.has_aux, params, eps, layout)
      eps, reached = self.step(eps, layout.ascent_gradient(grads), params, count, layout)
    if reached is None:
      reached = self.radius(eps, params, count, layout)
    loss, grads = value_and_grad_at(loss_fn, self.has_aux, params, eps, layout)
    return loss, layout.perturbed_gradient(grads), reached


def make_ascent(
  who: str,
  rho: ScalarOrSchedule,
  eta: ScalarOrSchedule,
  *,
  adaptive: bool,
  p: float = 2,
  eps: float = 0.0,
  adaptive_mask: Mask | None = None,
  perturb_mask: Mask | None = None,
  axis_name: Any = None,
  sync_perturbation: bool = False,
  has_aux: bool = False,
  ascent_steps: int = 1,
  ascent_projection: bool = False,
) -> Ascent:
  """Checks a constructor's arguments and returns its :class:`Ascent`."""
  # sam's and asam's arguments that optax.inject_hyperparams must leave static.
  statics = ("p", "ascent_steps")
  p = _validation.check_p(p, who, statics)
  _validation.check_nonnegative("rho", rho)
  _validation.check_nonnegative("eta", eta)
  _validation.check_nonnegative("eps", eps)
  check_sync(axis_name, sync_perturbation)
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
    adaptive,
    p,
    eps,
    adaptive_mask,
    perturb_mask,
    axis_name,
    sync_perturbation,
    has_aux,
    steps,
    ascent_projection,
  )
