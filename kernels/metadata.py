"""Mask metadata of the block-sparse kernels: which tiles to visit, and how to mask the partial ones.

Letters: B batch, R rows of tiles (query blocks, or key blocks for the transposed lists), C columns of tiles, S list
length (the most non-empty tiles of any row), N id leaves of the mask, P stored partial tiles.

From a ``Mask`` and tile sizes this module builds a ``KernelMask``:

* **tile lists** (``TileLists``): for every query block, the key blocks whose tile is non-empty, full tiles first and
  partial tiles after them, padded to S by repeating the last entry (a repeated block index makes a TPU pipeline skip
  the copy); ``counts[..., 0]`` full tiles, ``counts[..., 1]`` non-empty tiles. The forward and the dq kernel walk
  these; the dk/dv kernel walks the transposed lists (for every key block, its query blocks).
* **element masks of partial tiles**, in one of two modes:

  - ``ids``: masks made of ``SegmentMask``, ``BlockCausalMask`` and ``FullMask`` leaves combined with ``&``/``|``.
    The kernel receives the per-token ids (``q_ids [B, N, Lq]``, ``kv_ids [B, N, Lkv]``) and the mask's expression
    (``program``, static) and recomputes the element mask of a partial tile from the ids of its rows and columns.
    Nothing L x L is stored.
  - ``blocks``: masks with a ``DenseMask`` leaf. The element masks of the partial tiles are stored
    (``mask_blocks [Bm, P, block_q, block_kv]`` int8, deduplicated) and the lists carry each tile's index into them.

Concrete ids (numpy or computed arrays) give exact summaries (``Mask.block_summary``) and short lists (S = the
densest row). Ids traced inside ``jit`` (a batch's segment ids) give summaries computed in the graph from per-block id
ranges (``min``/``max`` per block: exact for contiguous ids, conservative otherwise, never wrong because the element
mask decides) and lists of full length S = C with per-row counts.

Padding: lengths are padded to the tiles; positions past the true length are masked in every partial tile (the kernels
check the position as well as the ids), and a tile that reaches past the end is never full.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cinema_jax.attention import masks as masks_lib
from cinema_kernels.blocks import BlockSizes

EMPTY, PARTIAL, FULL = masks_lib.EMPTY, masks_lib.PARTIAL, masks_lib.FULL
_BIG = np.iinfo(np.int32).max

# A mask expression over id leaves: ("full",), ("segment", n), ("causal", n), ("and", (e, ...)), ("or", (e, ...)),
# where n indexes the id stacks.
Program = tuple


@dataclasses.dataclass(frozen=True)
class TileLists:
  """Per-row lists of non-empty tiles. ``index [B, R, S]``, ``counts [B, R, 2]`` (full, non-empty), and for the
  ``blocks`` mode ``block [B, R, S]``: the stored element mask of each listed tile."""

  index: Any
  counts: Any
  block: Any = None

  @property
  def length(self) -> int:
    return int(self.index.shape[-1])


jax.tree_util.register_dataclass(TileLists, data_fields=["index", "counts", "block"], meta_fields=[])


@dataclasses.dataclass(frozen=True)
class KernelMask:
  """Everything the kernels need to know about a mask, as arrays (a pytree) plus static structure."""

  fwd: TileLists  # query blocks -> key blocks, forward tile sizes
  dq: TileLists  # query blocks -> key blocks, backward tile sizes
  dkv: TileLists  # key blocks -> query blocks, backward tile sizes
  q_ids: Any  # [B, N, Lq_pad] int32 (ids mode with id leaves), else None
  kv_ids: Any  # [B, N, Lkv_pad] int32
  blocks_fwd: Any  # [Bm, P, block_q, block_kv] int8 (blocks mode), else None
  blocks_bwd: Any  # same at the backward tile sizes
  # Static.
  program: Program | None  # None in blocks mode
  q_len: int
  kv_len: int
  q_pad: int
  kv_pad: int
  block_sizes: BlockSizes
  blocks_batched: bool  # mask_blocks has a batch axis (Bm = B) rather than one shared set (Bm = 1)
  even_rows: bool = False  # every forward row of each sample lists as many tiles (concrete masks only)

  @property
  def batch(self) -> int:
    return int(self.fwd.index.shape[0])

  def batch_axis_specs(self, batch_spec: Any) -> KernelMask:
    """A matching tree of PartitionSpecs: every array split over the batch like q, shared mask blocks replicated."""
    from jax.sharding import PartitionSpec as P

    def spec(x: Any, batched: bool = True) -> Any:
      return None if x is None else (P(batch_spec) if batched else P())

    lists = lambda t: TileLists(spec(t.index), spec(t.counts), spec(t.block))  # noqa: E731
    return dataclasses.replace(
      self,
      fwd=lists(self.fwd),
      dq=lists(self.dq),
      dkv=lists(self.dkv),
      q_ids=spec(self.q_ids),
      kv_ids=spec(self.kv_ids),
      blocks_fwd=spec(self.blocks_fwd, self.blocks_batched),
      blocks_bwd=spec(self.blocks_bwd, self.blocks_batched),
    )


jax.tree_util.register_dataclass(
  KernelMask,
  data_fields=["fwd", "dq", "dkv", "q_ids", "kv_ids", "blocks_fwd", "blocks_bwd"],
  meta_fields=["program", "q_len", "kv_len", "q_pad", "kv_pad", "block_sizes", "blocks_batched", "even_rows"],
)


# ----------------------------------------------------------------------------------------------------------------
# Mask structure.


def _leaves(mask: masks_lib.Mask) -> list[masks_lib.Mask]:
  if isinstance(mask, masks_lib._Combined):
    return [leaf for c in mask.children for leaf in _leaves(c)]
  return [mask]


def _arrays_of(leaf: masks_lib.Mask) -> list[Any]:
  if isinstance(leaf, masks_lib.DenseMask):
    return [leaf.mask]
  if isinstance(leaf, (masks_lib.SegmentMask, masks_lib.BlockCausalMask)):
    return [leaf.q_ids, leaf.kv_ids]
  return []


def is_concrete(mask: masks_lib.Mask) -> bool:
  """True when no id array of the mask is traced (its exact summary can be computed on the host)."""
  return not any(isinstance(a, jax.core.Tracer) for leaf in _leaves(mask) for a in _arrays_of(leaf))


def has_dense_leaf(mask: masks_lib.Mask) -> bool:
  return any(isinstance(leaf, masks_lib.DenseMask) for leaf in _leaves(mask))


def _check_leaf(leaf: masks_lib.Mask) -> None:
  known = (masks_lib.FullMask, masks_lib.SegmentMask, masks_lib.BlockCausalMask, masks_lib.DenseMask)
  if not isinstance(leaf, known):
    raise TypeError(f"the block-sparse kernel does not know mask type {type(leaf).__name__}")


def _batched_leaves(mask: masks_lib.Mask) -> masks_lib.Mask:
  """The same mask with every id leaf's ids broadcast to [B, L] when any leaf is per-sample.

  ``Mask.block_summary`` of a combination of per-sample and shared id leaves indexes the shared leaf's single id
  row with the batch rows of undecided tiles; giving every leaf the batch axis keeps the summary on the batched path.
  """
  batch = mask.batch_size
  if batch is None or not isinstance(mask, masks_lib._Combined):
    return mask

  def rebuild(m: masks_lib.Mask) -> masks_lib.Mask:
    if isinstance(m, masks_lib._Combined):
      return masks_lib._Combined(m.op, tuple(rebuild(c) for c in m.children))
    if isinstance(m, (masks_lib.SegmentMask, masks_lib.BlockCausalMask)) and m.batch_size is None:
      q, kv = (np.broadcast_to(np.asarray(x), (batch, x.shape[-1])) for x in (m.q_ids, m.kv_ids))
      return type(m)(q, kv)
    return m

  return rebuild(mask)


def _program(mask: masks_lib.Mask, q_ids: list[Any], kv_ids: list[Any]) -> Program:
  """The mask's expression over id leaves; appends each leaf's ids to ``q_ids``/``kv_ids``."""
  if isinstance(mask, masks_lib._Combined):
    return (mask.op, tuple(_program(c, q_ids, kv_ids) for c in mask.children))
  if isinstance(mask, masks_lib.FullMask):
    return ("full",)
  kind = "segment" if isinstance(mask, masks_lib.SegmentMask) else "causal"
  q_ids.append(mask.q_ids)
  kv_ids.append(mask.kv_ids)
  return (kind, len(q_ids) - 1)


def evaluate_program(program: Program, q_ids: Any, kv_ids: Any) -> Any:
  """Element mask of a tile from its ids: ``q_ids[n]`` broadcasts against ``kv_ids[n]`` (e.g. [bq, 1] and [1, bkv]).

  Shared by the kernels and the reference; ``q_ids``/``kv_ids`` are indexable by leaf (refs or arrays).
  """
  kind = program[0]
  if kind == "full":
    return None  # everything visible; the caller combines with position validity
  if kind in ("segment", "causal"):
    n = program[1]
    q, kv = q_ids[n], kv_ids[n]
    rel = (q == kv) if kind == "segment" else (kv <= q)
    return rel & (q >= 0) & (kv >= 0)
  parts = [evaluate_program(p, q_ids, kv_ids) for p in program[1]]
  if kind == "and":
    parts = [p for p in parts if p is not None]
    if not parts:
      return None
    out = parts[0]
    for p in parts[1:]:
      out = out & p
    return out
  if any(p is None for p in parts):
    return None
  out = parts[0]
  for p in parts[1:]:
    out = out | p
  return out


# ----------------------------------------------------------------------------------------------------------------
# Summaries.


def _demote_ragged(summary: Any, lq: int, lkv: int, bq: int, bkv: int, xp: Any) -> Any:
  """Tiles reaching past the true lengths hold padding positions: never full."""
  nq, nk = summary.shape[-2:]
  rows = xp.arange(nq) * bq + bq > lq
  cols = xp.arange(nk) * bkv + bkv > lkv
  ragged = rows[:, None] | cols[None, :]
  return xp.where(ragged & (summary == FULL), PARTIAL, summary).astype(xp.int8)


def _block_stats(ids: Any, length: int, block: int, n: int) -> tuple[Any, Any, Any]:
  """Per block of ``ids [B, L]``: (min valid id or BIG, max valid id or -1, any padding incl. positions past L)."""
  padded = jnp.pad(ids.astype(jnp.int32), ((0, 0), (0, n * block - length)), constant_values=-1)
  tiles = padded.reshape(ids.shape[0], n, block)
  valid = tiles >= 0
  lo = jnp.min(jnp.where(valid, tiles, _BIG), axis=-1)
  hi = jnp.max(jnp.where(valid, tiles, -1), axis=-1)
  return lo, hi, jnp.any(~valid, axis=-1)


def _traced_summary(mask: masks_lib.Mask, batch: int, lq: int, lkv: int, bq: int, bkv: int) -> jax.Array:
  """int8 [B, nq, nk] in the graph. Leaves from per-block id ranges; ``&``/``|`` from the children's classes."""
  nq, nk = -(-lq // bq), -(-lkv // bkv)

  def ids2(x: Any) -> jax.Array:
    x = jnp.asarray(x)
    return jnp.broadcast_to(x if x.ndim == 2 else x[None], (batch, x.shape[-1]))

  def leaf(m: masks_lib.Mask) -> jax.Array:
    if isinstance(m, masks_lib._Combined):
      parts = jnp.stack([leaf(c) for c in m.children])
      if m.op == "and":
        return jnp.where((parts == EMPTY).any(0), EMPTY, jnp.where((parts == FULL).all(0), FULL, PARTIAL))
      return jnp.where((parts == FULL).any(0), FULL, jnp.where((parts == EMPTY).all(0), EMPTY, PARTIAL))
    if isinstance(m, masks_lib.FullMask):
      return jnp.full((batch, nq, nk), FULL, jnp.int8)
    if isinstance(m, masks_lib.DenseMask):
      dense = jnp.asarray(m.mask)
      dense = jnp.broadcast_to(dense if dense.ndim == 3 else dense[None], (batch, lq, lkv))
      dense = jnp.pad(dense, ((0, 0), (0, nq * bq - lq), (0, nk * bkv - lkv)))
      count = dense.reshape(batch, nq, bq, nk, bkv).sum(axis=(2, 4))
      return jnp.where(count == bq * bkv, FULL, jnp.where(count > 0, PARTIAL, EMPTY))
    qlo, qhi, qpad = _block_stats(ids2(m.q_ids), lq, bq, nq)
    klo, khi, kpad = _block_stats(ids2(m.kv_ids), lkv, bkv, nk)
    qlo, qhi, qpad = qlo[:, :, None], qhi[:, :, None], qpad[:, :, None]
    klo, khi, kpad = klo[:, None, :], khi[:, None, :], kpad[:, None, :]
    clean = ~qpad & ~kpad
    if isinstance(m, masks_lib.SegmentMask):
      nonempty = (qhi >= 0) & (khi >= 0) & (qlo <= khi) & (klo <= qhi)
      full = clean & (qlo == qhi) & (klo == khi) & (qlo == klo)
    else:
      nonempty = (qhi >= 0) & (klo <= qhi)
      full = clean & (khi <= qlo)
    return jnp.where(full, FULL, jnp.where(nonempty, PARTIAL, EMPTY))

  return _demote_ragged(leaf(mask), lq, lkv, bq, bkv, jnp)


def _host_summary(mask: masks_lib.Mask, batch: int, lq: int, lkv: int, bq: int, bkv: int) -> np.ndarray:
  """Exact int8 [B, nq, nk] from ``Mask.block_summary``."""
  s = _batched_leaves(mask).block_summary(bq, bkv, q_len=lq, kv_len=lkv)
  s = np.broadcast_to(s if s.ndim == 3 else s[None], (batch,) + s.shape[-2:])
  return np.asarray(_demote_ragged(s, lq, lkv, bq, bkv, np))


def block_summary(
  mask: masks_lib.Mask, batch: int, q_len: int, kv_len: int, block_q: int, block_kv: int
) -> np.ndarray | jax.Array:
  """The summary the kernels use: [B, nq, nk], exact (numpy) for concrete ids, in-graph for traced ids."""
  if is_concrete(mask):
    return _host_summary(mask, batch, q_len, kv_len, block_q, block_kv)
  return _traced_summary(mask, batch, q_len, kv_len, block_q, block_kv)


# ----------------------------------------------------------------------------------------------------------------
# Lists.


def tile_lists(summary: Any, block_table: Any = None, *, length: int | None = None) -> TileLists:
  """Compacted lists of the non-empty tiles of every row of ``summary [B, R, C]``: full first, then partial.

  ``length`` is S (default: the longest row, at least 1, which needs a concrete summary). ``block_table [B, R, C]``
  maps each tile to its stored element mask (blocks mode).
  """
  xp = np if isinstance(summary, np.ndarray) else jnp
  order_key = xp.where(summary == FULL, 0, xp.where(summary == PARTIAL, 1, 2))
  if xp is np:
    order = np.argsort(order_key, axis=-1, kind="stable")
  else:
    order = jnp.argsort(order_key, axis=-1, stable=True)
  n_full = (summary == FULL).sum(-1).astype(xp.int32)
  n_total = (summary != EMPTY).sum(-1).astype(xp.int32)
  if length is None:
    length = max(int(np.max(n_total, initial=0)), 1)
  pos = xp.minimum(xp.arange(length, dtype=xp.int32), xp.maximum(n_total - 1, 0)[..., None])
  index = xp.take_along_axis(order[..., :length].astype(xp.int32), pos, axis=-1) if length else order[..., :0]
  block = None if block_table is None else xp.take_along_axis(block_table, index, axis=-1).astype(xp.int32)
  return TileLists(index.astype(xp.int32), xp.stack([n_full, n_total], axis=-1), block)


def _pad_rows(summary: Any, rows: int, cols: int) -> Any:
  xp = np if isinstance(summary, np.ndarray) else jnp
  b, r, c = summary.shape
  return xp.pad(summary, ((0, 0), (0, rows - r), (0, cols - c)), constant_values=EMPTY)


def _stored_blocks(
  mask: masks_lib.Mask, summary: Any, batch: int, lq: int, lkv: int, bq: int, bkv: int, concrete: bool
) -> tuple[Any, Any, bool]:
  """(mask_blocks [Bm, P, bq, bkv] int8, block_table [B, nq, nk], batched) for the blocks mode."""
  _, nq, nk = summary.shape
  if concrete:
    shared = mask.batch_size is None
    view = summary[0] if shared else summary
    tiles = np.argwhere(view == PARTIAL)  # rows (qb, kb) or (b, qb, kb)
    table = np.zeros(view.shape, np.int32)
    if len(tiles):
      vis = mask._evaluate_tiles(tiles, bq, bkv, lq, lkv).reshape(len(tiles), -1)
      uniq, inverse = np.unique(vis, axis=0, return_inverse=True)
      table[tuple(tiles.T)] = inverse.reshape(-1)
      stored = uniq.reshape(-1, bq, bkv).astype(np.int8)
    else:
      stored = np.zeros((1, bq, bkv), np.int8)
    table = np.broadcast_to(table, summary.shape) if shared else table
    return stored[None], np.ascontiguousarray(table), False
  dense = jnp.asarray(mask.to_dense(lq, lkv))
  dense = jnp.broadcast_to(dense if dense.ndim == 3 else dense[None], (batch, lq, lkv))
  dense = jnp.pad(dense, ((0, 0), (0, nq * bq - lq), (0, nk * bkv - lkv)))
  stored = dense.reshape(batch, nq, bq, nk, bkv).transpose(0, 1, 3, 2, 4).reshape(batch, nq * nk, bq, bkv)
  table = jnp.broadcast_to(jnp.arange(nq * nk, dtype=jnp.int32).reshape(nq, nk), summary.shape)
  return stored.astype(jnp.int8), table, True


def _ids_stack(ids: list[Any], batch: int, length: int, padded: int, xp: Any) -> Any:
  out = []
  for x in ids:
    x = xp.asarray(x).astype(xp.int32)
    x = xp.broadcast_to(x if x.ndim == 2 else x[None], (batch, length))
    out.append(xp.pad(x, ((0, 0), (0, padded - length)), constant_values=-1))
  return xp.stack(out, axis=1)


def _padded_length(length: int, *blocks: int) -> int:
  step = math.lcm(*blocks)
  return -(-length // step) * step


def prepare(mask: masks_lib.Mask | None, batch: int, q_len: int, kv_len: int, block_sizes: BlockSizes) -> KernelMask:
  """Builds the ``KernelMask`` of ``mask`` for inputs of batch ``batch`` and lengths ``q_len``/``kv_len``.

  Call it outside ``jit`` (or on concrete ids inside) to get exact summaries and short lists; traced ids work too.
  """
  mask = masks_lib.FullMask() if mask is None else mask
  if not isinstance(mask, masks_lib.Mask):
    raise TypeError(f"mask must be a cinema_jax.attention.masks.Mask or None, got {type(mask).__name__}")
  for leaf in _leaves(mask):
    _check_leaf(leaf)
  q_len, kv_len = mask.resolve_lengths(q_len, kv_len)
  if mask.batch_size not in (None, batch):
    raise ValueError(f"mask holds per-sample ids for batch {mask.batch_size}, inputs have batch {batch}")
  concrete = is_concrete(mask)
  if concrete:
    mask = _batched_leaves(mask)  # also for _stored_blocks' tile evaluation
  dense_mode = has_dense_leaf(mask)
  xp = np if concrete else jnp
  (bq, bkv), (bq_b, bkv_b) = block_sizes.fwd, block_sizes.bwd
  q_pad = _padded_length(q_len, bq, bq_b)
  kv_pad = _padded_length(kv_len, bkv, bkv_b)

  def build(bq_: int, bkv_: int) -> tuple[TileLists, TileLists, Any]:
    summary = block_summary(mask, batch, q_len, kv_len, bq_, bkv_)
    table, stored = None, None
    if dense_mode:
      stored, table, _ = _stored_blocks(mask, summary, batch, q_len, kv_len, bq_, bkv_, concrete)
    rows, cols = q_pad // bq_, kv_pad // bkv_
    summary = _pad_rows(summary, rows, cols)
    if table is not None:
      table = _pad_rows(table, rows, cols)
    length = None if concrete else cols
    length_t = None if concrete else rows
    lists = tile_lists(summary, table, length=length)
    t_table = None if table is None else xp.swapaxes(table, 1, 2)
    lists_t = tile_lists(xp.swapaxes(summary, 1, 2), t_table, length=length_t)
    return lists, lists_t, stored

  fwd, fwd_t, blocks_fwd = build(bq, bkv)
  if (bq_b, bkv_b) == (bq, bkv):
    dq, dkv, blocks_bwd = fwd, fwd_t, blocks_fwd
  else:
    dq, dkv, blocks_bwd = build(bq_b, bkv_b)
  q_ids = kv_ids = None
  program = None
  if not dense_mode:
    q_list: list[Any] = []
    kv_list: list[Any] = []
    program = _program(mask, q_list, kv_list)
    if q_list:
      q_ids = _ids_stack(q_list, batch, q_len, q_pad, xp)
      kv_ids = _ids_stack(kv_list, batch, kv_len, kv_pad, xp)
  return KernelMask(
    fwd=fwd,
    dq=dq,
    dkv=dkv,
    q_ids=q_ids,
    kv_ids=kv_ids,
    blocks_fwd=blocks_fwd,
    blocks_bwd=blocks_bwd,
    program=program,
    q_len=q_len,
    kv_len=kv_len,
    q_pad=q_pad,
    kv_pad=kv_pad,
    block_sizes=block_sizes,
    blocks_batched=bool(dense_mode and not concrete),
    even_rows=bool(concrete and np.all(fwd.counts[..., 1] == fwd.counts[..., :1, 1])),
  )
