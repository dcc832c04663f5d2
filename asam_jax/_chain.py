"""A check, run once, that SAM sits where its gradient reaches the optimizer.

A SAM-type transformation returns the gradient at ``w + eps``, which it takes
itself, so whatever comes before it in a chain only changes the direction of
the ascent and is then dropped, and an optax wrapper that calls it on
accumulated gradients (``optax.MultiSteps``) perturbs with the wrong gradient.
Neither can be seen from inside ``update``; both can be seen in the structure
of the chain's state, which :func:`check_chain` reads without computing
anything.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from asam_jax._alternating import AlternatingState
from asam_jax._bayesian_sam import BayesianSAMState
from asam_jax._esam import ESAMState
from asam_jax._friendly_sam import FriendlySAMState
from asam_jax._looksam import LookSAMState
from asam_jax._momentum_sam import MomentumSAMState
from asam_jax._random_sam import RandomSAMState
from asam_jax._sam import SAMState

# Closure-based transformations: first in their chain.
FIRST = (SAMState, LookSAMState, RandomSAMState, FriendlySAMState, ESAMState)
# Optimizers whose update moves the weights back from w~ to w: last in their chain.
LAST = (MomentumSAMState, BayesianSAMState, AlternatingState)


def _walk(state: Any, path: tuple[Any, ...], found: list[tuple[tuple[Any, ...], Any]], kinds):
  """Collects ``(path, state)`` for every state of ``kinds``; ``path`` holds ``(container, key)``."""
  if isinstance(state, kinds):
    found.append((path, state))
    return
  if isinstance(state, tuple):
    fields = getattr(state, "_fields", None)
    keys = fields if fields is not None else range(len(state))
    for key, child in zip(keys, state):
      _walk(child, (*path, (state, key)), found, kinds)
  elif isinstance(state, dict):
    for key, child in state.items():
      _walk(child, (*path, (state, key)), found, kinds)


def _name(state: Any) -> str:
  """The constructors whose state ``state`` is, for the messages."""
  names = {
    SAMState: "sam (or asam, gsam, fisher_sam)",
    LookSAMState: "looksam",
    RandomSAMState: "random_sam",
    FriendlySAMState: "friendly_sam",
    ESAMState: "esam",
    BayesianSAMState: "bayesian_sam",
    MomentumSAMState: "momentum_sam (or momentum_sam_adamw)",
    AlternatingState: "alternating",
  }
  return next((n for kind, n in names.items() if isinstance(state, kind)), type(state).__name__)


def check_chain(tx: optax.GradientTransformation, params: Any) -> None:
  """Refuses a chain in which a SAM-type transformation's gradient would not reach the optimizer.

  Reads the structure of ``tx.init(params)`` (abstractly: nothing is
  computed) and raises where:

  * a SAM-type transformation (``sam``, ``asam``, ``gsam``, ``looksam``,
    ``random_sam``, ``fisher_sam``, ``friendly_sam``, ``esam``) is not the first
    of its chain: what comes before it (clipping, weight decay, an optimizer)
    only turns the direction of the ascent, and its effect on the update is
    lost, since SAM returns the gradient it takes at ``w + eps`` itself;
  * one sits inside ``optax.MultiSteps``, which hands it the accumulated
    gradient of the micro-batches so far with the last micro-batch's loss;
  * an optimizer that holds the perturbed weights (``momentum_sam``,
    ``momentum_sam_adamw``, ``bayesian_sam``, ``alternating``) is followed by
    another transformation, which would transform its move back to ``w``.

  Run it once, on the transformation and params a training loop uses. Wrapped
  in ``optax.inject_hyperparams`` or ``optax.apply_if_finite``, a chain is read
  through the wrapper.

  Args:
    tx: the whole transformation the training loop applies.
    params: the parameters (or ``jax.ShapeDtypeStruct`` s of them).

  Raises:
    ValueError: one of the orders above, with the form that works.

  Example:
    >>> import jax.numpy as jnp, optax, asam_jax
    >>> params = {"w": jnp.ones(3)}
    >>> asam_jax.check_chain(optax.chain(asam_jax.sam(0.05), optax.sgd(0.1)), params)
    >>> asam_jax.check_chain(optax.chain(optax.clip_by_global_norm(1.0), asam_jax.sam(0.05),
    ...                                  optax.sgd(0.1)), params)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: sam (or asam, gsam, fisher_sam) is not first in its chain (it is at position 2)...

  References:
    Foret et al., Sharpness-Aware Minimization for Efficiently Improving
    Generalization, ICLR 2021, Algorithm 1 (the base optimizer takes the SAM
    gradient).
  """
  state = jax.eval_shape(tx.init, params)
  found: list[tuple[tuple[Any, ...], Any]] = []
  _walk(state, (), found, FIRST + LAST)
  for path, leaf in found:
    for container, key in path:
      if isinstance(container, optax.MultiStepsState) and key == "inner_opt_state":
        raise ValueError(
          f"{_name(leaf)} sits inside optax.MultiSteps, which calls it with the average of "
          "the micro-batches' gradients so far and the last micro-batch's loss: it would "
          "perturb with one gradient and differentiate another batch. Accumulate SAM "
          "gradients instead, one per micro-batch: optax.chain(asam_jax.sam(...), "
          "optax.MultiSteps(optimizer, k).gradient_transformation())."
        )
    chains = [
      (container, key)
      for container, key in path
      if (type(container) is tuple) or isinstance(container, dict)
    ]
    if isinstance(leaf, FIRST):
      for container, key in chains:
        index = key if isinstance(key, int) else list(container).index(key)
        if index > 0:
          raise ValueError(
            f"{_name(leaf)} is not first in its chain (it is at position {index + 1}): the "
            "transformations before it (clipping, weight decay, an optimizer) would only turn "
            "the direction of its ascent, and their effect on the update would be lost, "
            "since it returns the gradient it takes at w + eps itself. Put it first, and "
            "the rest after it: optax.chain(asam_jax.sam(...), optax.clip_by_global_norm(c), "
            "optax.add_decayed_weights(wd), optimizer)."
          )
    else:
      for container, key in chains:
        index = key if isinstance(key, int) else list(container).index(key)
        if index < len(container) - 1:
          raise ValueError(
            f"{_name(leaf)} is followed by other transformations in a chain: its update "
            "moves the weights back from w~ to w as well as stepping, and a transformation "
            "after it would transform that move too. Put it last: optax.chain("
            "optax.add_decayed_weights(wd), asam_jax.momentum_sam(...))."
          )
