"""Test configuration: must run before jax is imported anywhere."""

import os

# Four host devices, so that pmap and shard_map tests run on a CPU-only machine.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()

from hypothesis import settings

# jax compiles on first use of each shape, so wall-clock deadlines are meaningless.
settings.register_profile("asam_jax", deadline=None, print_blob=True)
settings.load_profile("asam_jax")
