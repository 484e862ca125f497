"""Block-sparse flash attention for TPUs (Pallas Mosaic TPU); the same kernels run on CPU in interpret mode.

Letters: B batch, H heads, L length, D head dim, R rows of tiles, S list length, N id leaves.

Layout: the kernels see [B, H, L, D] (the two minor block dimensions of a TPU tile must be (rows, D)), so the
wrappers transpose from and to the model's [B, L, H, D].

Grid (B, H, R, S): one step per (query block, list entry). The tile lists are scalar-prefetched into SMEM; the key/value
block of step s is ``index[b, r, s]`` through the BlockSpec index maps, so the pipeline fetches exactly the listed
tiles. Entries past a row's count repeat its last block (no new copy) and do no work. Full tiles (the first
``counts[..., 0]`` entries) run without a mask; partial tiles evaluate the element mask from the ids (or the stored
tile) of their rows and columns.

* forward: online softmax in VMEM scratch (m, l, acc), writes the output and the log-sum-exp at the last step.
* dq: walks the same lists (backward tile sizes): ``dq += (p * (dO v^T - delta)) k * scale`` with
  ``p = exp(s - lse)``.
* dk/dv: walks the transposed lists (for every key block, its query blocks): ``dv += p^T dO``,
  ``dk += ds^T q * scale``.

Each kernel can also write a visit count per (b, h, row), incremented once per computed tile: the tests prove with it
that exactly the non-empty tiles of the summary are computed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from cinema_kernels import _compat, masking
from cinema_kernels.metadata import KernelMask, TileLists

SQ = _compat.SQUEEZED
_NT = (((1,), (1,)), ((), ()))  # a @ b^T
_TN = (((0,), (0,)), ((), ()))  # a^T @ b


@dataclasses.dataclass(frozen=True)
class _Static:
  """What a kernel body needs to know at trace time."""

  rows: int  # R of the walked lists
  length: int  # S
  block_rows: int  # tile size along the walked dimension (bq for fwd/dq, bkv for dk/dv)
  block_cols: int
  n_ids: int  # N (0: no id leaves)
  stored: bool  # blocks mode
  scale: float
  q_len: int
  kv_len: int
  check_q: bool
  check_kv: bool
  program: Any
  count_visits: bool
  precision: Any


def _flat(lists: TileLists) -> list[jax.Array]:
  """1-D int32 arrays for SMEM (2-D SMEM arrays pad their minor dimension)."""
  out = [lists.index.reshape(-1), lists.counts.reshape(-1)]
  if lists.block is not None:
    out.append(lists.block.reshape(-1))
  return out


def _entry(cfg: _Static, b, row, s, ref):
  return ref[(b * cfg.rows + row) * cfg.length + s]


def _counts(cfg: _Static, b, row, counts_ref):
  base = (b * cfg.rows + row) * 2
  return counts_ref[base], counts_ref[base + 1]


def _mask_inputs(km: KernelMask, stored_blocks: Any) -> list[jax.Array]:
  """Extra kernel operands for partial tiles: ids [B, N, L, 1] / [B, N, 1, L] (rows / columns), or stored tiles."""
  if stored_blocks is not None:
    return [stored_blocks]
  if km.q_ids is None:
    return []
  return [km.q_ids[..., None], km.kv_ids[:, :, None, :]]


def _tile_mask(cfg: _Static, q_start, kv_start, ids_refs, bq: int, bkv: int):
  """Element mask [bq, bkv] of the current tile from the kernel's id or stored-tile refs."""
  stored = q_ids = kv_ids = None
  if cfg.stored:
    (blk_ref,) = ids_refs
    stored = lambda: blk_ref[...]  # noqa: E731
  elif cfg.n_ids:
    q_ref, kv_ref = ids_refs
    q_ids = lambda n: q_ref[n]  # noqa: E731  [bq, 1]
    kv_ids = lambda n: kv_ref[n]  # noqa: E731  [1, bkv]
  return masking.tile_mask(
    (bq, bkv),
    q_start,
    kv_start,
    program=cfg.program,
    q_ids=q_ids,
    kv_ids=kv_ids,
    stored=stored,
    q_len=cfg.q_len,
    kv_len=cfg.kv_len,
    check_q=cfg.check_q,
    check_kv=cfg.check_kv,
  )


def _when_tiles(cfg: _Static, s, n_full, n_total, body):
  """Runs ``body(masked)`` for a full tile (unmasked) or a partial tile (masked); nothing past the count."""

  @pl.when(s < n_full)
  def _():
    body(False)

  @pl.when((s >= n_full) & (s < n_total))
  def _():
    body(True)


# ------------------------------------------------------------------------------------------------------------------
# Forward.


def _fwd_kernel(*refs, cfg: _Static, n_prefetch: int, n_mask: int):
  index_ref, counts_ref = refs[0], refs[1]  # the block list (refs[2], blocks mode) is read by the index maps only
  q_ref, k_ref, v_ref = refs[n_prefetch : n_prefetch + 3]
  mask_refs = refs[n_prefetch + 3 : n_prefetch + 3 + n_mask]
  rest = refs[n_prefetch + 3 + n_mask :]
  if cfg.count_visits:
    o_ref, lse_ref, visits_ref, m_scr, l_scr, acc_scr = rest
  else:
    (o_ref, lse_ref, m_scr, l_scr, acc_scr), visits_ref = rest, None
  b, i, s = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  n_full, n_total = _counts(cfg, b, i, counts_ref)
  kb = _entry(cfg, b, i, s, index_ref)
  bq, bkv = cfg.block_rows, cfg.block_cols

  @pl.when(s == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, masking.NEG_INF, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)
    if visits_ref is not None:
      visits_ref[...] = jnp.zeros(visits_ref.shape, jnp.int32)

  def tile(masked: bool):
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    s_ = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32, precision=cfg.precision) * cfg.scale
    if masked:
      vis = _tile_mask(cfg, i * bq, kb * bkv, mask_refs, bq, bkv)
      s_ = jnp.where(vis, s_, masking.NEG_INF)
    p, alpha, m_new, l_new = masking.softmax_step(s_, m_scr[...], l_scr[...])
    pv = lax.dot_general(
      p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32, precision=cfg.precision
    )
    acc_scr[...] = alpha * acc_scr[...] + pv
    m_scr[...] = m_new
    l_scr[...] = l_new
    if visits_ref is not None:
      visits_ref[...] += 1

  _when_tiles(cfg, s, n_full, n_total, tile)

  @pl.when(s == cfg.length - 1)
  def _finish():
    out, lse = masking.finalize(acc_scr[...], m_scr[...], l_scr[...])
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def _mask_specs(km: KernelMask, cfg: _Static, bq: int, bkv: int, walk: str):
  """BlockSpecs of the element-mask operands for a walk over query rows ("q") or key rows ("kv").

  Index-map arguments: (b, h, row, s, index_ref, counts_ref[, block_ref]).
  """
  if cfg.stored:
    batched = km.blocks_batched

    def blk_map(b, h, r, s, idx, cnt, blk):
      return (b if batched else 0, _entry(cfg, b, r, s, blk), 0, 0)

    return [pl.BlockSpec((SQ, SQ, bq, bkv), blk_map)]
  if not cfg.n_ids:
    return []
  n = cfg.n_ids
  if walk == "q":

    def q_map(b, h, r, s, idx, *_):
      return (b, 0, r, 0)

    def kv_map(b, h, r, s, idx, *_):
      return (b, 0, 0, _entry(cfg, b, r, s, idx))

  else:

    def q_map(b, h, r, s, idx, *_):
      return (b, 0, _entry(cfg, b, r, s, idx), 0)

    def kv_map(b, h, r, s, idx, *_):
      return (b, 0, 0, r)

  return [pl.BlockSpec((SQ, n, bq, 1), q_map), pl.BlockSpec((SQ, n, 1, bkv), kv_map)]


def _static(km: KernelMask, lists: TileLists, rows_block: int, cols_block: int, scale, dtype, count_visits) -> _Static:
  return _Static(
    rows=int(lists.index.shape[1]),
    length=int(lists.index.shape[2]),
    block_rows=rows_block,
    block_cols=cols_block,
    n_ids=0 if km.q_ids is None else int(km.q_ids.shape[1]),
    stored=km.blocks_fwd is not None,
    scale=float(scale),
    q_len=km.q_len,
    kv_len=km.kv_len,
    check_q=km.q_pad > km.q_len,
    check_kv=km.kv_pad > km.kv_len,
    program=km.program,
    count_visits=count_visits,
    precision=masking.dot_precision(dtype),
  )


def forward(
  q: jax.Array, k: jax.Array, v: jax.Array, km: KernelMask, scale: float, *, interpret: bool, count_visits: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """q [B, Lq_pad, H, D], k/v [B, Lkv_pad, H, D] -> (out [B, Lq_pad, H, D], lse [B, H, Lq_pad, 1], visits)."""
  bsz, lq, h, d = q.shape
  bq, bkv = km.block_sizes.fwd
  lists = km.fwd
  cfg = _static(km, lists, bq, bkv, scale, q.dtype, count_visits)
  qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [b, h, l, d]
  prefetch = _flat(lists)
  mask_ops = _mask_inputs(km, km.blocks_fwd)

  def q_map(b, hh, i, s, *_):
    return (b, hh, i, 0)

  def kv_map(b, hh, i, s, idx, *_):
    return (b, hh, _entry(cfg, b, i, s, idx), 0)

  in_specs = [
    pl.BlockSpec((SQ, SQ, bq, d), q_map),
    pl.BlockSpec((SQ, SQ, bkv, d), kv_map),
    pl.BlockSpec((SQ, SQ, bkv, d), kv_map),
    *_mask_specs(km, cfg, bq, bkv, "q"),
  ]
  out_specs = [pl.BlockSpec((SQ, SQ, bq, d), q_map), pl.BlockSpec((SQ, SQ, bq, 1), q_map)]
  out_shape = [jax.ShapeDtypeStruct((bsz, h, lq, d), q.dtype), jax.ShapeDtypeStruct((bsz, h, lq, 1), jnp.float32)]
  if count_visits:
    out_specs.append(pl.BlockSpec((SQ, SQ, 1, 1), q_map))
    out_shape.append(jax.ShapeDtypeStruct((bsz, h, cfg.rows, 1), jnp.int32))
  grid_spec = _compat.prefetch_scalar_grid_spec(
    num_scalar_prefetch=len(prefetch),
    grid=(bsz, h, cfg.rows, cfg.length),
    in_specs=in_specs,
    out_specs=out_specs,
    scratch_shapes=[
      _compat.tpu_vmem((bq, 1), jnp.float32),
      _compat.tpu_vmem((bq, 1), jnp.float32),
      _compat.tpu_vmem((bq, d), jnp.float32),
    ],
  )
  kernel = functools.partial(_fwd_kernel, cfg=cfg, n_prefetch=len(prefetch), n_mask=len(mask_ops))
  outs = _compat.pallas_call(
    kernel,
    grid_spec=grid_spec,
    out_shape=out_shape,
    compiler_params=_compat.tpu_compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
    interpret=_compat.interpret_flag(interpret),
    name="block_sparse_attention_fwd",
  )(*prefetch, qt, kt, vt, *mask_ops)
  out, lse = outs[0].transpose(0, 2, 1, 3), outs[1]
  return out, lse, (outs[2][..., 0] if count_visits else None)


# ------------------------------------------------------------------------------------------------------------------
# Backward.


def _dq_kernel(*refs, cfg: _Static, n_prefetch: int, n_mask: int):
  index_ref, counts_ref = refs[0], refs[1]
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[n_prefetch : n_prefetch + 6]
  mask_refs = refs[n_prefetch + 6 : n_prefetch + 6 + n_mask]
  rest = refs[n_prefetch + 6 + n_mask :]
  if cfg.count_visits:
    dq_ref, visits_ref, acc_scr = rest
  else:
    (dq_ref, acc_scr), visits_ref = rest, None
  b, i, s = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  n_full, n_total = _counts(cfg, b, i, counts_ref)
  kb = _entry(cfg, b, i, s, index_ref)
  bq, bkv = cfg.block_rows, cfg.block_cols

  @pl.when(s == 0)
  def _init():
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)
    if visits_ref is not None:
      visits_ref[...] = jnp.zeros(visits_ref.shape, jnp.int32)

  def tile(masked: bool):
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    s_ = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32, precision=cfg.precision) * cfg.scale
    if masked:
      vis = _tile_mask(cfg, i * bq, kb * bkv, mask_refs, bq, bkv)
      s_ = jnp.where(vis, s_, masking.NEG_INF)
    p = jnp.exp(s_ - lse_ref[...])
    dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32, precision=cfg.precision)
    ds = p * (dp - delta_ref[...])
    acc_scr[...] += lax.dot_general(
      ds.astype(k.dtype), k, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32, precision=cfg.precision
    )
    if visits_ref is not None:
      visits_ref[...] += 1

  _when_tiles(cfg, s, n_full, n_total, tile)

  @pl.when(s == cfg.length - 1)
  def _finish():
    dq_ref[...] = (acc_scr[...] * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, cfg: _Static, n_prefetch: int, n_mask: int):
  index_ref, counts_ref = refs[0], refs[1]
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[n_prefetch : n_prefetch + 6]
  mask_refs = refs[n_prefetch + 6 : n_prefetch + 6 + n_mask]
  rest = refs[n_prefetch + 6 + n_mask :]
  if cfg.count_visits:
    dk_ref, dv_ref, visits_ref, dk_scr, dv_scr = rest
  else:
    (dk_ref, dv_ref, dk_scr, dv_scr), visits_ref = rest, None
  b, j, s = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  n_full, n_total = _counts(cfg, b, j, counts_ref)
  qb = _entry(cfg, b, j, s, index_ref)
  bkv, bq = cfg.block_rows, cfg.block_cols

  @pl.when(s == 0)
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)
    if visits_ref is not None:
      visits_ref[...] = jnp.zeros(visits_ref.shape, jnp.int32)

  def tile(masked: bool):
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    s_ = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32, precision=cfg.precision) * cfg.scale
    if masked:
      vis = _tile_mask(cfg, qb * bq, j * bkv, mask_refs, bq, bkv)
      s_ = jnp.where(vis, s_, masking.NEG_INF)
    p = jnp.exp(s_ - lse_ref[...])  # [bq, bkv]
    dv_scr[...] += lax.dot_general(
      p.astype(do.dtype), do, _TN, preferred_element_type=jnp.float32, precision=cfg.precision
    )
    dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32, precision=cfg.precision)
    ds = p * (dp - delta_ref[...])
    dk_scr[...] += lax.dot_general(
      ds.astype(q.dtype), q, _TN, preferred_element_type=jnp.float32, precision=cfg.precision
    )
    if visits_ref is not None:
      visits_ref[...] += 1

  _when_tiles(cfg, s, n_full, n_total, tile)

  @pl.when(s == cfg.length - 1)
  def _finish():
    dk_ref[...] = (dk_scr[...] * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def backward(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  out: jax.Array,
  lse: jax.Array,
  do: jax.Array,
  km: KernelMask,
  scale: float,
  *,
  interpret: bool,
  count_visits: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, tuple[jax.Array, jax.Array] | None]:
  """Gradients (dq, dk, dv) [B, L_pad, H, D] from the forward's out and lse [B, H, Lq_pad, 1]."""
  bsz, lq, h, d = q.shape
  lkv = k.shape[1]
  bq, bkv = km.block_sizes.bwd
  delta = jnp.einsum("blhd,blhd->bhl", out.astype(jnp.float32), do.astype(jnp.float32))[..., None]  # [b, h, lq, 1]
  qt, kt, vt, dot_ = (x.transpose(0, 2, 1, 3) for x in (q, k, v, do))
  mask_ops = _mask_inputs(km, km.blocks_bwd)
  semantics = _compat.tpu_compiler_params(("parallel", "parallel", "parallel", "arbitrary"))

  # dq: walk query blocks.
  cfg = dataclasses.replace(_static(km, km.dq, bq, bkv, scale, q.dtype, count_visits), stored=km.blocks_bwd is not None)
  prefetch = _flat(km.dq)

  def row_map(b, hh, i, s, *_):
    return (b, hh, i, 0)

  def col_map(b, hh, i, s, idx, *_):
    return (b, hh, _entry(cfg, b, i, s, idx), 0)

  in_specs = [
    pl.BlockSpec((SQ, SQ, bq, d), row_map),
    pl.BlockSpec((SQ, SQ, bkv, d), col_map),
    pl.BlockSpec((SQ, SQ, bkv, d), col_map),
    pl.BlockSpec((SQ, SQ, bq, d), row_map),
    pl.BlockSpec((SQ, SQ, bq, 1), row_map),
    pl.BlockSpec((SQ, SQ, bq, 1), row_map),
    *_mask_specs(km, cfg, bq, bkv, "q"),
  ]
  out_specs = [pl.BlockSpec((SQ, SQ, bq, d), row_map)]
  out_shape = [jax.ShapeDtypeStruct((bsz, h, lq, d), q.dtype)]
  if count_visits:
    out_specs.append(pl.BlockSpec((SQ, SQ, 1, 1), row_map))
    out_shape.append(jax.ShapeDtypeStruct((bsz, h, cfg.rows, 1), jnp.int32))
  grid_spec = _compat.prefetch_scalar_grid_spec(
    num_scalar_prefetch=len(prefetch),
    grid=(bsz, h, cfg.rows, cfg.length),
    in_specs=in_specs,
    out_specs=out_specs,
    scratch_shapes=[_compat.tpu_vmem((bq, d), jnp.float32)],
  )
  dq_outs = _compat.pallas_call(
    functools.partial(_dq_kernel, cfg=cfg, n_prefetch=len(prefetch), n_mask=len(mask_ops)),
    grid_spec=grid_spec,
    out_shape=out_shape,
    compiler_params=semantics,
    interpret=_compat.interpret_flag(interpret),
    name="block_sparse_attention_dq",
  )(*prefetch, qt, kt, vt, dot_, lse, delta, *mask_ops)

  # dk, dv: walk key blocks.
  cfg_t = dataclasses.replace(
    _static(km, km.dkv, bkv, bq, scale, q.dtype, count_visits), stored=km.blocks_bwd is not None
  )
  prefetch_t = _flat(km.dkv)

  def key_map(b, hh, j, s, *_):
    return (b, hh, j, 0)

  def query_map(b, hh, j, s, idx, *_):
    return (b, hh, _entry(cfg_t, b, j, s, idx), 0)

  in_specs = [
    pl.BlockSpec((SQ, SQ, bq, d), query_map),
    pl.BlockSpec((SQ, SQ, bkv, d), key_map),
    pl.BlockSpec((SQ, SQ, bkv, d), key_map),
    pl.BlockSpec((SQ, SQ, bq, d), query_map),
    pl.BlockSpec((SQ, SQ, bq, 1), query_map),
    pl.BlockSpec((SQ, SQ, bq, 1), query_map),
    *_mask_specs(km, cfg_t, bq, bkv, "kv"),
  ]
  out_specs = [pl.BlockSpec((SQ, SQ, bkv, d), key_map), pl.BlockSpec((SQ, SQ, bkv, d), key_map)]
  out_shape = [jax.ShapeDtypeStruct((bsz, h, lkv, d), k.dtype), jax.ShapeDtypeStruct((bsz, h, lkv, d), v.dtype)]
  if count_visits:
    out_specs.append(pl.BlockSpec((SQ, SQ, 1, 1), key_map))
    out_shape.append(jax.ShapeDtypeStruct((bsz, h, cfg_t.rows, 1), jnp.int32))
  grid_spec = _compat.prefetch_scalar_grid_spec(
    num_scalar_prefetch=len(prefetch_t),
    grid=(bsz, h, cfg_t.rows, cfg_t.length),
    in_specs=in_specs,
    out_specs=out_specs,
    scratch_shapes=[_compat.tpu_vmem((bkv, d), jnp.float32), _compat.tpu_vmem((bkv, d), jnp.float32)],
  )
  dkv_outs = _compat.pallas_call(
    functools.partial(_dkv_kernel, cfg=cfg_t, n_prefetch=len(prefetch_t), n_mask=len(mask_ops)),
    grid_spec=grid_spec,
    out_shape=out_shape,
    compiler_params=semantics,
    interpret=_compat.interpret_flag(interpret),
    name="block_sparse_attention_dkv",
  )(*prefetch_t, qt, kt, vt, dot_, lse, delta, *mask_ops)
  dq = dq_outs[0].transpose(0, 2, 1, 3)
  dk, dv = (x.transpose(0, 2, 1, 3) for x in dkv_outs[:2])
  visits = (dq_outs[1][..., 0], dkv_outs[2][..., 0]) if count_visits else None
  return dq, dk, dv, visits
