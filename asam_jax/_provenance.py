"""Where, when and how fast a run ran: the machine, its load, the library versions.

The demo prints it under its table. A checkout's research harness
(``python -m notebooks.demo``), ``benchmarks/benchmark.py`` and
``notebooks/run_notebooks.py`` store it with what they measure. Nothing here
runs git: the harness adds the checkout's commit to its records itself.
"""

from __future__ import annotations

import datetime
import os
import platform
import time
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any


def cpu_model() -> str:
  """The CPU's model name, as ``/proc/cpuinfo`` gives it (else what ``platform`` knows)."""
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
  """The 1, 5 and 15 minute load averages, to two decimals; None where the OS has none."""
  if not hasattr(os, "getloadavg"):
    return None
  return [round(x, 2) for x in os.getloadavg()]


def now() -> str:
  """The time in UTC, to the second, in ISO 8601."""
  return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def machine() -> dict[str, Any]:
  """The CPU, its core count, and jax's default backend and first device."""
  import jax

  return {
    "cpu": cpu_model(),
    "cores": os.cpu_count(),
    "jax_backend": jax.default_backend(),
    "device": jax.devices()[0].device_kind,
  }


def versions() -> dict[str, str | None]:
  """Python's version and the installed versions of the libraries a run depends on."""
  import asam_jax

  def installed(name: str) -> str | None:
    try:
      return version(name)
    except PackageNotFoundError:
      return None

  return {
    "python": platform.python_version(),
    "jax": installed("jax"),
    "jaxlib": installed("jaxlib"),
    "optax": installed("optax"),
    "flax": installed("flax"),
    "numpy": installed("numpy"),
    "asam_jax": asam_jax.__version__,
  }


class Run:
  """Measures one run from its creation: the load before and after, wall and CPU seconds."""

  def __init__(self) -> None:
    self.load_before = load_average()
    self._wall, self._cpu = time.perf_counter(), time.process_time()

  def meta(self, command: str, **extra: Any) -> dict[str, Any]:
    """The run's provenance, now that it has finished.

    Args:
      command: the command line that started the run.
      **extra: more fields (e.g. a checkout's ``git_commit``), placed after
        the versions.

    Returns:
      ``command``, ``date`` (when it finished), ``machine``, ``versions``, the
      extra fields, ``load_before``, ``load_after``, ``wall_s`` and ``cpu_s``.
    """
    return {
      "command": command,
      "date": now(),
      "machine": machine(),
      "versions": versions(),
      **extra,
      "load_before": self.load_before,
      "load_after": load_average(),
      "wall_s": round(time.perf_counter() - self._wall, 1),
      "cpu_s": round(time.process_time() - self._cpu, 1),
    }


def _loads(values: Sequence[float] | None) -> str:
  return "n/a" if values is None else "/".join(f"{x:g}" for x in values)


def describe(meta: dict[str, Any]) -> str:
  """One paragraph from :meth:`Run.meta`: the command, when, where, under what load, how long.

  Example:
    >>> meta = {"command": "python -m asam_jax.demo", "date": "2026-01-01T00:00:00+00:00",
    ...   "machine": {"cpu": "CPU", "cores": 2, "jax_backend": "cpu", "device": "cpu"},
    ...   "versions": {"jax": "0.10.2", "optax": "0.2.8", "flax": "0.12.8"},
    ...   "load_before": [1.0, 0.5, 0.25], "load_after": [2.0, 1.0, 0.5],
    ...   "wall_s": 124.0, "cpu_s": 165.5}
    >>> print(describe(meta))
    Run: `python -m asam_jax.demo`, finished 2026-01-01T00:00:00+00:00, on CPU (2 cores, cpu); load
    average (1/5/15 min) 1/0.5/0.25 before, 2/1/0.5 after; 2 min 4 s wall, 166 s CPU. jax 0.10.2,
    optax 0.2.8, flax 0.12.8.
  """
  machine, versions = meta["machine"], meta["versions"]
  minutes, seconds = divmod(round(meta["wall_s"]), 60)
  wall = f"{minutes} min {seconds} s" if minutes else f"{seconds} s"
  commit = f", asam_jax at {meta['git_commit']}" if meta.get("git_commit") else ""
  return (
    f"Run: `{meta['command']}`, finished {meta['date']}, on {machine['cpu']} ({machine['cores']} cores, "
    f"{machine['jax_backend']}); load average (1/5/15 min) {_loads(meta['load_before'])} before, "
    f"{_loads(meta['load_after'])} after; {wall} wall, {meta['cpu_s']:.0f} s CPU. "
    f"jax {versions['jax']}, optax {versions['optax']}, flax {versions['flax']}{commit}."
  )
