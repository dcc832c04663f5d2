"""SAM and ASAM in Equinox: a module's clean pass and the loss closure for the perturbed pass.

A submodule, imported on its own (``import asam_jax.equinox``), so that the
core needs no Equinox. :func:`value_and_grad` does what every Equinox train
step with SAM/ASAM otherwise writes by hand: it partitions the model into
the differentiated arrays (``eqx.is_inexact_array``: integer arrays, Python
numbers and functions stay out, so ``jax.grad`` never sees an integer leaf)
and the rest, takes the clean loss and gradient, and returns the closure
``params -> loss`` that ``tx.update(..., loss_fn=)`` evaluates at
``w + eps``. Pass ``tx.init`` and ``tx.update`` the same partition,
``eqx.filter(model, eqx.is_inexact_array)``; with ``eqx.is_array`` an integer
array would be in ``params`` but not in ``grads``, and ``update`` refuses the
two structures.

The closure is built from the arguments of the clean pass, which are
immutable, so the two rules of :mod:`asam_jax.flax` hold by construction:

- BatchNorm (``eqx.nn.BatchNorm`` with an ``eqx.nn.State``): pass the state
  as an argument and return ``(loss, new_state)`` with ``has_aux=True``.
  Keep the clean pass's ``new_state``. The perturbed pass starts from the
  same old state, so it normalizes as the clean pass did (in ``mode="ema"``
  the normalization mixes in the running statistics), and the state it
  returns is dropped.
- Dropout (``eqx.nn.Dropout(p)(x, key=key)``): pass the key as an argument,
  and both passes drop the same units. SAM's ascent step ``eps`` is computed
  from the gradient of one sub-network; with a fresh mask the perturbed
  gradient would belong to another, for which ``eps`` is not the ascent
  direction, and the step would mix sharpness with dropout noise. Derive the
  key from the step count (``jax.random.fold_in``) and a resumed run replays
  the same masks.

Float arrays that are not trained (a fixed positional encoding, say) pass
``eqx.is_inexact_array`` too, as in any Equinox training loop: leave them out
with ``filter_spec``, and filter ``params`` for ``tx.init`` and ``tx.update``
with the same spec.

References:
  Foret et al., Sharpness-Aware Minimization for Efficiently Improving
  Generalization, ICLR 2021; Kwon et al., ASAM: Adaptive Sharpness-Aware
  Minimization for Scale-Invariant Learning of Deep Neural Networks, ICML 2021.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax

__all__ = ["value_and_grad"]


def value_and_grad(
  loss: Callable[..., Any],
  model: Any,
  *args: Any,
  has_aux: bool = False,
  filter_spec: Any = eqx.is_inexact_array,
) -> tuple[Any, Any, Callable[[Any], jax.Array]]:
  """The clean pass of an Equinox model, and the loss closure for the perturbed pass.

  Partitions ``model`` with ``filter_spec`` into ``params`` and the rest,
  runs ``loss(model, *args)`` and its gradient with respect to ``params``,
  and returns ``loss_fn``, the closure ``params -> loss`` over the rest of
  the model and ``args`` that ``tx.update(grads, opt_state, params,
  loss_fn=loss_fn)`` evaluates at the perturbed weights. The train step,
  with ``params = eqx.filter(model, eqx.is_inexact_array)``::

    @eqx.filter_jit
    def train_step(model, opt_state, x, y):
      value, grads, loss_fn = asam_jax.equinox.value_and_grad(loss, model, x, y)
      params = eqx.filter(model, eqx.is_inexact_array)
      updates, opt_state = tx.update(grads, opt_state, params, loss_fn=loss_fn)
      return eqx.apply_updates(model, updates), opt_state, value

  Args:
    loss: ``loss(model, *args)`` returning a scalar loss, or ``(loss, aux)``
      with ``has_aux=True`` (e.g. the ``eqx.nn.State`` of BatchNorm).
    model: the Equinox module, or any pytree.
    *args: the batch, and anything else ``loss`` takes: an ``eqx.nn.State``,
      a dropout key. Both passes see the same ``args``.
    has_aux: ``loss`` returns ``(loss, aux)``. ``loss_fn`` returns the bare
      loss either way, so the transformation needs no ``has_aux``, and the
      perturbed pass's ``aux`` is dropped.
    filter_spec: which leaves of ``model`` are differentiated (and perturbed),
      as ``eqx.partition`` takes it. ``tx.init`` and ``tx.update`` need
      ``params = eqx.filter(model, filter_spec)``, with the same filter.

  Returns:
    ``(value, grads, loss_fn)``: the clean pass's ``loss`` output, its
    gradient (``model``'s structure, ``None`` where ``filter_spec`` is false),
    and the closure ``params -> scalar loss`` for ``tx.update``.

  Example:
    >>> import equinox as eqx, jax, jax.numpy as jnp, optax, asam_jax, asam_jax.equinox
    >>> model = eqx.nn.Linear(2, 1, key=jax.random.key(0))
    >>> tx = optax.chain(asam_jax.asam(rho=0.5), optax.sgd(0.1))
    >>> opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))
    >>> mse = lambda model, x, y: jnp.mean((jax.vmap(model)(x) - y) ** 2)
    >>> @eqx.filter_jit
    ... def train_step(model, opt_state, x, y):
    ...   value, grads, loss_fn = asam_jax.equinox.value_and_grad(mse, model, x, y)
    ...   params = eqx.filter(model, eqx.is_inexact_array)
    ...   updates, opt_state = tx.update(grads, opt_state, params, loss_fn=loss_fn)
    ...   return eqx.apply_updates(model, updates), opt_state, value
    >>> x, y = jnp.ones((4, 2)), jnp.full((4, 1), 2.0)
    >>> values = []
    >>> for _ in range(3):
    ...   model, opt_state, value = train_step(model, opt_state, x, y)
    ...   values.append(round(float(value), 2))
    >>> print(values, int(opt_state[0].count))
    [7.09, 0.6, 0.0] 3

  References:
    Foret et al., Sharpness-Aware Minimization for Efficiently Improving
    Generalization, ICLR 2021, Algorithm 1; Kwon et al., ASAM, ICML 2021,
    Algorithm 1.
  """
  params, static = eqx.partition(model, filter_spec)

  def clean(params):
    return loss(eqx.combine(params, static), *args)

  def loss_fn(params):
    out = clean(params)
    return out[0] if has_aux else out

  value, grads = jax.value_and_grad(clean, has_aux=has_aux)(params)
  return value, grads, loss_fn
