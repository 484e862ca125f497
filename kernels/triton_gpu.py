"""Block-sparse flash attention for NVIDIA GPUs through the Pallas Triton lowering (documented fallback).

Letters: B batch, H heads, L length, D head dim, R rows of tiles, S list length, N id leaves.

JAX 0.11 deprecates the Triton lowering in favour of Mosaic GPU. Hopper GPUs run ``mosaic_gpu.py``; these kernels
serve older GPUs (Ampere, Ada) and every input outside the Mosaic GPU kernels' scope (float32, stored dense tiles,
other tile sizes, visit counting). The kernels use the model layout [B, L, H, D] directly (no transposes).

Grid (R, B, H): one program per (query block or key block, sample, head). A program loads its own block once and
loops over its tile list with two ``fori_loop``s, first the full tiles (no mask) then the partial tiles (element
mask from the ids of the tile's rows and columns, or the stored tile), so empty tiles cost nothing and unmasked
tiles pay no masking. Lists and counts are plain int32 operands read with scalar loads.

* forward: online softmax in registers, writes the output and log-sum-exp [B, H, L].
* dq: per query block over its key blocks; dk/dv: per key block over the transposed lists.
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
_NT = (((1,), (1,)), ((), ()))
_TN = (((0,), (0,)), ((), ()))
_NN = (((1,), (0,)), ((), ()))


@dataclasses.dataclass(frozen=True)
class _Static:
  rows: int
  length: int
  block_q: int
  block_kv: int
  n_ids: int
  stored: bool
  blocks_batched: bool
  scale: float
  q_len: int
  kv_len: int
  check_q: bool
  check_kv: bool
  program: Any
  count_visits: bool
  precision: Any


def _static(km: KernelMask, lists: TileLists, bq: int, bkv: int, scale: float, dtype, count_visits: bool, stored):
  return _Static(
    rows=int(lists.index.shape[1]),
    length=int(lists.index.shape[2]),
    block_q=bq,
    block_kv=bkv,
    n_ids=0 if km.q_ids is None else int(km.q_ids.shape[1]),
    stored=stored is not None,
    blocks_batched=km.blocks_batched,
    scale=float(scale),
    q_len=km.q_len,
    kv_len=km.kv_len,
    check_q=km.q_pad > km.q_len,
    check_kv=km.kv_pad > km.kv_len,
    program=km.program,
    count_visits=count_visits,
    precision=masking.dot_precision(dtype),
  )


def _list_operands(lists: TileLists) -> list[jax.Array]:
  out = [lists.index.reshape(-1), lists.counts.reshape(-1)]
  if lists.block is not None:
    out.append(lists.block.reshape(-1))
  return out


def _mask_operands(km: KernelMask, stored: Any) -> list[jax.Array]:
  if stored is not None:
    return [stored]
  if km.q_ids is None:
    return []
  return [km.q_ids, km.kv_ids]


def _whole(x: jax.Array) -> pl.BlockSpec:
  """The whole array as one block (the kernel indexes into it)."""
  return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _tile_mask(cfg: _Static, b, q_start, kv_start, block_index, mask_refs):
  """Element mask [bq, bkv] of the tile at (q_start, kv_start) from the whole-array id or stored-tile refs."""
  bq, bkv = cfg.block_q, cfg.block_kv
  stored = q_ids = kv_ids = None
  if cfg.stored:
    (blk_ref,) = mask_refs
    sel = b if cfg.blocks_batched else 0
    stored = lambda: blk_ref[sel, block_index]  # noqa: E731  [bq, bkv] int8
  elif cfg.n_ids:
    q_ref, kv_ref = mask_refs
    q_ids = lambda n: q_ref[b, n, pl.ds(q_start, bq)][:, None]  # noqa: E731
    kv_ids = lambda n: kv_ref[b, n, pl.ds(kv_start, bkv)][None, :]  # noqa: E731
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


def _row_lists(cfg: _Static, b, row, index_ref, counts_ref, block_ref):
  base = b * cfg.rows + row
  n_full, n_total = counts_ref[base * 2], counts_ref[base * 2 + 1]
  entry = lambda s: index_ref[base * cfg.length + s]  # noqa: E731
  block = (lambda s: block_ref[base * cfg.length + s]) if block_ref is not None else (lambda s: 0)  # noqa: E731
  return n_full, n_total, entry, block


def _walk(n_full, n_total, body, carry):
  """Full tiles first (no mask), then partial tiles (masked)."""
  carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), carry)
  return lax.fori_loop(n_full, n_total, functools.partial(body, masked=True), carry)


def _split_refs(refs, n_lists: int, n_in: int, n_mask: int):
  lists = refs[:n_lists]
  ins = refs[n_lists : n_lists + n_in]
  mask_refs = refs[n_lists + n_in : n_lists + n_in + n_mask]
  outs = refs[n_lists + n_in + n_mask :]
  block_ref = lists[2] if n_lists == 3 else None
  return lists[0], lists[1], block_ref, ins, mask_refs, outs


# ------------------------------------------------------------------------------------------------------------------
# Forward.


def _fwd_kernel(*refs, cfg: _Static, n_lists: int, n_mask: int):
  index_ref, counts_ref, block_ref, (q_ref, k_ref, v_ref), mask_refs, outs = _split_refs(refs, n_lists, 3, n_mask)
  o_ref, lse_ref = outs[0], outs[1]
  i, b = pl.program_id(0), pl.program_id(1)
  bq, bkv = cfg.block_q, cfg.block_kv
  n_full, n_total, entry, block = _row_lists(cfg, b, i, index_ref, counts_ref, block_ref)
  q = q_ref[...]  # [bq, d]

  def body(s, carry, masked):
    m, denom, acc, visits = carry
    kb = entry(s)
    k = k_ref[pl.ds(kb * bkv, bkv), :]
    v = v_ref[pl.ds(kb * bkv, bkv), :]
    s_ = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32, precision=cfg.precision) * cfg.scale
    if masked:
      vis = _tile_mask(cfg, b, i * bq, kb * bkv, block(s), mask_refs)
      s_ = jnp.where(vis, s_, masking.NEG_INF)
    p, alpha, m, denom = masking.softmax_step(s_, m, denom)
    pv = lax.dot_general(p.astype(v.dtype), v, _NN, preferred_element_type=jnp.float32, precision=cfg.precision)
    return m, denom, alpha * acc + pv, visits + 1

  init = (
    jnp.full((bq, 1), masking.NEG_INF, jnp.float32),
    jnp.zeros((bq, 1), jnp.float32),
    jnp.zeros((bq, q.shape[-1]), jnp.float32),
    jnp.int32(0),
  )
  m, denom, acc, visits = _walk(n_full, n_total, body, init)
  out, lse = masking.finalize(acc, m, denom)
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse[:, 0]
  if cfg.count_visits:
    outs[2][...] = jnp.full(outs[2].shape, visits, jnp.int32)


def _num_warps(d: int, block: int) -> int:
  return 4 if d <= 64 and block <= 64 else 8


def forward(
  q: jax.Array, k: jax.Array, v: jax.Array, km: KernelMask, scale: float, *, interpret: bool, count_visits: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """q [B, Lq_pad, H, D], k/v [B, Lkv_pad, H, D] -> (out like q, lse [B, H, Lq_pad], visits [B, H, R])."""
  bsz, lq, h, d = q.shape
  lkv = k.shape[1]
  bq, bkv = km.block_sizes.fwd
  cfg = _static(km, km.fwd, bq, bkv, scale, q.dtype, count_visits, km.blocks_fwd)
  lists = _list_operands(km.fwd)
  mask_ops = _mask_operands(km, km.blocks_fwd)
  in_specs = [
    *(_whole(x) for x in lists),
    pl.BlockSpec((SQ, bq, SQ, d), lambda i, b, hh: (b, i, hh, 0)),
    pl.BlockSpec((SQ, lkv, SQ, d), lambda i, b, hh: (b, 0, hh, 0)),
    pl.BlockSpec((SQ, lkv, SQ, d), lambda i, b, hh: (b, 0, hh, 0)),
    *(_whole(x) for x in mask_ops),
  ]
  out_specs = [
    pl.BlockSpec((SQ, bq, SQ, d), lambda i, b, hh: (b, i, hh, 0)),
    pl.BlockSpec((SQ, SQ, bq), lambda i, b, hh: (b, hh, i)),
  ]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((bsz, h, lq), jnp.float32)]
  if count_visits:
    out_specs.append(pl.BlockSpec((SQ, SQ, 1), lambda i, b, hh: (b, hh, i)))
    out_shape.append(jax.ShapeDtypeStruct((bsz, h, cfg.rows), jnp.int32))
  outs = _compat.pallas_call(
    functools.partial(_fwd_kernel, cfg=cfg, n_lists=len(lists), n_mask=len(mask_ops)),
    grid=(cfg.rows, bsz, h),
    in_specs=in_specs,
    out_specs=out_specs,
    out_shape=out_shape,
    compiler_params=_compat.triton_compiler_params(num_warps=_num_warps(d, bq), num_stages=2),
    interpret=_compat.interpret_flag(interpret),
    name="block_sparse_attention_fwd",
  )(*lists, q, k, v, *mask_ops)
  return outs[0], outs[1], (outs[2] if count_visits else None)


# ------------------------------------------------------------------------------------------------------------------
# Backward.


def _dq_kernel(*refs, cfg: _Static, n_lists: int, n_mask: int):
  index_ref, counts_ref, block_ref, ins, mask_refs, outs = _split_refs(refs, n_lists, 6, n_mask)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
  i, b = pl.program_id(0), pl.program_id(1)
  bq, bkv = cfg.block_q, cfg.block_kv
  n_full, n_total, entry, block = _row_lists(cfg, b, i, index_ref, counts_ref, block_ref)
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]

  def body(s, carry, masked):
    acc, visits = carry
    kb = entry(s)
    k = k_ref[pl.ds(kb * bkv, bkv), :]
    v = v_ref[pl.ds(kb * bkv, bkv), :]
    s_ = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32, precision=cfg.precision) * cfg.scale
    if masked:
      vis = _tile_mask(cfg, b, i * bq, kb * bkv, block(s), mask_refs)
      s_ = jnp.where(vis, s_, masking.NEG_INF)
    p = jnp.exp(s_ - lse)
    dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32, precision=cfg.precision)
    ds = p * (dp - delta)
    acc = acc + lax.dot_general(ds.astype(k.dtype), k, _NN, preferred_element_type=jnp.float32, precision=cfg.precision)
    return acc, visits + 1

  acc, visits = _walk(n_full, n_total, body, (jnp.zeros(q.shape, jnp.float32), jnp.int32(0)))
  outs[0][...] = (acc * cfg.scale).astype(outs[0].dtype)
  if cfg.count_visits:
    outs[1][...] = jnp.full(outs[1].shape, visits, jnp.int32)


def _dkv_kernel(*refs, cfg: _Static, n_lists: int, n_mask: int):
  index_ref, counts_ref, block_ref, ins, mask_refs, outs = _split_refs(refs, n_lists, 6, n_mask)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
  j, b = pl.program_id(0), pl.program_id(1)
  bq, bkv = cfg.block_q, cfg.block_kv
  n_full, n_total, entry, block = _row_lists(cfg, b, j, index_ref, counts_ref, block_ref)
  k, v = k_ref[...], v_ref[...]  # [bkv, d]

  def body(s, carry, masked):
    dk, dv, visits = carry
    qb = entry(s)
    q = q_ref[pl.ds(qb * bq, bq), :]
    do = do_ref[pl.ds(qb * bq, bq), :]
    lse = lse_ref[pl.ds(qb * bq, bq)][:, None]
    delta = delta_ref[pl.ds(qb * bq, bq)][:, None]
    s_ = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32, precision=cfg.precision) * cfg.scale
    if masked:
      vis = _tile_mask(cfg, b, qb * bq, j * bkv, block(s), mask_refs)
      s_ = jnp.where(vis, s_, masking.NEG_INF)
    p = jnp.exp(s_ - lse)  # [bq, bkv]
    dv = dv + lax.dot_general(p.astype(do.dtype), do, _TN, preferred_element_type=jnp.float32, precision=cfg.precision)
    dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32, precision=cfg.precision)
    ds = p * (dp - delta)
    dk = dk + lax.dot_general(ds.astype(q.dtype), q, _TN, preferred_element_type=jnp.float32, precision=cfg.precision)
    return dk, dv, visits + 1

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv, visits = _walk(n_full, n_total, body, (zeros, zeros, jnp.int32(0)))
  outs[0][...] = (dk * cfg.scale).astype(outs[0].dtype)
  outs[1][...] = dv.astype(outs[1].dtype)
  if cfg.count_visits:
    outs[2][...] = jnp.full(outs[2].shape, visits, jnp.int32)


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
  """Gradients (dq, dk, dv) like q, k, v from the forward's out and lse [B, H, Lq_pad]."""
  bsz, lq, h, d = q.shape
  lkv = k.shape[1]
  bq, bkv = km.block_sizes.bwd
  delta = jnp.einsum("blhd,blhd->bhl", out.astype(jnp.float32), do.astype(jnp.float32))  # [b, h, lq]
  mask_ops = _mask_operands(km, km.blocks_bwd)
  params = _compat.triton_compiler_params(num_warps=_num_warps(d, max(bq, bkv)), num_stages=2)
  row_block = lambda n: pl.BlockSpec((SQ, n, SQ, d), lambda r, b, hh: (b, r, hh, 0))  # noqa: E731
  whole_seq = lambda n: pl.BlockSpec((SQ, n, SQ, d), lambda r, b, hh: (b, 0, hh, 0))  # noqa: E731
  row_vec = lambda n: pl.BlockSpec((SQ, SQ, n), lambda r, b, hh: (b, hh, r))  # noqa: E731
  whole_vec = lambda n: pl.BlockSpec((SQ, SQ, n), lambda r, b, hh: (b, hh, 0))  # noqa: E731
  visits_spec = pl.BlockSpec((SQ, SQ, 1), lambda r, b, hh: (b, hh, r))

  cfg = _static(km, km.dq, bq, bkv, scale, q.dtype, count_visits, km.blocks_bwd)
  lists = _list_operands(km.dq)
  out_specs = [row_block(bq)]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  if count_visits:
    out_specs.append(visits_spec)
    out_shape.append(jax.ShapeDtypeStruct((bsz, h, cfg.rows), jnp.int32))
  dq_outs = _compat.pallas_call(
    functools.partial(_dq_kernel, cfg=cfg, n_lists=len(lists), n_mask=len(mask_ops)),
    grid=(cfg.rows, bsz, h),
    in_specs=[
      *(_whole(x) for x in lists),
      row_block(bq),
      whole_seq(lkv),
      whole_seq(lkv),
      row_block(bq),
      row_vec(bq),
      row_vec(bq),
      *(_whole(x) for x in mask_ops),
    ],
    out_specs=out_specs,
    out_shape=out_shape,
    compiler_params=params,
    interpret=_compat.interpret_flag(interpret),
    name="block_sparse_attention_dq",
  )(*lists, q, k, v, do, lse, delta, *mask_ops)

  cfg_t = _static(km, km.dkv, bq, bkv, scale, q.dtype, count_visits, km.blocks_bwd)
  lists_t = _list_operands(km.dkv)
  out_specs = [row_block(bkv), row_block(bkv)]
  out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
  if count_visits:
    out_specs.append(visits_spec)
    out_shape.append(jax.ShapeDtypeStruct((bsz, h, cfg_t.rows), jnp.int32))
  dkv_outs = _compat.pallas_call(
    functools.partial(_dkv_kernel, cfg=cfg_t, n_lists=len(lists_t), n_mask=len(mask_ops)),
    grid=(cfg_t.rows, bsz, h),
    in_specs=[
      *(_whole(x) for x in lists_t),
      whole_seq(lq),
      row_block(bkv),
      row_block(bkv),
      whole_seq(lq),
      whole_vec(lq),
      whole_vec(lq),
      *(_whole(x) for x in mask_ops),
    ],
    out_specs=out_specs,
    out_shape=out_shape,
    compiler_params=params,
    interpret=_compat.interpret_flag(interpret),
    name="block_sparse_attention_dkv",
  )(*lists_t, q, k, v, do, lse, delta, *mask_ops)
  visits = (dq_outs[1], dkv_outs[2]) if count_visits else None
  return dq_outs[0], dkv_outs[0], dkv_outs[1], visits
