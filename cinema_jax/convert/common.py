"""Pieces every weight converter shares: the error type, host numpy conversion, safetensors reading, coverage.

safetensors files are read here rather than through the ``safetensors`` package because its numpy loader cannot
return bfloat16 (numpy has no such dtype); reading the documented layout (8-byte little-endian header size, a JSON
header ``{name: {dtype, shape, data_offsets}}``, then raw bytes) into ``ml_dtypes.bfloat16`` views of a memory map
keeps bf16 checkpoints bf16 and copies nothing until a tensor is used.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import ml_dtypes
import numpy as np


class ConversionError(ValueError):
  """A checkpoint that does not match the model: a missing, unused or misshapen tensor (named in the message)."""


def to_numpy(x: Any) -> np.ndarray:
  """A torch tensor (any dtype, bf16 included), jax array or numpy array as a host numpy array."""
  if hasattr(x, "detach"):  # torch
    x = x.detach().cpu()
    if str(x.dtype) == "torch.bfloat16":
      return x.view(_torch_int16()).numpy().view(ml_dtypes.bfloat16)
    return x.numpy()
  return np.asarray(x)


def _torch_int16():
  import torch  # only reached with torch tensors in hand

  return torch.int16


_SAFETENSORS_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
}


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Every tensor of a ``.safetensors`` file as a read-only numpy view of a memory map (nothing is copied).

  The format is an 8-byte little-endian header size, a JSON header ``{name: {dtype, shape, data_offsets}}`` and the
  raw bytes; reading it directly keeps bf16 (which numpy does not know) as ``ml_dtypes.bfloat16``.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"safetensors file {path!r} does not exist")
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise ConversionError(f"{path}: too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", raw)
    if header_len > size - 8:
      raise ConversionError(f"{path}: header length {header_len} exceeds the file size {size}; not a safetensors file")
    try:
      header = json.loads(f.read(header_len))
    except ValueError as e:
      raise ConversionError(f"{path}: unreadable safetensors header ({e})") from e
  header.pop("__metadata__", None)
  start = 8 + header_len
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=start) if size > start else np.zeros(0, np.uint8)
  out = {}
  for name, info in header.items():
    if info["dtype"] not in _SAFETENSORS_DTYPES:
      raise ConversionError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    lo, hi = info["data_offsets"]
    dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
    expected = dtype.itemsize * int(np.prod(info["shape"], dtype=np.int64))
    if not 0 <= lo <= hi <= data.size or hi - lo != expected:
      raise ConversionError(
        f"{path}: tensor {name!r} has byte range [{lo}, {hi}) for shape {info['shape']} {info['dtype']} "
        f"({expected} bytes) in a data section of {data.size} bytes; the file is truncated or corrupt"
      )
    out[name] = data[lo:hi].view(dtype).reshape(info["shape"])
  return out


def check_coverage(available: set[str], used: set[str], *, what: str) -> None:
  """Every ``available`` key must be used and every used key available; the error names the first few of each."""
  missing, unused = sorted(used - available), sorted(available - used)
  parts = []
  if missing:
    parts.append(f"missing {what} tensor(s): {', '.join(repr(k) for k in missing[:8])}")
  if unused:
    parts.append(f"unused {what} tensor(s) (no parameter takes them): {', '.join(repr(k) for k in unused[:8])}")
  if parts:
    more = len(missing) + len(unused) - min(len(missing), 8) - min(len(unused), 8)
    raise ConversionError("; ".join(parts) + (f" (and {more} more)" if more > 0 else ""))
