"""Keyframe MM-DiT: the Flux transformer, with interleaved keyframes, per-keyframe timesteps and hybrid masks.

Legend: B batch, K keyframe slots, T text tokens, N image tokens, L = T + N, E width (``hidden_size``), H heads,
D head dim (E / H), M MLP width (E * mlp_ratio), P RoPE pairs (D / 2), C_in / C_out latent channels per token,
C_txt text-encoder width, C_vec pooled-text width, S stacked layers.

Architecture (BFL Flux, exactly): ``img_in`` / ``txt_in`` project the two streams to E; ``vec = time_in(temb(t)) +
guidance_in(temb(g)) + vector_in(pooled)`` conditions every block through AdaLN; ``depth`` double-stream blocks (one
set of weights per stream, joint attention over ``cat(txt, img)``), then ``depth_single_blocks`` single-stream blocks
on the joint sequence (``linear1`` = [qkv | mlp], ``linear2`` on ``cat(attn, gelu(mlp))``); QK RMSNorm per head, then
3-axis RoPE on adjacent pairs; ``final_layer`` = AdaLN(shift, scale) + Linear on the image tokens.

Parameter names are BFL's: ``double_blocks/img_attn/qkv/kernel`` is ``double_blocks.{i}.img_attn.qkv.weight``
transposed, with the block index as the leading (LAYERS) axis of a stacked array; MLP layers are ``in_layer`` /
``out_layer`` (BFL ``0`` / ``2``) and the final ``adaLN_modulation/lin`` is BFL ``adaLN_modulation.1``
(``cinema_jax.convert.flux`` holds the table).

Keyframes: with a ``KeyframeLayout`` (segment ids of both streams) the blocks attend under hybrid masks: the first
``num_local_blocks`` blocks (double first, then single) within a keyframe's segment (caption_k with image_k), the
others globally (``global_mask``: "full", or "block_causal" over keyframe slots). Timesteps may be per sample [B]
(plain Flux, the diffusers-equivalent path) or per keyframe [B, K] (clean memory keyframes at t = 0 beside the one
being generated): vec is then [B, K, E] and every AdaLN chunk reaches each token through its keyframe slot.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.ad_checkpoint import checkpoint_name

from cinema_jax import nn as cnn
from cinema_jax.attention import Tiles, config_tiles, dot_product_attention, kernel_tiles
from cinema_jax.models import keyframes_layout as kl
from cinema_jax.parallel import axes

# Named rematerialisation policies for the scanned blocks. The tags ("query", "key", "value", "attention",
# "mlp_hidden") are set with checkpoint_name inside the blocks.
REMAT_POLICIES: dict[str, Any] = {
  "none": None,  # no remat: keep every activation (fastest, most memory)
  "full": jax.checkpoint_policies.nothing_saveable,  # keep only block inputs, recompute the block in backward
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs, recompute elementwise
  "attention": jax.checkpoint_policies.save_only_these_names("attention"),  # keep attention outputs only
  "qkv_attention": jax.checkpoint_policies.save_only_these_names("query", "key", "value", "attention"),
}
TIME_DIM = 256  # sinusoidal timestep features (BFL ``timestep_embedding(t, 256)``)
_ACT = (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_EMBED)
_ACT_HEADS = (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_HEADS, axes.ACT_HEAD_DIM)


@dataclasses.dataclass(frozen=True)
class _Modulation:
  """AdaLN chunks of one stream and how they reach its tokens.

  ``mods`` is [B, k, E] (per sample) or [B, K, k, E] (per keyframe). Per keyframe, a stream whose slots all hold
  ``tokens_per_frame`` tokens uses ``modulate``'s per-frame layout; otherwise each token gathers its slot's vector
  through ``index`` [B, L] (XLA fuses the gather into the elementwise consumer).
  """

  mods: jax.Array
  index: jax.Array | None
  tokens_per_frame: int | None

  def chunk(self, i: int) -> tuple[jax.Array, int | None]:
    if self.mods.ndim == 3:
      return self.mods[:, i], None  # [b, e]
    c = self.mods[:, :, i]  # [b, k, e]
    if self.tokens_per_frame is not None:
      return c, self.tokens_per_frame
    return c[jnp.arange(c.shape[0])[:, None], self.index], None  # [b, l, e]

  def modulate(self, x: jax.Array, shift: int, scale: int) -> jax.Array:
    (sh, n), (sc, _) = self.chunk(shift), self.chunk(scale)
    return cnn.modulate(x, sh, sc, tokens_per_frame=n)

  def gate(self, x: jax.Array, g: int) -> jax.Array:
    gv, n = self.chunk(g)
    return cnn.gate(x, gv, tokens_per_frame=n)


class QKNorm(nn.Module):
  """BFL ``QKNorm``: RMSNorm of q and k per head ([B, L, H, D], scale [D]), cast to the value dtype."""

  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    return cnn.RMSNorm(name="query_norm", **kw)(q), cnn.RMSNorm(name="key_norm", **kw)(k)


class SelfAttention(nn.Module):
  """BFL ``SelfAttention`` of one stream: ``qkv`` [E -> 3E], ``norm`` (QKNorm), ``proj`` [E -> E].

  Two methods because a double-stream block uses the projections around a joint attention of both streams.
  """

  hidden_size: int
  num_heads: int
  qkv_bias: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.qkv = cnn.Dense(3 * self.hidden_size, (axes.EMBED, axes.QKV), use_bias=self.qkv_bias, **kw)
    self.norm = QKNorm(**kw)
    self.proj = cnn.Dense(self.hidden_size, (axes.QKV, axes.EMBED), **kw)

  def heads(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:  # [B, L, E] -> 3 x [B, L, H, D]
    q, k, v = split_heads(self.qkv(x), self.num_heads)
    q, k = self.norm(q, k)
    return q, k, v

  def project(self, x: jax.Array) -> jax.Array:  # [B, L, H*D] -> [B, L, E]
    return self.proj(x)


def split_heads(qkv: jax.Array, num_heads: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """[B, L, 3*H*D] in BFL's "(K H D)" column order -> q, k, v [B, L, H, D]."""
  q, k, v = einops.rearrange(qkv, "b l (k h d) -> k b l h d", k=3, h=num_heads)  # 3 x [b, l, h, d]
  return tuple(nn.with_logical_constraint(t, _ACT_HEADS) for t in (q, k, v))


def _attend(q, k, v, ctx: dict, is_local: jax.Array, *, mask_kind: str, global_kind: str, implementation):
  """RoPE, then masked joint attention: [B, L, H, D] x 3 -> [B, L, H*D]."""
  q = checkpoint_name(cnn.apply_rope(q, ctx["angles"]), "query")
  k = checkpoint_name(cnn.apply_rope(k, ctx["angles"]), "key")
  v = checkpoint_name(v, "value")

  def attend(mask_fn):
    mask = None if mask_fn is None else mask_fn(ctx["segment"])
    return dot_product_attention(q, k, v, mask=mask, implementation=implementation)

  local = kl.local_mask
  glob = lambda seg: kl.global_mask(seg, global_kind)
  if mask_kind == "none":
    out = attend(None)
  elif mask_kind == "local":
    out = attend(local)
  elif mask_kind == "global":
    out = attend(glob)
  else:  # per_layer: this stack mixes local and global blocks; the scanned flag picks one branch at run time
    out = jax.lax.cond(is_local, lambda: attend(local), lambda: attend(glob))
  out = checkpoint_name(out, "attention")
  return einops.rearrange(out, "b l h d -> b l (h d)")  # [b, l, h*d]


class _BlockBase(nn.Module):
  """Attributes shared by both block kinds (set by MMDiT, one value for the whole scanned stack)."""

  hidden_size: int
  num_heads: int
  mlp_ratio: float
  qkv_bias: bool = True
  mask_kind: str = "none"  # none | local | global | per_layer
  global_mask: str = "full"
  txt_tokens_per_keyframe: int | None = None
  img_tokens_per_keyframe: int | None = None
  attention_implementation: str | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def _attend(self, q, k, v, ctx, is_local):
    return _attend(
      q,
      k,
      v,
      ctx,
      is_local,
      mask_kind=self.mask_kind,
      global_kind=self.global_mask,
      implementation=self.attention_implementation,
    )


class DoubleStreamBlock(_BlockBase):
  """BFL ``DoubleStreamBlock``: (txt [B, T, E], img [B, N, E]) -> same, joint attention over cat(txt, img)."""

  @nn.compact
  def __call__(self, carry, is_local, ctx):
    txt, img = carry
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = self.hidden_size
    img_mod = _Modulation(
      cnn.AdaLNModulation(6, width, name="img_mod", **kw)(ctx["vec"]), ctx["img_index"], self.img_tokens_per_keyframe
    )
    txt_mod = _Modulation(
      cnn.AdaLNModulation(6, width, name="txt_mod", **kw)(ctx["vec"]), ctx["txt_index"], self.txt_tokens_per_keyframe
    )
    img_attn = SelfAttention(width, self.num_heads, self.qkv_bias, name="img_attn", **kw)
    txt_attn = SelfAttention(width, self.num_heads, self.qkv_bias, name="txt_attn", **kw)

    # Chunks: 0 shift, 1 scale, 2 gate of the attention branch; 3, 4, 5 of the MLP branch.
    qi, ki, vi = img_attn.heads(img_mod.modulate(cnn.LayerNorm(**kw)(img), 0, 1))
    qt, kt, vt = txt_attn.heads(txt_mod.modulate(cnn.LayerNorm(**kw)(txt), 0, 1))
    q, k, v = (jnp.concatenate(pair, axis=1) for pair in ((qt, qi), (kt, ki), (vt, vi)))  # [b, t+n, h, d]
    attn = self._attend(q, k, v, ctx, is_local)
    num_txt = txt.shape[1]
    txt_a, img_a = attn[:, :num_txt], attn[:, num_txt:]

    mlp_hidden = int(width * self.mlp_ratio)
    img = img + img_mod.gate(img_attn.project(img_a), 2)
    h = img_mod.modulate(cnn.LayerNorm(**kw)(img), 3, 4)
    img = img + img_mod.gate(cnn.MLP(mlp_hidden, name="img_mlp", **kw)(h), 5)
    txt = txt + txt_mod.gate(txt_attn.project(txt_a), 2)
    h = txt_mod.modulate(cnn.LayerNorm(**kw)(txt), 3, 4)
    txt = txt + txt_mod.gate(cnn.MLP(mlp_hidden, name="txt_mlp", **kw)(h), 5)
    return (nn.with_logical_constraint(txt, _ACT), nn.with_logical_constraint(img, _ACT)), None


class SingleStreamBlock(_BlockBase):
  """BFL ``SingleStreamBlock``: x [B, L, E] -> [B, L, E]; parallel attention and MLP from one ``linear1``."""

  @nn.compact
  def __call__(self, x, is_local, ctx):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = self.hidden_size
    mlp_hidden = int(width * self.mlp_ratio)
    mod = _Modulation(
      cnn.AdaLNModulation(3, width, name="modulation", **kw)(ctx["vec"]), ctx["joint_index"], None
    )  # chunks: 0 shift, 1 scale, 2 gate
    h = mod.modulate(cnn.LayerNorm(**kw)(x), 0, 1)
    h = cnn.Dense(3 * width + mlp_hidden, (axes.EMBED, axes.QKV), name="linear1", **kw)(h)  # [b, l, 3e + m]
    qkv, mlp = h[..., : 3 * width], h[..., 3 * width :]
    q, k, v = split_heads(qkv, self.num_heads)
    q, k = QKNorm(name="norm", **kw)(q, k)
    attn = self._attend(q, k, v, ctx, is_local)  # [b, l, e]
    mlp = checkpoint_name(nn.gelu(mlp, approximate=True), "mlp_hidden")
    out = cnn.Dense(width, (axes.QKV, axes.EMBED), name="linear2", **kw)(jnp.concatenate([attn, mlp], axis=-1))
    return nn.with_logical_constraint(x + mod.gate(out, 2), _ACT), None


class LastLayer(nn.Module):
  """BFL ``LastLayer``: LN, AdaLN (shift, scale) from vec, Linear [E -> C_out] on the image tokens."""

  out_channels: int
  tokens_per_keyframe: int | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, vec: jax.Array, index: jax.Array | None) -> jax.Array:  # [B, N, E] -> [B, N, C]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    mods = cnn.AdaLNModulation(2, x.shape[-1], name="adaLN_modulation", **kw)(vec)
    h = _Modulation(mods, index, self.tokens_per_keyframe).modulate(cnn.LayerNorm(**kw)(x), 0, 1)
    return cnn.Dense(self.out_channels, (axes.EMBED, axes.OUT_FEATURES), name="linear", **kw)(h)


def _stack(block_cls, length: int, remat_policy: str, name: str, **attrs):
  """``length`` blocks of ``block_cls`` under nn.scan (parameters stacked on a leading LAYERS axis), remat'ed."""
  if remat_policy != "none":
    block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[remat_policy], prevent_cse=False)
  scanned = nn.scan(
    block_cls,
    variable_axes={"params": 0},
    split_rngs={"params": True},
    in_axes=(0, nn.broadcast),
    length=length,
    metadata_params={nn.PARTITION_NAME: axes.LAYERS},
  )
  return scanned(name=name, **attrs)


def _mask_kind(has_layout: bool, num_local: int, length: int) -> str:
  if not has_layout:
    return "none"
  if num_local >= length:
    return "local"
  return "global" if num_local <= 0 else "per_layer"


class MMDiT(nn.Module):
  """Flux transformer over interleaved keyframes; ``__call__`` returns the velocity of the image tokens [B, N, C_out].

  Field defaults are flux1-dev (BFL ``FluxParams``); configs/keyframes.py documents each one.
  """

  in_channels: int = 64
  out_channels: int | None = None
  vec_in_dim: int = 768
  context_in_dim: int = 4096
  hidden_size: int = 3072
  mlp_ratio: float = 4.0
  num_heads: int = 24
  depth: int = 19
  depth_single_blocks: int = 38
  axes_dim: tuple[int, ...] = (16, 56, 56)
  theta: float = 10000.0
  qkv_bias: bool = True
  guidance_embed: bool = True
  num_local_blocks: int | None = None  # None = depth: local in double-stream blocks, global in single-stream ones
  global_mask: str = "full"
  remat_policy: str = "none"
  attention_implementation: str | None = None
  attention_tiles: Tiles | None = None  # Pallas kernel tiles (config attention.block_*); None = the backend's
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
    head_dim = self.hidden_size // self.num_heads
    if sum(self.axes_dim) != head_dim:
      raise ValueError(f"axes_dim={tuple(self.axes_dim)} must sum to the head dim {head_dim} (hidden / heads)")
    if self.global_mask not in kl.GLOBAL_MASKS:
      raise ValueError(f"unknown global_mask {self.global_mask!r}; choose one of {kl.GLOBAL_MASKS}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"unknown remat_policy {self.remat_policy!r}; choose one of {tuple(REMAT_POLICIES)}")
    total = self.depth + self.depth_single_blocks
    if self.num_local_blocks is not None and not 0 <= self.num_local_blocks <= total:
      raise ValueError(f"num_local_blocks={self.num_local_blocks} must lie in [0, {total}] (double + single blocks)")
    super().__post_init__()

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, **overrides) -> MMDiT:
    """From a configs/keyframes.py config (its ``model`` section, ``dtype``, ``param_dtype``, attention)."""
    fields = config.model.to_dict()
    fields["axes_dim"] = tuple(fields["axes_dim"])
    fields.setdefault("attention_implementation", config.attention.implementation)
    fields.setdefault("attention_tiles", config_tiles(config.attention))
    fields.update(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype))
    fields.update(overrides)
    return cls(**fields)

  @property
  def local_blocks(self) -> int:
    return self.depth if self.num_local_blocks is None else self.num_local_blocks

  def __call__(self, *args, **kwargs) -> jax.Array:
    """See ``_forward``; the attention inside is traced with the module's kernel tiles."""
    with kernel_tiles(self.attention_tiles):
      return self._forward(*args, **kwargs)

  @nn.compact
  def _forward(
    self,
    img: jax.Array,  # [B, N, C_in] packed latent tokens
    txt: jax.Array,  # [B, T, C_txt] text-encoder tokens
    y: jax.Array,  # [B, C_vec] pooled text, or [B, K, C_vec] per keyframe caption
    timesteps: jax.Array,  # [B] in [0, 1] (1 = noise), or [B, K] per keyframe
    img_ids: jax.Array,  # [N, 3] or [B, N, 3] (frame, row, col), float
    txt_ids: jax.Array,  # [T, 3] or [B, T, 3]
    guidance: jax.Array | None = None,  # [B] distilled guidance scale (models with guidance_embed)
    layout: kl.KeyframeLayout | None = None,
  ) -> jax.Array:  # [B, N, C_out]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = self.hidden_size
    timesteps, y = jnp.asarray(timesteps), jnp.asarray(y)
    for name, x, want in (
      ("img", img, self.in_channels),
      ("txt", txt, self.context_in_dim),
      ("y (pooled text)", y, self.vec_in_dim),
    ):
      if x.shape[-1] != want:
        raise ValueError(f"{name} has {x.shape[-1]} channels (shape {tuple(x.shape)}), the model takes {want}")
    per_keyframe = timesteps.ndim == 2 or y.ndim == 3
    if per_keyframe and layout is None:
      raise ValueError(
        f"per-keyframe timesteps {timesteps.shape} / pooled text {y.shape} need a KeyframeLayout (segment ids)"
      )
    if self.guidance_embed and guidance is None:
      raise ValueError("this model has guidance_embed=True: pass guidance [B] (e.g. 3.5 for flux1-dev)")

    # vec = time + guidance + pooled text: [b, e] per sample, [b, k, e] per keyframe.
    if per_keyframe and timesteps.ndim == 1:
      timesteps = timesteps[:, None]
    vec = cnn.MLPEmbedder(width, name="time_in", **kw)(cnn.flux_timestep_embedding(timesteps, TIME_DIM))
    if self.guidance_embed:
      g = cnn.MLPEmbedder(width, name="guidance_in", **kw)(cnn.flux_timestep_embedding(guidance, TIME_DIM))
      vec = vec + (g[:, None] if per_keyframe else g)
    yv = cnn.MLPEmbedder(width, name="vector_in", **kw)(y)
    vec = vec + (yv[:, None] if per_keyframe and y.ndim == 2 else yv)
    self.sow("intermediates", "vec", vec)

    img = cnn.Dense(width, (axes.IN_FEATURES, axes.EMBED), name="img_in", **kw)(img)  # [b, n, e]
    txt = cnn.Dense(width, (axes.IN_FEATURES, axes.EMBED), name="txt_in", **kw)(txt)  # [b, t, e]
    img = nn.with_logical_constraint(img, _ACT)
    txt = nn.with_logical_constraint(txt, _ACT)
    ctx = block_context(vec, txt_ids, img_ids, layout, self.axes_dim, self.theta)
    self.sow("intermediates", "double_blocks_in", (txt, img))

    attrs = dict(
      hidden_size=width,
      num_heads=self.num_heads,
      mlp_ratio=self.mlp_ratio,
      qkv_bias=self.qkv_bias,
      global_mask=self.global_mask,
      txt_tokens_per_keyframe=None if layout is None else layout.txt_tokens_per_keyframe,
      img_tokens_per_keyframe=None if layout is None else layout.img_tokens_per_keyframe,
      attention_implementation=self.attention_implementation,
      **kw,
    )
    num_local = self.local_blocks
    if self.depth:
      flags = jnp.arange(self.depth) < num_local
      kind = _mask_kind(layout is not None, num_local, self.depth)
      stack = _stack(DoubleStreamBlock, self.depth, self.remat_policy, "double_blocks", mask_kind=kind, **attrs)
      (txt, img), _ = stack((txt, img), flags, ctx)
    self.sow("intermediates", "double_blocks_out", (txt, img))

    if self.depth_single_blocks:
      x = jnp.concatenate([txt, img], axis=1)  # [b, t+n, e]
      local_single = num_local - self.depth
      flags = jnp.arange(self.depth_single_blocks) < local_single
      kind = _mask_kind(layout is not None, local_single, self.depth_single_blocks)
      stack = _stack(
        SingleStreamBlock, self.depth_single_blocks, self.remat_policy, "single_blocks", mask_kind=kind, **attrs
      )
      x, _ = stack(x, flags, ctx)
      img = x[:, txt.shape[1] :]
    self.sow("intermediates", "single_blocks_out", img)

    out_channels = self.out_channels or self.in_channels
    return LastLayer(out_channels, attrs["img_tokens_per_keyframe"], name="final_layer", **kw)(
      img, vec, ctx["img_index"]
    )


def block_context(
  vec: jax.Array,
  txt_ids: jax.Array,
  img_ids: jax.Array,
  layout: kl.KeyframeLayout | None,
  axes_dim: tuple[int, ...],
  theta: float,
) -> dict[str, jax.Array | None]:
  """What every block reads besides its carry: vec, RoPE angles [B|1, L, P], segment ids and keyframe indices."""
  txt_ids, img_ids = jnp.asarray(txt_ids, jnp.float32), jnp.asarray(img_ids, jnp.float32)
  if txt_ids.ndim != img_ids.ndim:  # one shared by the batch, the other per sample
    txt_ids, img_ids = (i if i.ndim == 3 else i[None] for i in (txt_ids, img_ids))
    batch = max(txt_ids.shape[0], img_ids.shape[0])
    txt_ids = jnp.broadcast_to(txt_ids, (batch,) + txt_ids.shape[1:])
    img_ids = jnp.broadcast_to(img_ids, (batch,) + img_ids.shape[1:])
  angles = cnn.rope_angles(jnp.concatenate([txt_ids, img_ids], axis=-2), axes_dim, theta)  # [(b), l, p]
  ctx: dict[str, jax.Array | None] = dict(
    vec=vec, angles=angles, segment=None, txt_index=None, img_index=None, joint_index=None
  )
  if layout is not None:
    ctx["segment"] = jnp.asarray(layout.joint_segment(), jnp.int32)  # [b, l]
    if vec.ndim == 3:  # per keyframe: each token's slot selects its AdaLN vectors
      k = vec.shape[1]
      ctx["txt_index"] = kl.token_keyframe_index(layout.txt_segment, k)
      ctx["img_index"] = kl.token_keyframe_index(layout.img_segment, k)
      ctx["joint_index"] = kl.token_keyframe_index(ctx["segment"], k)
  return ctx
