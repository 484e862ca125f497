"""Splash attention (JAX's block-sparse TPU kernel) as the benchmark's TPU reference for a masked attention.

Letters: B batch, L length, H heads, D head dim.

performance.md holds our kernel on TPU to splash attention with the same mask. Splash takes the mask statically (its
block summary is computed on the host when the kernel is built, so it skips empty blocks as ours does), works on
[H, L, D] per sample and applies no softmax scale. The function built here takes the model layout [B, L, H, D] like
every other implementation in the benchmark: it transposes (and scales q, in q's dtype, as models feeding splash
do) around ``jax.vmap`` of the kernel over the batch, as our TPU kernel transposes to [B, H, L, D] around its own
call; the transposes are timed with it, as ours are. Lengths must be multiples of 128 (the
lane width splash tiles by); the blocks are the largest of 512, 256, 128 that divides L (512 is what large models run
splash with).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cinema_jax.attention import masks

_LANES = 128


def splash_block(length: int) -> int:
  """The splash tile side at ``length`` tokens."""
  if length % _LANES:
    raise ValueError(f"splash attention needs L a multiple of {_LANES}, got L = {length}")
  return next(b for b in (512, 256, _LANES) if length % b == 0)


def _head_mask(mask: masks.Mask | None, name: str, length: int):
  """Splash's mask for one head; built eagerly (splash needs it concrete, and a trace would make it abstract)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_masks

  shape = (length, length)
  if mask is None:
    return splash_masks.FullMask(shape)
  if name == "causal":  # computed per block, not stored
    return splash_masks.CausalMask(shape)
  return splash_masks.NumpyMask(np.asarray(mask.to_dense(length, length)))


def splash_attention_fn(
  mask: masks.Mask | None, name: str, length: int, *, interpret: bool
) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
  """Attention over [B, L, H, D] by splash with ``mask`` (None: dense); the kernel is built on the first call (when
  the number of heads is known) and raises there if L does not suit splash."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_masks

  head_mask = _head_mask(mask, name, length)

  @functools.cache
  def kernel(heads: int):
    block = splash_block(length)
    sizes = splash.BlockSizes(
      block_q=block,
      block_kv=block,
      block_kv_compute=block,
      block_q_dkv=block,
      block_kv_dkv=block,
      block_kv_dkv_compute=block,
      block_q_dq=block,
      block_kv_dq=block,
    )
    multi = splash_masks.MultiHeadMask([head_mask] * heads)
    # Built on the first trace, kept for later ones (forward, then forward+backward): its block tables must be
    # concrete arrays, not values of the trace that happened to build it.
    with jax.ensure_compile_time_eval():
      return splash.make_splash_mha(multi, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)

  def attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    scale = q.shape[-1] ** -0.5
    to_heads = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731 - [B, L, H, D] <-> [B, H, L, D]
    out = jax.vmap(kernel(q.shape[2]))(to_heads(q * jnp.asarray(scale, q.dtype)), to_heads(k), to_heads(v))
    return to_heads(out)

  return attend
