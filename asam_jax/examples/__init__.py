"""Runnable examples: ``python -m asam_jax.examples.<name>``."""
