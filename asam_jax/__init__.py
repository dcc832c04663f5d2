"""asam_jax: SAM and ASAM as optax gradient transformations.

Example:
  >>> import optax, asam_jax
  >>> tx = optax.chain(asam_jax.asam(rho=0.5, eta=0.01), optax.sgd(0.1, momentum=0.9))
"""

from asam_jax._alternating import AlternatingState, alternating
from asam_jax._bayesian_sam import BayesianSAMState, bayesian_sam, bayesian_sam_sample
from asam_jax._chain import check_chain
from asam_jax._esam import ESAMState, esam
from asam_jax._fisher_sam import fisher_sam
from asam_jax._friendly_sam import FriendlySAMState, friendly_sam
from asam_jax._gsam import gsam, gsam_rho_schedule
from asam_jax._looksam import LookSAMState, looksam
from asam_jax._masks import kernel_mask, weight_mask
from asam_jax._momentum_sam import (
  MomentumSAMState,
  momentum_sam,
  momentum_sam_adamw,
  momentum_sam_weights,
)
from asam_jax._perturbation import perturbation, random_perturbation
from asam_jax._random_sam import RandomSAMState, random_sam
from asam_jax._sam import SAMState, asam, sam
from asam_jax._sharpness import average_sharpness, sharpness
from asam_jax._varying import to_varying
from asam_jax.parallel import grouped_update, split_batch

__version__ = "0.1.0"

__all__ = [
  "AlternatingState",
  "BayesianSAMState",
  "ESAMState",
  "FriendlySAMState",
  "LookSAMState",
  "MomentumSAMState",
  "RandomSAMState",
  "SAMState",
  "alternating",
  "asam",
  "average_sharpness",
  "bayesian_sam",
  "bayesian_sam_sample",
  "check_chain",
  "esam",
  "fisher_sam",
  "friendly_sam",
  "grouped_update",
  "gsam",
  "gsam_rho_schedule",
  "kernel_mask",
  "looksam",
  "momentum_sam",
  "momentum_sam_adamw",
  "momentum_sam_weights",
  "perturbation",
  "random_perturbation",
  "random_sam",
  "sam",
  "sharpness",
  "split_batch",
  "to_varying",
  "weight_mask",
]
