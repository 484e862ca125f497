"""A small trainable text encoder: token ids -> per-token states and a pooled vector.

Legend: B batch, T tokens, V vocabulary, E width, H heads, D head dim, C_txt token-state width, C_vec pooled width.

The demo models learn their text encoder jointly with the denoiser (the real systems freeze T5 / CLIP / umT5 and
read precomputed embeddings instead; both paths give the denoiser the same ``(states, pooled)`` pair). Token ids come
from ``cinema_jax.data.text`` (0 = padding). The encoder is a pre-LayerNorm transformer: token embedding plus a
learned position embedding, ``depth`` blocks of masked self-attention and a GELU MLP, a final LayerNorm, then two
heads: states [B, T, C_txt] (zero at padding) and pooled [B, C_vec] = Dense(masked mean of the final hidden
states), or None when ``pooled_dim`` is 0.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cinema_jax.attention import dot_product_attention, masks
from cinema_jax.nn import MLP, Dense, LayerNorm
from cinema_jax.parallel.axes import ACT_BATCH, ACT_EMBED, ACT_LENGTH, EMBED, HEADS, IN_FEATURES, OUT_FEATURES, QKV


class EncoderBlock(nn.Module):
  """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x)); [B, T, E] -> [B, T, E]."""

  heads: int
  mlp_ratio: float = 4.0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, segment: jax.Array) -> jax.Array:  # segment [B, T]: 0 token, -1 padding
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, t, e = x.shape
    d = e // self.heads
    h = LayerNorm(use_scale=True, use_bias=True, name="norm1", **kw)(x)
    qkv = Dense(3 * e, kernel_axes=(EMBED, QKV), name="qkv", **kw)(h)  # [b, t, 3 e]
    q, k, v = jnp.split(qkv.reshape(b, t, 3 * self.heads, d), 3, axis=2)  # each [b, t, h, d]
    o = dot_product_attention(q, k, v, mask=masks.SegmentMask(segment, segment), implementation="xla")
    x = x + Dense(e, kernel_axes=(HEADS, EMBED), name="proj", **kw)(o.reshape(b, t, e))
    h = LayerNorm(use_scale=True, use_bias=True, name="norm2", **kw)(x)
    x = x + MLP(int(e * self.mlp_ratio), name="mlp", **kw)(h)
    return nn.with_logical_constraint(x, (ACT_BATCH, ACT_LENGTH, ACT_EMBED))


class TextEncoder(nn.Module):
  """Token ids [B, T] (+ mask [B, T]) -> (states [B, T, C_txt], pooled [B, C_vec])."""

  vocab_size: int
  max_length: int
  width: int = 64
  depth: int = 2
  heads: int = 4
  states_dim: int = 64  # C_txt: the denoiser's text width (MM-DiT context_in_dim, video DiT text_dim)
  pooled_dim: int = 64  # C_vec: the MM-DiT's vec_in_dim; 0 = no pooled head (the video DiT takes none)
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @classmethod
  def from_config(cls, text, *, states_dim: int, pooled_dim: int, dtype=jnp.float32, param_dtype=jnp.float32):
    """From a config's ``text.encoder`` section (see configs/story.py)."""
    e = text.encoder
    if e.width % e.heads:
      raise ValueError(f"text.encoder.width={e.width} must divide into text.encoder.heads={e.heads}")
    if e.tokenizer == "bytes" and e.vocab_size < 259:
      raise ValueError(f"text.encoder.vocab_size={e.vocab_size} is too small for byte tokens (259 ids)")
    return cls(
      vocab_size=e.vocab_size, max_length=text.caption_tokens, width=e.width, depth=e.depth, heads=e.heads,
      states_dim=states_dim, pooled_dim=pooled_dim, dtype=dtype, param_dtype=param_dtype,
    )  # fmt: skip

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
    if ids.shape[-1] > self.max_length:
      raise ValueError(f"{ids.shape[-1]} caption tokens, the text encoder takes at most {self.max_length}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    mask = ids != 0 if mask is None else mask.astype(bool)  # [b, t]
    table = self.param(
      "token_embedding",
      nn.with_logical_partitioning(nn.initializers.normal(0.02), (IN_FEATURES, EMBED)),
      (self.vocab_size, self.width),
      self.param_dtype,
    )
    positions = self.param(
      "position_embedding",
      nn.with_logical_partitioning(nn.initializers.normal(0.02), (IN_FEATURES, EMBED)),
      (self.max_length, self.width),
      self.param_dtype,
    )
    x = jnp.take(jnp.asarray(table, self.dtype), ids, axis=0) + jnp.asarray(positions, self.dtype)[: ids.shape[-1]]
    segment = jnp.where(mask, 0, -1).astype(jnp.int32)
    for i in range(self.depth):
      x = EncoderBlock(self.heads, name=f"block_{i}", **kw)(x, segment)
    x = LayerNorm(use_scale=True, use_bias=True, name="final_norm", **kw)(x)
    keep = mask[..., None].astype(x.dtype)  # [b, t, 1]
    states = Dense(self.states_dim, kernel_axes=(EMBED, OUT_FEATURES), name="states_out", **kw)(x) * keep
    if not self.pooled_dim:
      return states, None
    mean = (x * keep).sum(1) / jnp.maximum(keep.sum(1), 1.0)  # [b, e]
    pooled = Dense(self.pooled_dim, kernel_axes=(EMBED, OUT_FEATURES), name="pooled_out", **kw)(mean)
    return states, pooled
