"""Test configuration: must run before jax is imported anywhere."""

import os

# Four host devices, so that pmap and shard_map tests run on a CPU-only machine.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
# XLA's CPU client runs device launches on max(NPROC or the core count, devices)
# threads. With exactly as many threads as devices (any machine with <= 4 cores),
# a launch waiting for its device's in-flight slot can take the last thread
# while the other devices wait in a collective: an intermittent deadlock of
# pmap/shard_map (seen on 2 cores, about 1 run in 2 of 3000 pmap steps).
# Spare threads avoid it.
os.environ.setdefault("NPROC", "8")

from hypothesis import settings

# jax compiles on first use of each shape, so wall-clock deadlines are meaningless.
# By default (and in CI) a fixed, derandomized set of examples, so a run is repeatable;
# HYPOTHESIS_PROFILE=dev draws new ones each run, and =stress searches far wider.
settings.register_profile("dev", max_examples=60, deadline=None, print_blob=True)
settings.register_profile("ci", settings.get_profile("dev"), derandomize=True)
settings.register_profile("stress", settings.get_profile("dev"), max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
