"""Precomputed text embeddings: what frozen text encoders (T5, CLIP, umT5) give, computed once and read by caption.

Legend: N captions, T tokens, C_txt token-state width, C_vec pooled width.

Real systems keep their text encoders frozen, so their states are computed once per caption and stored beside the
data set rather than recomputed every step. A store is one safetensors file: ``states`` [N, T, C_txt] (zero at
padding), ``mask`` [N, T], optionally ``pooled`` [N, C_vec], and the N caption strings (JSON, in order) in the
file's metadata. ``TextEmbeddings.lookup(captions)`` returns the rows of the given captions (exact strings; the
empty caption of a padded keyframe slot gives zeros); a caption the store does not hold is an error naming it. The
training loaders (``data.text_embeddings``) and the story pipeline (``keyframes.text_embeddings``,
``video.text_embeddings``) read text this way when a model has no text encoder of its own.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence

import numpy as np

from cinema_jax import safetensors_files

FORMAT = "cinema_jax.text_embeddings.v1"


class EmbeddingsError(ValueError):
  """A store that cannot be read, or a caption it does not hold."""


def write_text_embeddings(
  path: str | os.PathLike,
  captions: Sequence[str],
  states: np.ndarray,
  mask: np.ndarray,
  pooled: np.ndarray | None = None,
) -> pathlib.Path:
  """Writes a store (under a temporary name, then renamed); rows follow ``captions``, which must be distinct."""
  captions = [str(c) for c in captions]
  n = len(captions)
  if len(set(captions)) != n:
    raise EmbeddingsError("captions of a text-embedding store must be distinct")
  states, mask = np.asarray(states, np.float32), np.asarray(mask, bool)
  if states.ndim != 3 or states.shape[0] != n or mask.shape != states.shape[:2]:
    raise EmbeddingsError(f"need states [N={n}, T, C] and mask [N, T]; got {states.shape} and {mask.shape}")
  tensors = {"states": states * mask[..., None], "mask": mask.astype(np.uint8)}
  if pooled is not None:
    pooled = np.asarray(pooled, np.float32)
    if pooled.ndim != 2 or pooled.shape[0] != n:
      raise EmbeddingsError(f"need pooled [N={n}, C]; got {pooled.shape}")
    tensors["pooled"] = pooled
  return safetensors_files.write(path, tensors, {"format": FORMAT, "captions": json.dumps(captions)})


class TextEmbeddings:
  """A store read into memory; ``lookup`` maps captions to their rows."""

  def __init__(self, captions: Sequence[str], states: np.ndarray, mask: np.ndarray, pooled: np.ndarray | None):
    self.states, self.mask, self.pooled = states, mask, pooled
    self.index = {c: i for i, c in enumerate(captions)}
    self.source = "memory"

  @classmethod
  def load(cls, path: str | os.PathLike) -> TextEmbeddings:
    path = pathlib.Path(path)
    meta, tensors = safetensors_files.read(path, EmbeddingsError, "text-embedding store")
    if meta.get("format") != FORMAT or "states" not in tensors or "mask" not in tensors:
      raise EmbeddingsError(f"{path} is not a {FORMAT} store (format {meta.get('format')!r})")
    try:
      captions = json.loads(meta["captions"])
    except (KeyError, json.JSONDecodeError) as e:
      raise EmbeddingsError(f"text-embedding store {path} has no readable caption list in its metadata") from e
    states, mask, pooled = tensors["states"], tensors["mask"].astype(bool), tensors.get("pooled")
    n = len(captions)
    if (
      states.ndim != 3
      or states.shape[0] != n
      or mask.shape != states.shape[:2]
      or (pooled is not None and (pooled.ndim != 2 or pooled.shape[0] != n))
    ):
      raise EmbeddingsError(
        f"text-embedding store {path} is inconsistent: {n} captions, states {states.shape}, mask {mask.shape}, "
        f"pooled {None if pooled is None else pooled.shape}"
      )
    store = cls(captions, states, mask, pooled)
    store.source = str(path)
    return store

  @property
  def tokens(self) -> int:
    return self.states.shape[1]

  def lookup(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(states [n, T, C_txt], mask [n, T], pooled [n, C_vec] or None) of ``captions``; "" gives zeros."""
    missing = [c for c in captions if c and c not in self.index]
    if missing:
      more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
      raise EmbeddingsError(f"text-embedding store {self.source} has no caption {missing[0]!r}{more}")
    rows = np.array([self.index.get(c, -1) for c in captions], np.int64)
    keep = rows >= 0
    if not len(self.index):  # an empty store: only padded slots can be asked for
      t, width = self.states.shape[1:]
      pooled = None if self.pooled is None else np.zeros((len(rows), self.pooled.shape[1]), np.float32)
      return np.zeros((len(rows), t, width), np.float32), np.zeros((len(rows), t), bool), pooled
    states = np.where(keep[:, None, None], self.states[np.maximum(rows, 0)], 0.0).astype(np.float32)
    mask = self.mask[np.maximum(rows, 0)] & keep[:, None]
    pooled = None
    if self.pooled is not None:
      pooled = np.where(keep[:, None], self.pooled[np.maximum(rows, 0)], 0.0).astype(np.float32)
    return states, mask, pooled
