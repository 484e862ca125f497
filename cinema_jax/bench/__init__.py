"""Benchmarks behind ``cinema-jax bench NAME``: one module per benchmark, the module path is the registry.

``cinema-jax bench keyframes`` runs ``cinema_jax.bench.keyframes.main(argv)`` (dashes become underscores). Each
benchmark prints a table whose figures are also given as ratios to a reference measured in the same process (never
against numbers from another run or machine), using ``cinema_jax.bench.timing``.
"""

from __future__ import annotations

import importlib
import pkgutil

_HELPERS = {"timing"}


def available() -> list[str]:
  """Names of the benchmarks in this package."""
  return sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules(__path__) if m.name not in _HELPERS)


def load(name: str):
  """The module of benchmark ``name``; an unknown name is a KeyError listing the valid ones."""
  if name not in available():
    raise KeyError(f"unknown benchmark {name!r}; available: {', '.join(available()) or 'none'}")
  return importlib.import_module(f"{__name__}.{name.replace('-', '_')}")
