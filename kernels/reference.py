"""Plain-jnp reference of the block-sparse algorithm: the kernels' walk over the tile lists, without Pallas.

Letters: B batch, H heads, D head dim, R query blocks, S list length, Q/K rows/columns of a tile.

Every query block walks its list of non-empty key blocks (full first, then partial), masks only the partial tiles and
folds each tile into an online softmax, exactly as the forward kernels do; all query blocks advance together, one list
entry per step. It also counts the tiles it visits, so a test can compare the walk with the mask's summary. Use it to
check the kernels' tile bookkeeping independently of Pallas; use ``implementation="xla"`` of
``cinema_jax.attention.dot_product_attention`` as the dense ground truth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from cinema_kernels import masking
from cinema_kernels.metadata import KernelMask


def reference_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, kmask: KernelMask, scale: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(out [B, Lq, H, D], lse [B, H, Lq] float32, visits [B, R] int32) for q [B, Lq, H, D], k/v [B, Lkv, H, D]."""
  kmask = jax.tree.map(jnp.asarray, kmask)
  bq, bkv = kmask.block_sizes.fwd
  b, lq, h, d = q.shape
  lists = kmask.fwd
  r, s_len = lists.index.shape[1:]
  qp = jnp.pad(q, ((0, 0), (0, kmask.q_pad - lq), (0, 0), (0, 0)))
  kp = jnp.pad(k, ((0, 0), (0, kmask.kv_pad - k.shape[1]), (0, 0), (0, 0)))
  vp = jnp.pad(v, ((0, 0), (0, kmask.kv_pad - v.shape[1]), (0, 0), (0, 0)))
  q_tiles = qp.reshape(b, r, bq, h, d)  # [b, r, q, h, d]
  k_tiles = kp.reshape(b, -1, bkv, h, d)  # [b, nk, k, h, d]
  v_tiles = vp.reshape(b, -1, bkv, h, d)
  n_full, n_total = lists.counts[..., 0], lists.counts[..., 1]  # [b, r]
  q_start = jnp.arange(r, dtype=jnp.int32)[None, :] * bq  # [1, r]
  prec = masking.dot_precision(q.dtype)

  def gather(tiles, kb):  # tiles [b, nk, ...], kb [b, r] -> [b, r, ...]
    return jnp.take_along_axis(tiles, kb.reshape(kb.shape + (1,) * (tiles.ndim - 2)), axis=1)

  def element_mask(kb, step):
    """[b, r, q, k] visibility of the tiles (r, kb)."""
    if kmask.blocks_fwd is not None:
      blocks = kmask.blocks_fwd  # [bm, p, q, k]
      sel = jnp.arange(b) if kmask.blocks_batched else jnp.zeros(b, jnp.int32)
      stored = blocks[sel[:, None], lists.block[:, :, step]]  # [b, r, q, k]
      ids_q = ids_kv = None
    else:
      stored = None
      if kmask.q_ids is not None:
        n = kmask.q_ids.shape[1]
        ids_q = kmask.q_ids.reshape(b, n, r, bq)  # [b, n, r, q]
        kv_all = kmask.kv_ids.reshape(b, n, -1, bkv)  # [b, n, nk, k]
        ids_kv = jnp.take_along_axis(kv_all, kb[:, None, :, None], axis=2)  # [b, n, r, k]
    return masking.tile_mask(
      (bq, bkv),
      q_start[..., None, None],
      kb[..., None, None] * bkv,
      program=kmask.program,
      q_ids=None if stored is not None else (lambda n: ids_q[:, n, :, :, None]),
      kv_ids=None if stored is not None else (lambda n: ids_kv[:, n, :, None, :]),
      stored=None if stored is None else (lambda: stored),
      q_len=kmask.q_len,
      kv_len=kmask.kv_len,
      check_q=kmask.q_pad > kmask.q_len,
      check_kv=kmask.kv_pad > kmask.kv_len,
    )

  def step(carry, s_idx):
    m, denom, acc, visits = carry  # [b, r, h, q, 1], same, [b, r, h, q, d], [b, r]
    kb = lists.index[:, :, s_idx]  # [b, r]
    kt, vt = gather(k_tiles, kb), gather(v_tiles, kb)  # [b, r, k, h, d]
    s = jnp.einsum("brqhd,brkhd->brhqk", q_tiles, kt, preferred_element_type=jnp.float32, precision=prec) * scale
    active = (s_idx < n_total)[:, :, None, None, None]
    partial = (s_idx >= n_full)[:, :, None, None, None]
    vis = element_mask(kb, s_idx)
    vis = jnp.broadcast_to(vis, (b, r, bq, bkv))[:, :, None]  # [b, r, 1, q, k]
    s = jnp.where(partial & ~vis, masking.NEG_INF, s)
    p, alpha, m_new, denom_new = masking.softmax_step(s, m, denom)
    pv = jnp.einsum("brhqk,brkhd->brhqd", p.astype(v.dtype), vt, preferred_element_type=jnp.float32, precision=prec)
    acc_new = alpha * acc + pv
    m = jnp.where(active, m_new, m)
    denom = jnp.where(active, denom_new, denom)
    acc = jnp.where(active, acc_new, acc)
    return (m, denom, acc, visits + (s_idx < n_total).astype(jnp.int32)), None

  init = (
    jnp.full((b, r, h, bq, 1), masking.NEG_INF, jnp.float32),
    jnp.zeros((b, r, h, bq, 1), jnp.float32),
    jnp.zeros((b, r, h, bq, d), jnp.float32),
    jnp.zeros((b, r), jnp.int32),
  )
  (m, denom, acc, visits), _ = lax.scan(step, init, jnp.arange(s_len))
  out, lse = masking.finalize(acc, m, denom)
  out = out.transpose(0, 1, 3, 2, 4).reshape(b, r * bq, h, d)[:, :lq]  # [b, lq, h, d]
  lse = lse[..., 0].transpose(0, 2, 1, 3).reshape(b, h, r * bq)[:, :, :lq]  # [b, h, lq]
  return out.astype(q.dtype), lse, visits
