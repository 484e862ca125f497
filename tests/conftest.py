"""Test set-up: JAX on the CPU with 8 fake devices, so sharding tests build real meshes on any machine.

The environment is set before anything imports jax; `make test` sets the same variables.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng() -> np.random.Generator:
  """A seeded numpy generator; tests that need several draw them from this one."""
  return np.random.default_rng(0)
