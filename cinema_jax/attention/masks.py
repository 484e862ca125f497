"""Attention masks that know their own structure.

A mask says which key/value positions each query position may see. The models' masks (hybrid local/global keyframe
masks, frame block-causal masks, GoldenMem memory layouts, padding) are all built from per-token ids, so they are kept
as ids rather than as L x L arrays:

* ``FullMask()``: everything visible.
* ``SegmentMask(q_segment_ids, kv_segment_ids)``: visible iff the ids are equal.
* ``BlockCausalMask(q_block_ids, kv_block_ids)``: visible iff ``kv_block_id <= q_block_id`` (frame blocks of a
  diffusion-forcing video, keyframes of an autoregressive story).
* ``DenseMask(mask)``: an explicit boolean ``[Lq, Lkv]`` (or ``[B, Lq, Lkv]``) array, for anything else.
* ``m1 & m2`` and ``m1 | m2`` combine masks.

Padding: an id < 0 marks a padding token. It sees nothing and nothing sees it, in every structured mask, so a padded
query row is fully masked (``dot_product_attention`` returns zeros there).

Ids may be ``[L]`` (shared by the batch) or ``[B, L]`` (one layout per sample, e.g. a variable number of keyframes).
``to_dense`` works on concrete and traced (jitted) ids. ``block_summary`` classifies every
``(block_q, block_kv)`` tile as empty (0), partial (1) or full (2) for the block-sparse kernel; it needs concrete ids
and never builds the L x L array: leaves are summarised from per-block id statistics, and combined masks refine only
the tiles their children leave undecided, evaluating those tiles element by element (cost O(tiles on boundaries x
block_q x block_kv), not O(Lq x Lkv)). Tiles at the ragged end of a length that is not a multiple of the block size
are classified over the positions that exist.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

EMPTY, PARTIAL, FULL = 0, 1, 2

Array = Any  # np.ndarray or jax.Array


def _num_blocks(length: int, block: int) -> int:
  return -(-length // block)


def _check_block(name: str, block: int) -> None:
  if not isinstance(block, (int, np.integer)) or block <= 0:
    raise ValueError(f"{name} must be a positive integer, got {block!r}")


def _concrete(ids: Array, what: str) -> np.ndarray:
  try:
    return np.asarray(ids)
  except jax.errors.TracerArrayConversionError as e:
    raise TypeError(
      f"block_summary needs concrete {what} (numpy or a computed jax array), got a traced value inside jit; "
      "build the summary outside the jitted function"
    ) from e


class Mask(abc.ABC):
  """Base class: a boolean visibility relation between query and key/value positions."""

  # Lengths implied by the ids (None when the mask holds none, e.g. FullMask).
  @property
  @abc.abstractmethod
  def q_len(self) -> int | None: ...

  @property
  @abc.abstractmethod
  def kv_len(self) -> int | None: ...

  @property
  @abc.abstractmethod
  def batch_size(self) -> int | None:
    """Leading batch size of per-sample ids, or None when the mask is shared by the whole batch."""

  @abc.abstractmethod
  def _dense(self, lq: int, lkv: int, xp) -> Array:
    """Boolean [lq, lkv] or [B, lq, lkv] with the array module ``xp`` (jnp, or np for host summaries)."""

  @abc.abstractmethod
  def _leaf_summary(self, bq: int, bkv: int, lq: int, lkv: int) -> np.ndarray:
    """Exact int8 [nq, nk] or [B, nq, nk] summary."""

  @abc.abstractmethod
  def _tiles(self, qi: np.ndarray, ki: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """Visibility of query positions qi [T, bq, 1] and kv positions ki [T, 1, bkv] of batch rows b [T] (or None)."""

  def __and__(self, other: Mask) -> Mask:
    return _Combined("and", (self, _as_mask(other)))

  def __or__(self, other: Mask) -> Mask:
    return _Combined("or", (self, _as_mask(other)))

  def resolve_lengths(self, q_len: int | None = None, kv_len: int | None = None) -> tuple[int, int]:
    """The (Lq, Lkv) the mask applies to: from its ids, else from the arguments; a mismatch is an error."""
    out = []
    for name, given, own in (("q_len", q_len, self.q_len), ("kv_len", kv_len, self.kv_len)):
      if given is not None and own is not None and given != own:
        raise ValueError(f"{type(self).__name__}: {name}={given} does not match its ids' length {own}")
      value = own if own is not None else given
      if value is None:
        raise ValueError(f"{type(self).__name__} holds no ids to tell its {name}; pass {name}=...")
      out.append(int(value))
    return out[0], out[1]

  def to_dense(self, lq: int | None = None, lkv: int | None = None) -> jax.Array:
    """Boolean ``[Lq, Lkv]`` (``[B, Lq, Lkv]`` for per-sample ids); True = visible."""
    lq, lkv = self.resolve_lengths(lq, lkv)
    return jnp.asarray(self._dense(lq, lkv, jnp))

  def block_summary(
    self, block_q: int, block_kv: int, *, q_len: int | None = None, kv_len: int | None = None
  ) -> np.ndarray:
    """int8 ``[nq, nk]`` (or ``[B, nq, nk]``) with 0 empty, 1 partial, 2 full per (block_q, block_kv) tile."""
    _check_block("block_q", block_q)
    _check_block("block_kv", block_kv)
    lq, lkv = self.resolve_lengths(q_len, kv_len)
    return self._leaf_summary(block_q, block_kv, lq, lkv).astype(np.int8)

  def density(self, *, q_len: int | None = None, kv_len: int | None = None, block: int = 128) -> float:
    """Fraction of visible (query, key) pairs, counted tile by tile without an L x L array."""
    lq, lkv = self.resolve_lengths(q_len, kv_len)
    summary = self.block_summary(block, block, q_len=lq, kv_len=lkv)
    sizes = _tile_sizes(lq, lkv, block, block)
    visible = np.where(summary == FULL, sizes, 0).astype(np.float64)
    partial = np.argwhere(summary == PARTIAL)
    if len(partial):
      visible[tuple(partial.T)] = self._evaluate_tiles(partial, block, block, lq, lkv).sum(axis=(1, 2))
    samples = summary.shape[0] if summary.ndim == 3 else 1
    return float(visible.sum() / (samples * lq * lkv))

  def _evaluate_tiles(self, tiles: np.ndarray, bq: int, bkv: int, lq: int, lkv: int) -> np.ndarray:
    """Element masks [T, bq, bkv] of the listed tiles (rows: (qb, kb) or (b, qb, kb)); out-of-range = False."""
    b = tiles[:, 0] if tiles.shape[1] == 3 else None
    qb, kb = tiles[:, -2], tiles[:, -1]
    qi = qb[:, None, None] * bq + np.arange(bq)[None, :, None]  # [t, bq, 1]
    ki = kb[:, None, None] * bkv + np.arange(bkv)[None, None, :]  # [t, 1, bkv]
    inside = (qi < lq) & (ki < lkv)
    vis = self._tiles(np.minimum(qi, lq - 1), np.minimum(ki, lkv - 1), b)
    return vis & inside


def _as_mask(m: Any) -> Mask:
  if not isinstance(m, Mask):
    raise TypeError(f"masks combine only with masks, got {type(m).__name__}")
  return m


def _tile_sizes(lq: int, lkv: int, bq: int, bkv: int) -> np.ndarray:
  rows = np.minimum(bq, lq - np.arange(_num_blocks(lq, bq)) * bq)
  cols = np.minimum(bkv, lkv - np.arange(_num_blocks(lkv, bkv)) * bkv)
  return rows[:, None] * cols[None, :]


def _check_ids(name: str, ids: Array) -> Array:
  if not hasattr(ids, "ndim"):
    ids = np.asarray(ids)
  if ids.ndim not in (1, 2):
    raise ValueError(f"{name} must be [L] or [B, L], got shape {tuple(ids.shape)}")
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise TypeError(f"{name} must hold integers, got dtype {ids.dtype}")
  return ids


def _batch_of(*ids: Array) -> int | None:
  sizes = {int(i.shape[0]) for i in ids if i.ndim == 2}
  if len(sizes) > 1:
    raise ValueError(f"per-sample ids disagree on the batch size: {sorted(sizes)}")
  return sizes.pop() if sizes else None


def _per_block(ids: np.ndarray, block: int, fill: int, reduce) -> np.ndarray:
  """Reduce ids [..., L] over blocks of ``block`` positions (the ragged tail padded with ``fill``) -> [..., n]."""
  n = _num_blocks(ids.shape[-1], block)
  pad = n * block - ids.shape[-1]
  padded = np.pad(ids, [(0, 0)] * (ids.ndim - 1) + [(0, pad)], constant_values=fill)
  return reduce(padded.reshape(*ids.shape[:-1], n, block), axis=-1)


@dataclasses.dataclass(frozen=True, eq=False)
class _IdMask(Mask):
  """Shared plumbing of masks defined by per-token integer ids (negative = padding)."""

  q_ids: Array
  kv_ids: Array

  def __post_init__(self):
    names = self._id_names()
    object.__setattr__(self, "q_ids", _check_ids(names[0], self.q_ids))
    object.__setattr__(self, "kv_ids", _check_ids(names[1], self.kv_ids))
    _batch_of(self.q_ids, self.kv_ids)

  @classmethod
  def _id_names(cls) -> tuple[str, str]:
    return ("q_ids", "kv_ids")

  @property
  def q_len(self) -> int:
    return int(self.q_ids.shape[-1])

  @property
  def kv_len(self) -> int:
    return int(self.kv_ids.shape[-1])

  @property
  def batch_size(self) -> int | None:
    return _batch_of(self.q_ids, self.kv_ids)

  @abc.abstractmethod
  def _relation(self, q: Array, kv: Array) -> Array:
    """Visibility of broadcast q and kv ids, both known to be >= 0."""

  def _dense(self, lq, lkv, xp):
    q, kv = xp.asarray(self.q_ids), xp.asarray(self.kv_ids)
    q, kv = q[..., :, None], kv[..., None, :]  # [(b), lq, 1], [(b), 1, lkv]
    return self._relation(q, kv) & (q >= 0) & (kv >= 0)

  def _host_ids(self) -> tuple[np.ndarray, np.ndarray]:
    """Concrete ids, both with a batch axis: [B or 1, L]."""
    q = _concrete(self.q_ids, "ids")
    kv = _concrete(self.kv_ids, "ids")
    b = self.batch_size or 1
    q = np.broadcast_to(q if q.ndim == 2 else q[None], (b, q.shape[-1]))
    kv = np.broadcast_to(kv if kv.ndim == 2 else kv[None], (b, kv.shape[-1]))
    return q, kv

  def _tiles(self, qi, ki, b):
    q, kv = self._host_ids()
    # A leaf shared by the batch has one id row, whatever batch row a combined mask asks about.
    rows = np.zeros(qi.shape[0], np.int64) if b is None or q.shape[0] == 1 else b
    qv = q[rows[:, None, None], qi]  # [t, bq, 1]
    kvv = kv[rows[:, None, None], ki]  # [t, 1, bkv]
    return self._relation(qv, kvv) & (qv >= 0) & (kvv >= 0)

  def _unbatch(self, summary: np.ndarray) -> np.ndarray:
    return summary if self.batch_size is not None else summary[0]


@dataclasses.dataclass(frozen=True, eq=False, init=False)
class SegmentMask(_IdMask):
  """Query i sees key j iff ``q_segment_ids[i] == kv_segment_ids[j]`` (both >= 0)."""

  def __init__(self, q_segment_ids: Array, kv_segment_ids: Array | None = None):
    super().__init__(q_segment_ids, q_segment_ids if kv_segment_ids is None else kv_segment_ids)

  @classmethod
  def _id_names(cls):
    return ("q_segment_ids", "kv_segment_ids")

  def _relation(self, q, kv):
    return q == kv

  def _leaf_summary(self, bq, bkv, lq, lkv):
    q, kv = self._host_ids()
    out = np.empty((q.shape[0], _num_blocks(lq, bq), _num_blocks(lkv, bkv)), np.int8)
    for row in range(q.shape[0]):
      # A tile is non-empty iff its query and key blocks share an id: count shared ids through the
      # (block x distinct-id) presence matrices.
      valid = np.concatenate([q[row][q[row] >= 0], kv[row][kv[row] >= 0]])
      uniq = np.unique(valid)
      qp = _presence(q[row], bq, uniq)  # [nq, U]
      kp = _presence(kv[row], bkv, uniq)  # [nk, U]
      nonempty = (qp.astype(np.int32) @ kp.T.astype(np.int32)) > 0
      # Full iff both blocks hold one and the same id and no padding. Ragged tails are padded with the last id,
      # which lies in the same block, so min/max see only real positions.
      q_lo, q_hi = (_per_block(q[row], bq, _edge(q[row]), f) for f in (np.min, np.max))
      k_lo, k_hi = (_per_block(kv[row], bkv, _edge(kv[row]), f) for f in (np.min, np.max))
      q_one = (q_lo == q_hi) & (q_lo >= 0)
      k_one = (k_lo == k_hi) & (k_lo >= 0)
      same = q_hi[:, None] == k_hi[None, :]
      full = q_one[:, None] & k_one[None, :] & same
      out[row] = np.where(full, FULL, np.where(nonempty, PARTIAL, EMPTY))
    return self._unbatch(out)


def _edge(ids: np.ndarray) -> int:
  """The last id: padding a ragged tail with it leaves the last block's min and max unchanged."""
  return int(ids[-1]) if ids.size else -1


def _presence(ids: np.ndarray, block: int, uniq: np.ndarray) -> np.ndarray:
  """bool [n_blocks, U]: which distinct (non-negative) ids occur in each block."""
  n = _num_blocks(ids.shape[-1], block)
  out = np.zeros((n, len(uniq)), bool)
  keep = ids >= 0
  if keep.any():
    out[np.nonzero(keep)[0] // block, np.searchsorted(uniq, ids[keep])] = True
  return out


@dataclasses.dataclass(frozen=True, eq=False, init=False)
class BlockCausalMask(_IdMask):
  """Query i sees key j iff ``kv_block_ids[j] <= q_block_ids[i]`` (both >= 0).

  With one block per token this is the causal mask; with one block per frame block it is diffusion forcing's frame
  block-causal mask; with one block per keyframe it is autoregressive keyframe generation.
  """

  def __init__(self, q_block_ids: Array, kv_block_ids: Array | None = None):
    super().__init__(q_block_ids, q_block_ids if kv_block_ids is None else kv_block_ids)

  @classmethod
  def _id_names(cls):
    return ("q_block_ids", "kv_block_ids")

  def _relation(self, q, kv):
    return kv <= q

  def _leaf_summary(self, bq, bkv, lq, lkv):
    q, kv = self._host_ids()
    big = np.iinfo(np.int64).max
    q64, kv64 = q.astype(np.int64), kv.astype(np.int64)
    # Non-empty iff the smallest valid kv id of the key block is <= the largest valid q id of the query block.
    q_max = _per_block(np.where(q64 >= 0, q64, -1), bq, -1, np.max)  # [b, nq]
    kv_min = _per_block(np.where(kv64 >= 0, kv64, big), bkv, big, np.min)  # [b, nk]
    nonempty = (q_max[:, :, None] >= 0) & (kv_min[:, None, :] <= q_max[:, :, None])
    # Full iff no padding and every kv id <= every q id.
    q_min = _per_block(np.where(q64 >= 0, q64, -1), bq, big, np.min)
    kv_max = _per_block(kv64, bkv, -1, np.max)
    kv_pad = _per_block(kv64 < 0, bkv, False, np.any)
    full = (q_min[:, :, None] >= 0) & ~kv_pad[:, None, :] & (kv_max[:, None, :] <= q_min[:, :, None])
    return self._unbatch(np.where(full, FULL, np.where(nonempty, PARTIAL, EMPTY)))


@dataclasses.dataclass(frozen=True, eq=False)
class FullMask(Mask):
  """Every query sees every key. Holds no ids: pass lengths to ``to_dense``/``block_summary`` when used alone."""

  @property
  def q_len(self):
    return None

  @property
  def kv_len(self):
    return None

  @property
  def batch_size(self):
    return None

  def _dense(self, lq, lkv, xp):
    return xp.ones((lq, lkv), bool)

  def _leaf_summary(self, bq, bkv, lq, lkv):
    return np.full((_num_blocks(lq, bq), _num_blocks(lkv, bkv)), FULL, np.int8)

  def _tiles(self, qi, ki, b):
    return np.ones(np.broadcast_shapes(qi.shape, ki.shape), bool)


@dataclasses.dataclass(frozen=True, eq=False)
class DenseMask(Mask):
  """An explicit boolean mask ``[Lq, Lkv]`` or ``[B, Lq, Lkv]`` (True = visible), for layouts ids cannot express."""

  mask: Array

  def __post_init__(self):
    m = self.mask if hasattr(self.mask, "ndim") else np.asarray(self.mask)
    if m.ndim not in (2, 3):
      raise ValueError(f"DenseMask needs a [Lq, Lkv] or [B, Lq, Lkv] boolean array, got shape {tuple(m.shape)}")
    if m.dtype != bool:
      raise TypeError(f"DenseMask needs a boolean array, got dtype {m.dtype}")
    object.__setattr__(self, "mask", m)

  @property
  def q_len(self):
    return int(self.mask.shape[-2])

  @property
  def kv_len(self):
    return int(self.mask.shape[-1])

  @property
  def batch_size(self):
    return int(self.mask.shape[0]) if self.mask.ndim == 3 else None

  def _dense(self, lq, lkv, xp):
    return xp.asarray(self.mask)

  def _leaf_summary(self, bq, bkv, lq, lkv):
    m = _concrete(self.mask, "mask")
    batched = m if m.ndim == 3 else m[None]
    nq, nk = _num_blocks(lq, bq), _num_blocks(lkv, bkv)
    inside = np.zeros((nq * bq, nk * bkv), bool)
    inside[:lq, :lkv] = True
    padded = np.zeros((batched.shape[0], nq * bq, nk * bkv), bool)
    padded[:, :lq, :lkv] = batched
    tiles = padded.reshape(-1, nq, bq, nk, bkv)
    count = tiles.sum(axis=(2, 4))
    out = np.where(count == _tile_sizes(lq, lkv, bq, bkv), FULL, np.where(count > 0, PARTIAL, EMPTY))
    return out if m.ndim == 3 else out[0]

  def _tiles(self, qi, ki, b):
    m = _concrete(self.mask, "mask")
    if m.ndim == 2:
      return m[qi, ki]
    return m[b[:, None, None], qi, ki]


@dataclasses.dataclass(frozen=True, eq=False)
class _Combined(Mask):
  """``a & b`` or ``a | b`` (n-ary after flattening)."""

  op: str
  children: tuple[Mask, ...]

  def __post_init__(self):
    flat = []
    for c in self.children:
      flat.extend(c.children if isinstance(c, _Combined) and c.op == self.op else (c,))
    object.__setattr__(self, "children", tuple(flat))
    for attr in ("q_len", "kv_len"):
      lens = {getattr(c, attr) for c in flat} - {None}
      if len(lens) > 1:
        raise ValueError(f"cannot combine masks with different {attr}: {sorted(lens)}")
    sizes = {c.batch_size for c in flat} - {None}
    if len(sizes) > 1:
      raise ValueError(f"cannot combine masks with different batch sizes: {sorted(sizes)}")

  def _first(self, attr):
    return next((getattr(c, attr) for c in self.children if getattr(c, attr) is not None), None)

  @property
  def q_len(self):
    return self._first("q_len")

  @property
  def kv_len(self):
    return self._first("kv_len")

  @property
  def batch_size(self):
    return self._first("batch_size")

  def _dense(self, lq, lkv, xp):
    parts = [c._dense(lq, lkv, xp) for c in self.children]
    out = parts[0]
    for p in parts[1:]:
      out = (out & p) if self.op == "and" else (out | p)
    return out

  def _leaf_summary(self, bq, bkv, lq, lkv):
    b = self.batch_size
    parts = []
    for c in self.children:
      s = c._leaf_summary(bq, bkv, lq, lkv)
      parts.append(np.broadcast_to(s, (b,) + s.shape[-2:]) if b is not None else s)
    stacked = np.stack(parts)
    if self.op == "and":
      decided = np.where((stacked == EMPTY).any(0), EMPTY, np.where((stacked == FULL).all(0), FULL, PARTIAL))
      undecided = ~(stacked == EMPTY).any(0) & ~(stacked == FULL).all(0)
    else:
      decided = np.where((stacked == FULL).any(0), FULL, np.where((stacked == EMPTY).all(0), EMPTY, PARTIAL))
      undecided = ~(stacked == FULL).any(0) & ~(stacked == EMPTY).all(0)
    # Children disagree on these tiles (e.g. partial & partial): look at their elements.
    tiles = np.argwhere(undecided)
    if len(tiles):
      vis = self._evaluate_tiles(tiles, bq, bkv, lq, lkv)
      sizes = _tile_sizes(lq, lkv, bq, bkv)[tiles[:, -2], tiles[:, -1]]
      count = vis.sum(axis=(1, 2))
      decided[tuple(tiles.T)] = np.where(count == sizes, FULL, np.where(count > 0, PARTIAL, EMPTY))
    return decided

  def _tiles(self, qi, ki, b):
    parts = [c._tiles(qi, ki, b) for c in self.children]
    out = parts[0]
    for p in parts[1:]:
      out = (out & p) if self.op == "and" else (out | p)
    return out


def padding_mask(q_valid: Array, kv_valid: Array | None = None) -> SegmentMask:
  """Mask of padding only: positions where ``valid`` is False see nothing and are seen by nothing."""

  def ids(valid):
    return np.where(valid, 0, -1) if isinstance(valid, np.ndarray) else jnp.where(valid, 0, -1)

  q = ids(q_valid)
  return SegmentMask(q, q if kv_valid is None else ids(kv_valid))


__all__ = [
  "EMPTY",
  "PARTIAL",
  "FULL",
  "Mask",
  "FullMask",
  "SegmentMask",
  "BlockCausalMask",
  "DenseMask",
  "padding_mask",
]
