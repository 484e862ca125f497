"""Small file helpers shared across the package."""

from __future__ import annotations

import os
import pathlib


def write_atomic(path: str | os.PathLike, data: bytes) -> pathlib.Path:
  """Writes ``data`` under a temporary name beside ``path`` and renames it: a reader never sees half a file."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.partial")
  tmp.write_bytes(data)
  os.replace(tmp, path)
  return path
