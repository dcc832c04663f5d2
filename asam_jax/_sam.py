"""SAM and ASAM as optax gradient transformations that take a loss closure."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from asam_jax import _validation
from asam_jax._masks import Mask, resolve_masks
from asam_jax._perturbation import perturbation_with_norm
from asam_jax._varying import invariant_axes, to_varying

ScalarOrSchedule = float | chex.Array | optax.Schedule

_MISSING_LOSS_FN = (
  "SAM/ASAM evaluate the gradient at perturbed weights, so update needs the "
  "loss as a closure over the current batch: "
  "tx.update(grads, state, params, loss_fn=lambda p: loss(p, batch))."
)


class SAMState(NamedTuple):
  """State of :func:`sam` and :func:`asam`.

  Attributes:
    count: the number of updates so far; schedules for ``rho`` and ``eta`` are
      evaluated at it.
    perturbed_loss: ``L(w + eps)`` at the last update, averaged over
      ``axis_name`` when one is given. Worth logging: minus the clean loss it
      is the (first-order) sharpness.
    perturbation_norm: ``||eps||_2`` at the last update, averaged likewise.
  """

  count: chex.Array
  perturbed_loss: chex.Array
  perturbation_norm: chex.Array


def _summed_gradient_message(names: tuple[Any, ...]) -> str:
  name = names[0] if len(names) == 1 else names
  return (
    f"The gradient passed to update is invariant over the shard_map axis {name!r}: "
    "jax.grad with respect to replicated params inside shard_map (check_vma=True) "
    "returns the gradient already summed over the devices, so each device's own "
    "gradient, which mSAM perturbs with, is lost and the step would silently be "
    "global SAM with an n-times gradient. Take the gradient with respect to params "
    f"cast to varying: grads = jax.grad(loss_fn)(asam_jax.to_varying(params, {name!r})) "
    f"(that is jax.lax.pcast(params, {name!r}, to='varying')), and pass that local "
    "gradient; update averages over the axis itself."
  )


def _value_at(value: ScalarOrSchedule, count: chex.Array) -> chex.Numeric:
  return value(count) if callable(value) else value


def _scalar_loss(loss_fn: Callable[[Any], Any], has_aux: bool) -> Callable[[Any], chex.Array]:
  """Wraps ``loss_fn`` to return the bare loss, or to say why it cannot."""

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
    shape, dtype = jnp.shape(out), jnp.result_type(out)
    if shape != () or not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
        f"loss_fn must return a scalar float loss, got shape {shape} and "
        f"dtype {dtype}. Reduce it over the batch, e.g. with .mean()."
      )
    return out

  return loss


def _check_call(loss_fn: Any, params: Any) -> None:
  """Says how to call ``update`` when the loss closure or the weights are missing."""
  if loss_fn is None:
    raise TypeError(_MISSING_LOSS_FN)
  if params is None:
    raise ValueError("SAM/ASAM perturb the weights, so update needs params: " + _MISSING_LOSS_FN)


def _value_and_grad_at(
  loss_fn: Callable[[Any], Any],
  has_aux: bool,
  params: Any,
  perturbation_tree: Any,
  axis_name: Any = None,
) -> tuple[chex.Array, Any]:
  """``L(w + eps)`` and its gradient, the one extra pass every SAM variant pays for."""
  perturbed_params = optax.apply_updates(params, perturbation_tree)
  if axis_name is not None:
    # With replicated params and a synchronized eps, w + eps is invariant, and
    # shard_map's jax.grad would sum the perturbed gradient instead of giving
    # this device's.
    perturbed_params = to_varying(perturbed_params, axis_name)
  return jax.value_and_grad(_scalar_loss(loss_fn, has_aux))(perturbed_params)


def _sharpness_aware(
  rho: ScalarOrSchedule,
  eta: ScalarOrSchedule,
  *,
  adaptive: bool,
  eps: float,
  adaptive_mask: Mask | None,
  perturb_mask: Mask | None,
  has_aux: bool,
  p: float = 2,
  axis_name: Any = None,
  sync_perturbation: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """The SAM/ASAM transformation behind :func:`sam`, :func:`asam` and the variants."""
  p = _validation.check_p(p)
  _validation.check_nonnegative("rho", rho)
  _validation.check_nonnegative("eta", eta)
  _validation.check_positive("eps", eps)
  if sync_perturbation and axis_name is None:
    raise ValueError(
      "sync_perturbation=True averages the gradient over a device axis, so "
      "it needs axis_name, the name given to pmap or shard_map."
    )

  def init_fn(params):
    # Masks are checked against the parameters here, before any tracing.
    resolve_masks(params, adaptive=adaptive, adaptive_mask=adaptive_mask, perturb_mask=perturb_mask)
    return SAMState(
      count=jnp.zeros([], jnp.int32),
      perturbed_loss=jnp.zeros([], jnp.float32),
      perturbation_norm=jnp.zeros([], jnp.float32),
    )

  def update_fn(updates, state, params=None, *, loss_fn=None, **extra_args):
    del extra_args
    _check_call(loss_fn, params)
    grads = updates
    if axis_name is not None and (summed := invariant_axes(grads, axis_name)):
      raise ValueError(_summed_gradient_message(summed))
    if sync_perturbation:
      grads = jax.lax.pmean(grads, axis_name)
    perturbation_tree, perturbation_norm = perturbation_with_norm(
      grads,
      params,
      rho=_value_at(rho, state.count),
      eta=_value_at(eta, state.count),
      adaptive=adaptive,
      p=p,
      eps=eps,
      adaptive_mask=adaptive_mask,
      perturb_mask=perturb_mask,
    )
    loss, adversarial_grads = _value_and_grad_at(
      loss_fn, has_aux, params, perturbation_tree, axis_name
    )
    stats = (loss.astype(jnp.float32), perturbation_norm.astype(jnp.float32))
    if axis_name is not None:
      adversarial_grads, stats = jax.lax.pmean((adversarial_grads, stats), axis_name)
    return adversarial_grads, SAMState(numerics.safe_increment(state.count), *stats)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sam(
  rho: ScalarOrSchedule = 0.05,
  *,
  p: float = 2,
  eps: float = 1e-12,
  perturb_mask: Mask | None = None,
  axis_name: Any = None,
  sync_perturbation: bool = False,
  has_aux: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Sharpness-Aware Minimization: the gradient at the worst nearby weights.

  Given the clean gradient ``g`` at ``w``, returns ``grad L(w + eps)`` with
  ``eps = rho g / ||g||_2`` (for p = 2). Put it first in an ``optax.chain``, so
  that every later transformation (weight decay, clipping, momentum, Adam)
  sees the SAM gradient, as in Algorithm 1 of the paper.

  Args:
    rho: the neighbourhood radius, >= 0, or an optax schedule of the step
      count, which advances on every update. 0 recovers the base optimizer.
    p: the norm of the ball: 2, ``float('inf')`` or any real number >= 1.
    eps: the smallest gradient norm divided by: a zero gradient gives
      ``eps = 0`` rather than NaN.
    perturb_mask: which leaves are perturbed, a pytree of bools or a callable of
      params (as ``optax.masked`` takes); the rest keep ``eps = 0`` and stay
      out of the norm.
    axis_name: inside ``pmap``/``shard_map`` (or ``vmap``, see
      :func:`asam_jax.grouped_update`), the device axis, or a tuple of axes.
      Each device perturbs with its own gradient (m-sharpness) and the
      returned gradient is averaged over the axis. Under ``shard_map`` take
      the gradient with respect to ``asam_jax.to_varying(params, axis_name)``:
      a gradient already summed over the devices is refused.
    sync_perturbation: with ``axis_name``, average the gradient over the axis
      before perturbing: one global perturbation instead of one per device.
    has_aux: ``loss_fn`` returns ``(loss, aux)``; the perturbed pass's ``aux``
      is dropped, so the caller keeps the clean pass's (BatchNorm statistics).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``loss_fn=``, a closure ``params -> scalar loss`` over the current batch.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, optax, asam_jax
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> loss_fn = lambda p: jnp.sum(p["w"] ** 2)
    >>> tx = optax.chain(asam_jax.sam(rho=0.1), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss_fn)(params)
    >>> updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    >>> params = optax.apply_updates(params, updates)
    >>> print(np.asarray(params["w"]).round(4), np.asarray(state[0].perturbation_norm).round(4))
    [ 0.7911 -1.5821] 0.1

  References:
    Foret et al., Sharpness-Aware Minimization for Efficiently Improving
    Generalization, ICLR 2021, Algorithm 1.
  """
  return _sharpness_aware(
    rho,
    0.0,
    adaptive=False,
    p=p,
    eps=eps,
    adaptive_mask=None,
    perturb_mask=perturb_mask,
    axis_name=axis_name,
    sync_perturbation=sync_perturbation,
    has_aux=has_aux,
  )


def asam(
  rho: ScalarOrSchedule = 0.5,
  eta: ScalarOrSchedule = 0.01,
  *,
  p: float = 2,
  eps: float = 1e-12,
  adaptive_mask: Mask | None = None,
  perturb_mask: Mask | None = None,
  axis_name: Any = None,
  sync_perturbation: bool = False,
  has_aux: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Adaptive SAM: SAM in the scale-invariant geometry ``T_w = diag(|w| + eta)``.

  Returns ``grad L(w + eps)`` with ``eps = rho T^2 g / ||T g||_2`` (for p = 2),
  the first-order maximizer over ``||T^-1 eps||_p <= rho``. Since
  ``T_{Aw} A^-1 = T_w`` for positive per-neuron rescalings ``A`` (and
  ``eta = 0``), the perturbed loss does not depend on how a ReLU network is
  scaled. Put it first in an ``optax.chain``.

  By default every leaf is scaled, as in the paper. The official PyTorch code
  scales weight matrices only; ``adaptive_mask=asam_jax.kernel_mask`` gives
  that convention.

  Args:
    rho: the neighbourhood radius, >= 0, or an optax schedule. ASAM's radius is
      relative to ``|w|``, so it is typically ~10x SAM's (the paper uses 0.5
      to 2 on CIFAR).
    eta: the offset that keeps ``T_w`` away from 0 on zero weights, >= 0, or a
      schedule.
    p: the norm of the ball: 2, ``float('inf')`` or any real number >= 1.
    eps: the smallest norm divided by: a zero gradient gives ``eps = 0``.
    adaptive_mask: which leaves ``T_w`` scales (others get ``T = 1``), a pytree
      of bools or a callable of params.
    perturb_mask: which leaves are perturbed at all.
    axis_name: as in :func:`sam`.
    sync_perturbation: as in :func:`sam`.
    has_aux: as in :func:`sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``loss_fn=``.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, optax, asam_jax
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> loss_fn = lambda p: jnp.sum(p["w"] ** 2)
    >>> tx = optax.chain(asam_jax.asam(rho=0.5, eta=0.0), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss_fn)(params)
    >>> updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    >>> print(np.asarray(optax.apply_updates(params, updates)["w"]).round(4))
    [ 0.7757 -1.406 ]

  References:
    Kwon et al., ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks, ICML 2021, Algorithm 1.
  """
  return _sharpness_aware(
    rho,
    eta,
    adaptive=True,
    p=p,
    eps=eps,
    adaptive_mask=adaptive_mask,
    perturb_mask=perturb_mask,
    axis_name=axis_name,
    sync_perturbation=sync_perturbation,
    has_aux=has_aux,
  )
