"""An independent float64 NumPy reference, written from the papers' formulas.

Nothing here calls asam_jax. The perturbation is the maximizer of eps^T g over
||T^-1 eps||_p <= rho with T = diag(|w| + eta) (Kwon et al. 2021, eq. 4; Foret
et al. 2021, eq. 2), computed on one flat float64 vector.
"""

import numpy as np


def flat(leaves):
  return (
    np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves]) if leaves else np.zeros(0)
  )


def diagonal_t(w_leaves, eta, adaptive):
  """The diagonal of T_w as one flat vector: |w| + eta on adaptive leaves, 1 elsewhere.

  adaptive: one bool per leaf, or None for SAM (T = 1 everywhere).
  """
  adaptive = [False] * len(w_leaves) if adaptive is None else adaptive
  return flat(
    [
      np.abs(np.asarray(w, np.float64)) + eta if a else np.ones(np.shape(w))
      for w, a in zip(w_leaves, adaptive)
    ]
  )


def fisher_t(g_leaves, eta):
  """Fisher SAM's T = f^-1/2, f = 1 + eta g^2 (Kim et al. 2022, eq. 5), as one flat vector."""
  return 1 / np.sqrt(1 + eta * flat(g_leaves) ** 2)


def perturbation(g_leaves, w_leaves, *, rho, eta=0.0, adaptive=None, perturb=None, p=2.0, t=None):
  """Returns eps as a list of float64 arrays shaped like w_leaves.

  adaptive / perturb: one bool per leaf (default: none adaptive, all perturbed).
  t: the diagonal of T over the perturbed leaves, flat, in place of |w| + eta.
  """
  n = len(w_leaves)
  perturb = [True] * n if perturb is None else perturb
  adaptive = [False] * n if adaptive is None else adaptive
  shapes = [np.shape(w) for w in w_leaves]
  on = [i for i in range(n) if perturb[i]]
  g = flat([g_leaves[i] for i in on])
  if t is None:
    t = diagonal_t([w_leaves[i] for i in on], eta, [adaptive[i] for i in on])
  a = t * g
  if p == np.inf:
    e = rho * t * np.sign(g)
  elif p == 1:
    e = np.zeros_like(g)
    if np.any(a != 0):
      top = np.abs(a) == np.abs(a).max()
      e[top] = rho * t[top] * np.sign(g[top]) / top.sum()
  else:
    q = p / (p - 1)
    norm = np.sum(np.abs(a) ** q) ** (1 / q)
    e = (
      rho * t * np.sign(g) * np.abs(a) ** (q - 1) / norm ** (q - 1)
      if norm > 0
      else np.zeros_like(g)
    )
  out = [np.zeros(s) for s in shapes]
  offset = 0
  for i in on:
    size = int(np.prod(shapes[i]))
    out[i] = e[offset : offset + size].reshape(shapes[i])
    offset += size
  return out


def ball_norm(eps_leaves, w_leaves, *, eta=0.0, adaptive=None, p=2.0):
  """||T^-1 eps||_p over all leaves, with 0/0 read as 0."""
  e = flat(eps_leaves)
  t = diagonal_t(w_leaves, eta, adaptive)
  u = np.divide(e, t, out=np.zeros_like(e), where=t != 0)
  return np.linalg.norm(u, ord=p) if u.size else 0.0


def dual_norm(g_leaves, w_leaves, *, eta=0.0, adaptive=None, p=2.0):
  """||T g||_q, q the dual exponent of p: the maximum of eps^T g on the unit ball."""
  g = flat(g_leaves)
  t = diagonal_t(w_leaves, eta, adaptive)
  q = np.inf if p == 1 else (1.0 if p == np.inf else p / (p - 1))
  return np.linalg.norm(t * g, ord=q) if g.size else 0.0
