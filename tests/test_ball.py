"""normals: the random directions' draw, one per chunk of small leaves."""

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from asam_jax._ball import normals
from asam_jax._norms import CHUNK


def test_normals_are_independent_standard_normals_in_each_shape():
  # Small leaves sharing a chunk, an empty one, and one larger than a chunk, drawn alone.
  xs = [jnp.zeros((3, 4)), jnp.zeros(0), jnp.zeros((5,)), jnp.zeros(CHUNK + 1), jnp.zeros((7, 2))]
  got = normals(jax.random.key(0), xs, jnp.float32)
  assert [(g.shape, g.dtype) for g in got] == [(x.shape, jnp.float32) for x in xs]
  again = normals(jax.random.key(0), xs, jnp.float32)
  assert all(np.array_equal(a, b) for a, b in zip(got, again))
  other = normals(jax.random.key(1), xs, jnp.float32)
  assert not np.array_equal(got[3], other[3])
  # No two leaves repeat each other's numbers (a key reused per leaf would).
  firsts = [float(g.ravel()[0]) for g in got if g.size]
  assert len(set(firsts)) == len(firsts)
  # Together, standard normal: Kolmogorov-Smirnov over every number drawn.
  flat = np.concatenate([np.asarray(g).ravel() for g in got])
  assert stats.kstest(flat, "norm").pvalue > 1e-3
