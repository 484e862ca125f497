"""The element mask of one partial tile and the online-softmax step, shared by every kernel and the reference.

Only partial tiles are masked. The element mask is the mask's expression evaluated on the tile's ids (``ids`` mode)
or the stored tile (``blocks`` mode), and with padding present also ``position < true length`` on both sides.

Softmax state per query row: running max ``m`` (``-inf`` until a visible key is seen), running sum ``l`` and the
unnormalised output ``acc``. A fully masked tile row leaves the state untouched, and a row that never sees a key ends
with ``l = 0``: its output is 0 and its log-sum-exp is ``+inf``, so the backward pass's ``exp(s - lse)`` is 0 there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from cinema_kernels.metadata import Program, evaluate_program

NEG_INF = float("-inf")
POS_INF = float("inf")


def tile_mask(
  shape: tuple[int, int],
  q_start: Any,
  kv_start: Any,
  *,
  program: Program | None,
  q_ids: Callable[[int], Any] | None,
  kv_ids: Callable[[int], Any] | None,
  stored: Callable[[], Any] | None,
  q_len: int,
  kv_len: int,
  check_q: bool,
  check_kv: bool,
) -> jax.Array:
  """bool ``shape`` = (rows, cols): visibility inside the tile whose first row/column are ``q_start``/``kv_start``.

  ``q_ids(n)`` gives leaf n's ids of the tile rows as [rows, 1], ``kv_ids(n)`` of its columns as [1, cols];
  ``stored()`` the stored element mask (blocks mode). ``check_q``/``check_kv``: the length is padded, so compare
  positions with the true length.
  """
  vis = None
  if stored is not None:
    vis = stored() != 0
  elif program is not None:

    class _Leaves:
      def __init__(self, fn):
        self.fn = fn

      def __getitem__(self, n):
        return self.fn(n)

    vis = evaluate_program(program, _Leaves(q_ids), _Leaves(kv_ids))
  if check_q:
    rows = q_start + lax.broadcasted_iota(jnp.int32, shape, 0)
    vis = (rows < q_len) if vis is None else vis & (rows < q_len)
  if check_kv:
    cols = kv_start + lax.broadcasted_iota(jnp.int32, shape, 1)
    vis = (cols < kv_len) if vis is None else vis & (cols < kv_len)
  if vis is None:
    return jnp.ones(shape, jnp.bool_)
  return jnp.broadcast_to(vis, jnp.broadcast_shapes(vis.shape, shape))


def softmax_step(
  s: jax.Array, m_prev: jax.Array, l_prev: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """One online-softmax update with scores ``s [rows, cols]`` (float32, ``-inf`` where masked).

  Returns (p, alpha, m_new, l_new): probabilities relative to the new max, the factor that rescales the old sum and
  accumulator, and the new max and sum. Rows that have seen no visible key keep ``m = -inf`` without NaNs.
  """
  m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
  m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
  p = jnp.exp(s - m_safe)
  alpha = jnp.exp(m_prev - m_safe)
  l_new = alpha * l_prev + jnp.sum(p, axis=-1, keepdims=True)
  return p, alpha, m_new, l_new


def finalize(acc: jax.Array, m: jax.Array, denom: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(output, log-sum-exp) of the softmax state (``denom`` = the running sum); rows that saw nothing give 0, +inf."""
  seen = denom > 0
  safe = jnp.where(seen, denom, 1.0)
  out = jnp.where(seen, acc / safe, 0.0)
  lse = jnp.where(seen, m + jnp.log(safe), POS_INF)
  return out, lse


def dot_precision(dtype: Any) -> Any:
  """float32 inputs multiply in full float32 (no TF32 / single bf16 pass); 16-bit inputs use the native path."""
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None
