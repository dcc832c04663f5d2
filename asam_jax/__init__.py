"""asam_jax: SAM and ASAM as optax gradient transformations.

Example:
  >>> import optax, asam_jax
  >>> tx = optax.chain(asam_jax.asam(rho=0.5, eta=0.01), optax.sgd(0.1, momentum=0.9))
"""

from asam_jax._masks import kernel_mask
from asam_jax._perturbation import perturbation
from asam_jax._sam import SAMState, asam, sam
from asam_jax._sharpness import average_sharpness, random_perturbation, sharpness

__version__ = "0.1.0"

__all__ = [
  "SAMState",
  "asam",
  "average_sharpness",
  "kernel_mask",
  "perturbation",
  "random_perturbation",
  "sam",
  "sharpness",
]
