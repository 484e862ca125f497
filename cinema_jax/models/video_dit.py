"""The diffusion-forcing video DiT: the Wan 2.1 / SkyReels-V2 transformer with one timestep per latent frame.

Legend: B batch, F latent frames (after the temporal patch), Hp x Wp token grid per frame, N = Hp * Wp tokens per
frame, L = F * N tokens, T text tokens, E width, H heads, D head dim (E = H * D), M feed-forward width, C latent
channels, P patch volume (pt * ph * pw), K = 6 modulation chunks (shift, scale, gate of self-attention, then of the
feed-forward).

Data flow (one forward):

  latents [B, F*pt, Hp*ph, Wp*pw, C] -- patchify (einops) -> Dense(P*C -> E)  = the Conv3d patch embed  -> x [B, L, E]
  t [B] or [B, F] (0..1000) -- sinusoid(freq_dim) -> Dense-SiLU-Dense -> e [B, F, E]
                            -- SiLU-Dense(6E) -> e0 [B, F, 6, E]  (+ fps projection [B, 6, E] broadcast over F)
  text [B, T, text_dim] -- Dense-GELU(tanh)-Dense -> ctx [B, T, E]
  blocks (nn.scan): mod = table[6, E] + e0, applied per frame (tokens viewed as [B, F, N, E]):
     x += g1 * SelfAttn(LN(x) (1 + sc1) + sh1)       QK RMSNorm across all heads, 3D RoPE, bidirectional or
                                                       block-causal over frame blocks (masks.BlockCausalMask)
     x += CrossAttn(LN_affine(x), ctx)               QK RMSNorm, no RoPE, no mask
     x += g2 * FFN(LN(x) (1 + sc2) + sh2)            GELU(tanh)
  head: (sh, sc) = table[2, E] + e; Dense(E -> P*C_out)(LN(x) (1 + sc) + sh) -> unpatchify -> [B, F*pt, H, W, C_out]

The per-frame modulation stays [B, F, 6, E] and is broadcast over each frame's N tokens inside
``cinema_jax.nn.modulate``/``gate``; a [B, L, 6, E] tensor (6.3 GB per block in float32 at 14B / 540P in the
original code) is never built. Time embedding and modulation run in float32 whatever the compute dtype.

Parameter names are ours; ``cinema_jax.convert.skyreels`` maps the diffusers and the original Wan/SkyReels names
onto them one to one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from cinema_jax import nn as cnn
from cinema_jax.attention import Tiles, config_tiles, dot_product_attention, kernel_tiles, masks
from cinema_jax.parallel import axes

# Activation checkpointing per block. Tags below (checkpoint_name) name what "attention" keeps.
_SAVED_BY_ATTENTION_POLICY = ("self_attn_out", "cross_attn_out")
REMAT_POLICIES: dict[str, Callable[..., Any] | None] = {
  "none": None,  # no rematerialisation: keep every activation (fastest, most memory)
  "full": jax.checkpoint_policies.nothing_saveable,  # keep only block inputs; recompute the block in backward
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs, recompute elementwise
  "attention": jax.checkpoint_policies.save_only_these_names(*_SAVED_BY_ATTENTION_POLICY),  # keep attention outputs
}


def frame_block_ids(num_frames: int, tokens_per_frame: int, causal_block_size: int) -> np.ndarray:
  """Block id of every token [F * N]: frame f belongs to block f // causal_block_size (host constant)."""
  if causal_block_size < 1:
    raise ValueError(f"causal_block_size must be >= 1, got {causal_block_size}")
  if num_frames % causal_block_size:
    raise ValueError(
      f"block-causal attention needs the number of latent frames ({num_frames}) to be divisible by "
      f"causal_block_size ({causal_block_size})"
    )
  return np.repeat(np.arange(num_frames, dtype=np.int32) // causal_block_size, tokens_per_frame)


def rope_positions(num_frames: int, rows: int, cols: int) -> np.ndarray:
  """(frame, row, col) of every token in (f, h, w) order: [F * Hp * Wp, 3] float32, restarting at 0 per window."""
  grid = np.stack(np.meshgrid(np.arange(num_frames), np.arange(rows), np.arange(cols), indexing="ij"), axis=-1)
  return grid.reshape(-1, 3).astype(np.float32)


class Attention(nn.Module):
  """Wan attention: q/k/v Dense(E -> E), RMSNorm over all heads on q and k, optional RoPE, out Dense(E -> E).

  x [B, L, E] attends to ``kv`` [B, S, E] (itself when None). ``angles`` [1, L, D/2] rotate q and k (self-attention
  only). Parameters: q, k, v, out (Dense), q_norm, k_norm (RMSNorm scale [E]).
  """

  heads: int
  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  implementation: str | None = None

  @nn.compact
  def __call__(self, x, kv=None, *, angles=None, mask=None):  # x [B, L, E], kv [B, S, E] -> [B, L, E]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = x.shape[-1]
    kv = x if kv is None else kv
    head_axes = (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_HEADS, axes.ACT_HEAD_DIM)

    def project(name, src, norm):
      y = cnn.Dense(width, (axes.EMBED, axes.HEADS), name=name, **kw)(src)  # [b, l, e]
      if norm:
        y = cnn.RMSNorm(self.eps, name=f"{name}_norm", **kw)(y)  # across all heads, as Wan does
      y = einops.rearrange(y, "b l (h d) -> b l h d", h=self.heads)  # [b, l, h, d]
      if angles is not None and name in ("q", "k"):
        y = cnn.apply_rope(y, angles)
      return nn.with_logical_constraint(y, head_axes)

    q, k, v = project("q", x, True), project("k", kv, True), project("v", kv, False)
    out = dot_product_attention(q, k, v, mask=mask, implementation=self.implementation)  # [b, l, h, d]
    out = einops.rearrange(out, "b l h d -> b l (h d)")  # [b, l, e]
    return cnn.Dense(width, (axes.HEADS, axes.EMBED), name="out", **kw)(out)


class VideoBlock(nn.Module):
  """One Wan block with per-frame modulation; scanned over depth as ``(x, None) = block(x, e0, ctx, angles)``.

  Parameters: ``modulation`` [6, E] (Wan ``modulation`` / diffusers ``scale_shift_table``), self_attn, cross_norm
  (affine LayerNorm), cross_attn, ffn (MLP in_layer/out_layer).
  """

  heads: int
  ffn_dim: int
  eps: float = 1e-6
  cross_attn_norm: bool = True
  causal_block_size: int = 0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  implementation: str | None = None

  @nn.compact
  def __call__(self, x, e0, ctx, angles):  # x [B, L, E], e0 [B, F, 6, E] f32, ctx [B, T, E], angles [1, L, D/2]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = x.shape[-1]
    frames = e0.shape[1]
    n = x.shape[1] // frames  # tokens per frame (static)
    table = self.param(
      "modulation",
      nn.with_logical_partitioning(
        lambda key, shape, dtype: jax.random.normal(key, shape, dtype) / width**0.5, (None, axes.EMBED)
      ),
      (6, width),
      self.param_dtype,
    )
    mod = table.astype(jnp.float32)[None, None] + e0.astype(jnp.float32)  # [b, f, 6, e]
    sh1, sc1, g1, sh2, sc2, g2 = (mod[:, :, i] for i in range(6))  # each [b, f, e]
    mask = None
    if self.causal_block_size:
      mask = masks.BlockCausalMask(frame_block_ids(frames, n, self.causal_block_size))

    def residual(x, y, g):  # x + g * y with the sum in float32, as Wan adds gated residuals
      return (x.astype(jnp.float32) + cnn.gate(y.astype(jnp.float32), g, tokens_per_frame=n)).astype(x.dtype)

    attn_kw = dict(heads=self.heads, eps=self.eps, implementation=self.implementation, **kw)
    h = cnn.modulate(cnn.LayerNorm(self.eps, **kw)(x), sh1, sc1, tokens_per_frame=n)
    y = Attention(name="self_attn", **attn_kw)(h, angles=angles, mask=mask)
    x = residual(x, checkpoint_name(y, "self_attn_out"), g1)
    x = nn.with_logical_constraint(x, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_EMBED))

    h = (
      cnn.LayerNorm(self.eps, use_scale=True, use_bias=True, name="cross_norm", **kw)(x) if self.cross_attn_norm else x
    )
    y = Attention(name="cross_attn", **attn_kw)(h, ctx)
    x = x + checkpoint_name(y, "cross_attn_out").astype(x.dtype)

    h = cnn.modulate(cnn.LayerNorm(self.eps, **kw)(x), sh2, sc2, tokens_per_frame=n)
    y = cnn.MLP(self.ffn_dim, name="ffn", **kw)(h)
    x = residual(x, checkpoint_name(y, "ffn_out"), g2)
    return nn.with_logical_constraint(x, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_EMBED)), None


class VideoDiT(nn.Module):
  """SkyReels-V2 / Wan 2.1 DiT: latents [B, F, H, W, C] (channels last) + per-frame timesteps -> velocity.

  ``t`` is [B] (one timestep per video) or [B, F] (diffusion forcing: one per latent frame), in [0, 1000].
  ``context`` is the text encoder's states [B, T, text_dim]. ``fps`` is the fps class [B] (0 = 16 fps, 1 = other)
  and required when ``fps_embedding``. Intermediates sown under "intermediates": ``time_embedding`` [B, F, E],
  ``modulation`` [B, F, 6, E], ``tokens`` [B, L, E] (the last block's output).
  """

  width: int = 1536
  heads: int = 12
  depth: int = 30
  ffn_dim: int = 8960
  in_channels: int = 16
  out_channels: int = 16
  patch_size: tuple[int, int, int] = (1, 2, 2)
  text_dim: int = 4096
  freq_dim: int = 256
  eps: float = 1e-6
  cross_attn_norm: bool = True
  fps_embedding: bool = False
  rope_theta: float = 10000.0
  causal_block_size: int = 0  # 0 = bidirectional
  scan_layers: bool = True
  remat: str = "none"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  attention_implementation: str | None = None
  attention_tiles: Tiles | None = None  # Pallas kernel tiles (config attention.block_*); None = the backend's

  @property
  def head_dim(self) -> int:
    return self.width // self.heads

  def _check(self, x, t, context, fps):
    if self.width % self.heads:
      raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"unknown remat policy {self.remat!r}; choose one of {', '.join(REMAT_POLICIES)}")
    if x.ndim != 5 or x.shape[-1] != self.in_channels:
      raise ValueError(f"latents must be [B, F, H, W, C={self.in_channels}], got shape {tuple(x.shape)}")
    for size, p, what in zip(x.shape[1:4], self.patch_size, ("frames", "height", "width"), strict=True):
      if size % p:
        raise ValueError(f"latent {what} {size} is not divisible by the patch size {p} (patch_size={self.patch_size})")
    frames = x.shape[1] // self.patch_size[0]
    if t.ndim not in (1, 2) or t.shape[0] != x.shape[0] or (t.ndim == 2 and t.shape[1] != frames):
      raise ValueError(f"timesteps must be [B={x.shape[0]}] or [B, F={frames}] (per latent frame), got {t.shape}")
    if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[-1] != self.text_dim:
      raise ValueError(f"context must be [B={x.shape[0]}, T, text_dim={self.text_dim}], got {tuple(context.shape)}")
    if self.fps_embedding and fps is None:
      raise ValueError("this model has an fps embedding: pass fps (class per sample, 0 = 16 fps, 1 = other)")

  def __call__(self, x, t, context, fps=None):
    """See ``_forward``; the attention inside is traced with the module's kernel tiles."""
    with kernel_tiles(self.attention_tiles):
      return self._forward(x, t, context, fps)

  @nn.compact
  def _forward(self, x, t, context, fps=None):
    t = jnp.asarray(t)
    self._check(x, t, context, fps)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    f32 = dict(dtype=jnp.float32, param_dtype=self.param_dtype)
    b = x.shape[0]
    pt, ph, pw = self.patch_size
    frames, rows, cols = x.shape[1] // pt, x.shape[2] // ph, x.shape[3] // pw
    n = rows * cols

    tokens = einops.rearrange(
      x, "b (f pt) (h ph) (w pw) c -> b (f h w) (pt ph pw c)", pt=pt, ph=ph, pw=pw
    )  # [b, l, p*c]
    h = cnn.Dense(self.width, (axes.IN_FEATURES, axes.EMBED), name="patch_embed", **kw)(tokens)  # [b, l, e]
    h = nn.with_logical_constraint(h, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_EMBED))

    # Per-frame conditioning in float32 (Wan runs it under float32 autocast).
    t_frames = jnp.broadcast_to(t[:, None], (b, frames)) if t.ndim == 1 else t  # [b, f]
    temb = cnn.wan_timestep_embedding(t_frames, self.freq_dim)  # [b, f, freq]
    e = cnn.MLPEmbedder(self.width, name="time_embed", **f32)(temb)  # [b, f, e]
    e0 = cnn.AdaLNModulation(6, self.width, name="time_proj", **f32)(e)  # [b, f, 6, e]
    if self.fps_embedding:
      fps_emb = nn.Embed(
        2,
        self.width,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, axes.EMBED)),
        param_dtype=self.param_dtype,
        name="fps_embed",
      )(jnp.asarray(fps, jnp.int32).reshape(b))  # [b, e]
      p = cnn.Dense(self.width, (axes.EMBED, axes.MLP), name="fps_proj_in", **f32)(fps_emb.astype(jnp.float32))
      p = cnn.Dense(6 * self.width, (axes.MLP, axes.MODULATION), name="fps_proj_out", **f32)(nn.silu(p))  # [b, 6e]
      e0 = e0 + einops.rearrange(p, "b (k e) -> b 1 k e", k=6)  # same for every frame
    e0 = nn.with_logical_constraint(e0, (axes.ACT_BATCH, axes.ACT_FRAMES, None, axes.ACT_EMBED))
    self.sow("intermediates", "time_embedding", e)
    self.sow("intermediates", "modulation", e0)

    ctx = cnn.MLPEmbedder(self.width, activation=lambda y: nn.gelu(y, approximate=True), name="text_embed", **kw)(
      context
    )  # [b, t, e]
    ctx = nn.with_logical_constraint(ctx, (axes.ACT_BATCH, None, axes.ACT_EMBED))

    angles = cnn.rope_angles(
      jnp.asarray(rope_positions(frames, rows, cols)), cnn.wan_axes_dim(self.head_dim), self.rope_theta
    )[None]  # [1, l, d/2]

    block_kw = dict(
      heads=self.heads,
      ffn_dim=self.ffn_dim,
      eps=self.eps,
      cross_attn_norm=self.cross_attn_norm,
      causal_block_size=self.causal_block_size,
      implementation=self.attention_implementation,
      **kw,
    )
    block_cls = VideoBlock
    policy = REMAT_POLICIES[self.remat]
    if self.remat != "none":
      block_cls = nn.remat(VideoBlock, policy=policy, prevent_cse=not self.scan_layers)
    if self.scan_layers:
      stack = nn.scan(
        block_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
        length=self.depth,
        metadata_params={nn.PARTITION_NAME: axes.LAYERS},
      )
      h, _ = stack(name="blocks", **block_kw)(h, e0, ctx, angles)
    else:
      for i in range(self.depth):
        h, _ = block_cls(name=f"blocks_{i}", **block_kw)(h, e0, ctx, angles)
    self.sow("intermediates", "tokens", h)

    head_table = self.param(
      "head_modulation",
      nn.with_logical_partitioning(
        lambda key, shape, dtype: jax.random.normal(key, shape, dtype) / self.width**0.5, (None, axes.EMBED)
      ),
      (2, self.width),
      self.param_dtype,
    )
    shift = head_table[0].astype(jnp.float32) + e  # [b, f, e]
    scale = head_table[1].astype(jnp.float32) + e
    h = cnn.modulate(cnn.LayerNorm(self.eps, **kw)(h), shift, scale, tokens_per_frame=n)
    out = cnn.Dense(pt * ph * pw * self.out_channels, (axes.EMBED, axes.OUT_FEATURES), name="head", **kw)(h)
    return einops.rearrange(
      out, "b (f h w) (pt ph pw c) -> b (f pt) (h ph) (w pw) c", f=frames, h=rows, w=cols, pt=pt, ph=ph, pw=pw
    )  # [b, f*pt, h*ph, w*pw, c_out]


def from_config(
  model: ml_collections.ConfigDict,
  *,
  dtype: Any = None,
  param_dtype: Any = None,
  attention: ml_collections.ConfigDict | None = None,
  **overrides,
):
  """A VideoDiT from the ``model`` section of ``configs/video.py`` (dtype names as strings or jnp dtypes); with the
  config's ``attention`` section, its implementation and kernel tiles too."""
  fields = dict(
    width=model.width,
    heads=model.heads,
    depth=model.depth,
    ffn_dim=model.ffn_dim,
    in_channels=model.in_channels,
    out_channels=model.out_channels,
    patch_size=tuple(model.patch_size),
    text_dim=model.text_dim,
    freq_dim=model.freq_dim,
    eps=model.eps,
    cross_attn_norm=model.cross_attn_norm,
    fps_embedding=model.fps_embedding,
    rope_theta=model.rope_theta,
    causal_block_size=model.causal_block_size,
    scan_layers=model.scan_layers,
    remat=model.remat,
  )
  if dtype is not None:
    fields["dtype"] = jnp.dtype(dtype)
  if param_dtype is not None:
    fields["param_dtype"] = jnp.dtype(param_dtype)
  if attention is not None:
    fields.update(attention_implementation=attention.implementation, attention_tiles=config_tiles(attention))
  fields.update(overrides)
  return VideoDiT(**fields)


def fps_class(fps: int) -> int:
  """SkyReels' fps embedding index: 16 fps -> 0, anything else -> 1."""
  return 0 if int(fps) == 16 else 1
