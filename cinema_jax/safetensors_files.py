"""safetensors files with metadata: an atomic write and a read whose failures name the file and what it should be.

Shared by parameter exports (``train/export.py``) and text-embedding stores (``data/embeddings.py``).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping

import numpy as np


def write(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> pathlib.Path:
  """Writes under a temporary name and renames, so an interrupted write never leaves a half file at ``path``."""
  from safetensors.numpy import save_file

  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.partial")
  save_file(dict(tensors), str(tmp), metadata=dict(metadata))
  os.replace(tmp, path)
  return path


def read(path: str | os.PathLike, error: type[Exception], what: str) -> tuple[dict[str, str], dict[str, np.ndarray]]:
  """(metadata, tensors) of ``path``; a missing or unreadable file raises ``error`` naming ``what`` it should be."""
  from safetensors import SafetensorError, safe_open

  path = pathlib.Path(path)
  if not path.is_file():
    raise error(f"{what} {path} does not exist")
  try:
    with safe_open(str(path), framework="numpy") as f:
      metadata = dict(f.metadata() or {})
      tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
  except (SafetensorError, OSError, ValueError) as e:
    raise error(f"{what} {path} is not a readable safetensors file: {e}") from e
  return metadata, tensors
