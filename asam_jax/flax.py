"""SAM and ASAM in Flax: a Linen train state and an NNX clean pass with its loss closure.

A submodule, imported on its own (``import asam_jax.flax``), so that the core
needs no Flax. Both helpers follow the same two rules for models with
BatchNorm and Dropout:

- Running statistics come from the clean pass at ``w`` only. The perturbed
  pass at ``w + eps`` runs in training mode too (it must see the same batch
  statistics as the clean pass, or it would differentiate another function),
  but whatever it writes to the statistics is dropped.
- The perturbed pass uses the clean pass's dropout key. SAM's ascent step
  ``eps`` is computed from the gradient of one sub-network; with a fresh mask
  the perturbed gradient would belong to another sub-network, for which
  ``eps`` is not the ascent direction, and the step would mix sharpness with
  dropout noise.

References:
  Foret et al., Sharpness-Aware Minimization for Efficiently Improving
  Generalization, ICLR 2021; Kwon et al., ASAM, ICML 2021.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import optax
from flax import nnx
from flax.training import train_state

__all__ = ["TrainState", "nnx_value_and_grad"]


class TrainState(train_state.TrainState):
  """Flax's Linen ``TrainState`` with ``batch_stats``, for SAM/ASAM.

  Flax's ``apply_gradients`` calls ``tx.update(grads, opt_state, params)`` and
  has no way to pass the loss closure on. This one takes ``loss_fn`` and gives
  it to ``tx.update`` (a ``tx`` without extra arguments, such as a bare
  ``optax.sgd``, ignores it); everything else (the step count, extra fields
  replaced through ``**kwargs``) is Flax's own ``apply_gradients``.

  The train-step pattern: ``loss`` returns ``(loss, new_batch_stats)`` from
  ``apply_fn(..., mutable=['batch_stats'])`` with a fixed dropout key, the
  clean pass's statistics are kept, and the transformation is built with
  ``has_aux=True`` so that it drops the perturbed pass's. Since ``loss``
  closes over one key, both passes drop the same units.

  Attributes:
    batch_stats: the model's ``batch_stats`` collection, or ``None``.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, optax, asam_jax, asam_jax.flax
    >>> import flax.linen as nn
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train):
    ...     x = nn.BatchNorm(use_running_average=not train)(nn.Dense(4)(x))
    ...     return nn.Dense(1)(nn.Dropout(0.5, deterministic=not train)(nn.relu(x)))
    >>> x, y = jnp.linspace(-1, 1, 12).reshape(4, 3), jnp.ones((4, 1))
    >>> variables = Net().init(jax.random.key(0), x, train=False)
    >>> state = asam_jax.flax.TrainState.create(
    ...     apply_fn=Net().apply, params=variables["params"],
    ...     batch_stats=variables["batch_stats"],
    ...     tx=optax.chain(asam_jax.sam(rho=0.05, has_aux=True), optax.sgd(0.1)))
    >>> @jax.jit
    ... def train_step(state, x, y, dropout_key):
    ...   def loss(params):
    ...     out, updates = state.apply_fn(
    ...         {"params": params, "batch_stats": state.batch_stats}, x, train=True,
    ...         rngs={"dropout": dropout_key}, mutable=["batch_stats"])
    ...     return jnp.mean((out - y) ** 2), updates["batch_stats"]
    ...   (value, batch_stats), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
    ...   return state.apply_gradients(grads=grads, loss_fn=loss, batch_stats=batch_stats), value
    >>> state, value = train_step(state, x, y, jax.random.key(1))
    >>> print(int(state.step), int(state.opt_state[0].count))
    1 1

  References:
    Foret et al., Sharpness-Aware Minimization for Efficiently Improving
    Generalization, ICLR 2021, Algorithm 1.
  """

  batch_stats: Any = None

  def apply_gradients(
    self, *, grads: Any, loss_fn: Callable[[Any], Any] | None = None, **kwargs: Any
  ) -> Any:
    """Applies one update: ``tx.update(grads, opt_state, params, loss_fn=loss_fn)``.

    Without ``loss_fn`` it is Flax's own ``apply_gradients``, for a
    transformation that needs no closure (a plain optimizer, Momentum-SAM,
    :func:`asam_jax.alternating`); SAM/ASAM then say that they need one.

    Args:
      grads: the clean gradient, with the structure of ``params``.
      loss_fn: the closure ``params -> loss`` (or ``(loss, aux)`` with
        ``has_aux=True``) over the current batch and dropout key.
      **kwargs: fields to replace, e.g. ``batch_stats`` from the clean pass.

    Returns:
      The state after the update, with ``step`` incremented.
    """
    if loss_fn is None:
      return super().apply_gradients(grads=grads, **kwargs)
    tx = self.tx
    # tx is a static field, so binding the closure to it is free under jit. A
    # plain optimizer (an SGD baseline run through the same train step) ignores it.
    update = functools.partial(optax.with_extra_args_support(tx).update, loss_fn=loss_fn)
    bound = optax.GradientTransformation(tx.init, update)
    stepped = train_state.TrainState.apply_gradients(self.replace(tx=bound), grads=grads, **kwargs)
    return stepped.replace(tx=tx)


def nnx_value_and_grad(
  loss: Callable[..., Any],
  model: nnx.Module,
  *args: Any,
  wrt: Any = nnx.Param,
  has_aux: bool = False,
) -> tuple[Any, Any, Callable[[Any], jax.Array]]:
  """The clean pass of an NNX model, and the loss closure for the perturbed pass.

  Runs ``loss(model, *args)`` and its gradient with respect to the ``wrt``
  variables, updating ``model`` as a training pass does (BatchNorm
  statistics, the Dropout RNG counts). It also returns ``loss_fn``, the
  closure that ``nnx.Optimizer(model, tx, wrt=wrt).update(model, grads,
  loss_fn=loss_fn)`` hands on to ``tx.update``: Flax 0.12's ``update`` passes
  its keyword arguments to ``tx.update`` and the ``wrt`` state, as plain
  arrays, as ``params``. ``loss_fn`` evaluates ``loss`` on a copy of the
  model rebuilt from those params and from the model's other variables as
  they were *before* the clean pass: it draws the same dropout keys as the
  clean pass, and its writes to statistics and RNG counts go to the copy and
  are lost. An ``nnx.Rngs`` (or any NNX object) passed in ``args``, as in
  ``model(x, rngs=rngs)``, is replayed the same way: the perturbed pass draws
  from a copy of it as it was before the clean pass, eagerly and under
  ``nnx.jit``.

  Args:
    loss: ``loss(model, *args)`` returning a scalar loss, or ``(loss, aux)``
      with ``has_aux=True``.
    model: the NNX module; it is updated in place by the clean pass.
    *args: the batch, and anything else ``loss`` takes.
    wrt: the filter of the differentiated variables; the optimizer's ``wrt``.
    has_aux: ``loss`` returns ``(loss, aux)``. ``loss_fn`` returns the bare
      loss either way, so the transformation needs no ``has_aux``.

  Returns:
    ``(value, grads, loss_fn)``: the clean pass's ``loss`` output, its
    gradient as an ``nnx.State`` of the ``wrt`` variables, and the closure
    ``params -> scalar loss`` for ``tx.update``.

  Example:
    >>> import jax.numpy as jnp, optax, asam_jax, asam_jax.flax
    >>> from flax import nnx
    >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(
    ...     model, optax.chain(asam_jax.asam(rho=0.5), optax.sgd(0.1)), wrt=nnx.Param)
    >>> mse = lambda model, x, y: jnp.mean((model(x) - y) ** 2)
    >>> @nnx.jit
    ... def train_step(model, optimizer, x, y):
    ...   value, grads, loss_fn = asam_jax.flax.nnx_value_and_grad(mse, model, x, y)
    ...   optimizer.update(model, grads, loss_fn=loss_fn)
    ...   return value
    >>> x, y = jnp.ones((4, 2)), jnp.full((4, 1), 2.0)
    >>> print([round(float(train_step(model, optimizer, x, y)), 2) for _ in range(3)])
    [3.72, 0.21, 0.05]

  References:
    Foret et al., Sharpness-Aware Minimization for Efficiently Improving
    Generalization, ICLR 2021, Algorithm 1.
  """
  graphdef, wrt_state, *others = nnx.split(model, wrt, ...)
  expected = jax.tree.structure(nnx.to_pure_dict(wrt_state))
  # Plain arrays: a snapshot that the clean pass's in-place updates cannot reach.
  rest = nnx.as_pure(others[0])
  # The graph nodes among the arguments (an nnx.Rngs passed as model(x, rngs=rngs)),
  # snapshot likewise: the perturbed pass draws from copies rebuilt as they were
  # before the clean pass, so it replays its keys, and never mutates the caller's
  # objects from inside tx.update's trace.
  nodes = {i: nnx.split(a) for i, a in enumerate(args) if nnx.graph.is_graph_node(a)}
  nodes = {i: (g, nnx.as_pure(state)) for i, (g, state) in nodes.items()}

  def replayed(args):
    return [nnx.merge(*nodes[i]) if i in nodes else a for i, a in enumerate(args)]

  def loss_fn(params):
    if jax.tree.structure(nnx.to_pure_dict(params)) != expected:
      raise ValueError(
        "the params tx.update was given are not the variables nnx_value_and_grad "
        f"differentiated (wrt={wrt!r}): pass nnx_value_and_grad the optimizer's wrt, "
        "as in nnx.Optimizer(model, tx, wrt=X) and nnx_value_and_grad(loss, model, "
        "*args, wrt=X)."
      )
    out = loss(nnx.merge(graphdef, params, rest), *replayed(args))
    return out[0] if has_aux else out

  grad_fn = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, wrt), has_aux=has_aux)
  value, grads = grad_fn(model, *args)
  return value, grads, loss_fn
