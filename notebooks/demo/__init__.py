"""The research harness of the MNIST-1D demo, and the records it wrote.

``asam_jax.demo``, the demo that ships with the package, trains SGD, SAM and
ASAM at their tuned rho. This harness, which runs from a checkout, reuses its
data, models and training loop for the studies behind it, and writes each
study as a record next to this file::

  python -m notebooks.demo --out DIR                  # the comparison, recorded
  python -m notebooks.demo --methods sgd sam asam gsam looksam msam random_sam
  python -m notebooks.demo --sweep                    # tune rho on a validation split
  python -m notebooks.demo --conventions              # ASAM's three choices of leaves
  python -m notebooks.demo --report notebooks/demo    # re-render records, no training

One job per module: ``experiments`` (the variants, ASAM's conventions, the
grids of runs), ``records`` (the JSON records, the markdown and plots rendered
from them, and where they ran) and ``cli`` (the command line).
"""
