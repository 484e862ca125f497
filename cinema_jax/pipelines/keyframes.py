"""Story keyframes: generate keyframe k+1 from its caption and GoldenMem-packed keyframes 1..k.

Legend: S memory slots, K = S + 1 keyframe slots (memory, then the keyframe being generated), T caption tokens,
N tokens of one full frame (H x W), N_mem packed memory tokens, C_p channels per token, C_txt / C_vec text widths.

One generation step builds one interleaved sample: captions ``[caption(slot_1) .. caption(slot_S), caption]`` and
images ``[memory tokens ; current tokens]``, segment id = slot, per-keyframe times (memory at t = 0, the current
keyframe at the sampler's t), and integrates the rectified flow with Euler steps on the Flux schedule. Only the current
keyframe's tokens move; memory tokens are fixed inputs. With classifier-free guidance the batch holds the sample twice,
the second copy with the current caption zeroed.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct
from tqdm import tqdm

from cinema_jax.diffusion import flow, samplers
from cinema_jax.models import goldenmem
from cinema_jax.models import keyframes_layout as kl
from cinema_jax.models.mmdit import MMDiT


@dataclasses.dataclass(frozen=True)
class CaptionEmbedding:
  """A keyframe caption after the text encoders."""

  tokens: np.ndarray  # [T, C_txt]
  pooled: np.ndarray  # [C_vec]


@struct.dataclass
class KeyframeBatch:
  """Model inputs for generating one keyframe (batch 1, or 2 with classifier-free guidance)."""

  memory_tokens: jax.Array  # [B, N_mem, C_p]
  txt: jax.Array  # [B, K T, C_txt]
  pooled: jax.Array  # [B, K, C_vec]
  img_ids: jax.Array  # [B, N_mem + N, 3]
  txt_ids: jax.Array  # [B, K T, 3]
  guidance: jax.Array | None  # [B]
  layout: kl.KeyframeLayout
  cfg: bool = struct.field(pytree_node=False, default=False)


@dataclasses.dataclass(frozen=True)
class Prepared:
  """A prepared generation: the jitted sampler's arguments and what the host needs to decode its result."""

  batch: KeyframeBatch
  memory: goldenmem.PackedMemory
  num_tokens: int  # N
  sigmas: np.ndarray  # [steps + 1]


def _sample(module: MMDiT, variables, batch: KeyframeBatch, noise: jax.Array, sigmas: jax.Array, cfg_scale):
  """Euler integration of the current keyframe's tokens [1, N, C_p] from noise to data."""
  n_mem = batch.memory_tokens.shape[1]
  slots = batch.pooled.shape[1]

  def velocity(x, t):  # x [b, n, c_p]
    img = jnp.concatenate([batch.memory_tokens.astype(x.dtype), x], axis=1)  # [b, n_mem + n, c_p]
    times = jnp.zeros((x.shape[0], slots), jnp.float32).at[:, -1].set(t)  # memory clean, current at t
    v = module.apply(
      variables, img, batch.txt, batch.pooled, times, batch.img_ids, batch.txt_ids, batch.guidance, layout=batch.layout
    )
    return v[:, n_mem:]

  fn = samplers.with_cfg(velocity, cfg_scale) if batch.cfg else velocity
  return samplers.euler_sample(fn, noise, sigmas)


class KeyframePipeline:
  """Generates story keyframes one after another with a keyframe MM-DiT and GoldenMem memory."""

  def __init__(self, module: MMDiT, variables: Any, config: ml_collections.ConfigDict):
    self.module = module
    self.variables = variables
    self.config = config
    self.sampler = jax.jit(functools.partial(_sample, module))

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, variables: Any = None, *, seed: int = 0):
    """A pipeline for ``config`` (configs/keyframes.py); random parameters when ``variables`` is None."""
    module = MMDiT.from_config(config)
    if variables is None:
      variables = init_variables(module, config, seed=seed)
    return cls(module, variables, config)

  @property
  def frame_shape(self) -> tuple[int, int]:
    return self.config.frame.height, self.config.frame.width

  def prepare(
    self,
    history: Sequence[np.ndarray],
    history_captions: Sequence[CaptionEmbedding],
    caption: CaptionEmbedding,
    *,
    goldenmem_enabled: bool | None = None,
    max_memory: int | None = None,
  ) -> Prepared:
    """Packs keyframes 1..k (channels-last latents) and captions into the sampler's inputs for keyframe k+1."""
    if len(history) != len(history_captions):
      raise ValueError(f"{len(history)} history keyframes but {len(history_captions)} history captions")
    g, lat = self.config.goldenmem, self.config.latent
    enabled = g.enabled if goldenmem_enabled is None else goldenmem_enabled
    n = len(history)
    memory = goldenmem.pack_memory(
      list(history),
      patch=lat.patch,
      # Without GoldenMem every earlier keyframe stays, at full size: the baseline whose cost grows with k.
      max_memory=(g.max_memory if max_memory is None else max_memory) if enabled else n,
      pyramid=enabled and g.get("pyramid", True),
      selection=g.selection,
      caption_embeddings=np.stack([c.pooled for c in history_captions]) if n else None,
      query_embedding=caption.pooled,
      keep_latest=g.keep_latest,
      frame_position=g.frame_position,
    )
    if n and memory.frame_shape != self.frame_shape:
      raise ValueError(
        f"history latents have {memory.frame_shape} tokens per frame, the config says {self.frame_shape}"
      )
    height, width = self.frame_shape
    num_tokens = height * width
    slots = memory.num_slots
    caps = [history_captions[j] for j in memory.history_index] + [caption]
    t_len = caption.tokens.shape[0]
    if any(c.tokens.shape[0] != t_len for c in caps):
      raise ValueError(f"every caption must have the same number of tokens; got {[c.tokens.shape[0] for c in caps]}")

    current_frame = slots if g.frame_position == "slot" else n
    txt_ids = np.concatenate(
      [
        kl.caption_positions(t_len, frame=(s if g.frame_position == "slot" else j))
        for s, j in enumerate(memory.history_index)
      ]
      + [kl.caption_positions(t_len, frame=current_frame)]
    )
    img_ids = np.concatenate([memory.positions, kl.frame_positions(height, width, frame=current_frame)])
    txt_segment = np.repeat(np.arange(slots + 1, dtype=np.int32), t_len)
    img_segment = np.concatenate([memory.slot, np.full(num_tokens, slots, np.int32)])
    uniform = all(hw == (height, width) for hw in memory.shapes)
    txt = np.concatenate([c.tokens for c in caps]).astype(np.float32)  # [k t, c_txt]
    pooled = np.stack([c.pooled for c in caps]).astype(np.float32)  # [k, c_vec]
    rows = [(txt, pooled)]
    cfg = self.config.sampling.cfg_scale != 1.0
    if cfg:  # unconditional copy: the current caption zeroed, memory captions kept
      txt_u, pooled_u = txt.copy(), pooled.copy()
      txt_u[slots * t_len :] = 0.0
      pooled_u[-1] = 0.0
      rows.append((txt_u, pooled_u))
    b = len(rows)
    guidance = np.full((b,), self.config.sampling.guidance, np.float32) if self.module.guidance_embed else None
    layout = kl.KeyframeLayout(
      np.broadcast_to(txt_segment, (b, txt_segment.size)).copy(),
      np.broadcast_to(img_segment, (b, img_segment.size)).copy(),
      txt_tokens_per_keyframe=t_len,
      img_tokens_per_keyframe=num_tokens if uniform else None,
    )
    mem_tokens = memory.tokens.reshape(memory.num_tokens, self.module.in_channels)  # [n_mem, c_p], also when empty
    batch = KeyframeBatch(
      memory_tokens=np.broadcast_to(mem_tokens[None], (b,) + mem_tokens.shape).astype(np.float32),
      txt=np.stack([r[0] for r in rows]),
      pooled=np.stack([r[1] for r in rows]),
      img_ids=np.broadcast_to(img_ids[None], (b,) + img_ids.shape).copy(),
      txt_ids=np.broadcast_to(txt_ids[None], (b,) + txt_ids.shape).copy(),
      guidance=guidance,
      layout=layout,
      cfg=cfg,
    )
    s = self.config.sampling
    sigmas = flow.flux_sigmas(s.num_steps, num_tokens, s.base_shift, s.max_shift, shift=s.shift)
    return Prepared(batch=batch, memory=memory, num_tokens=num_tokens, sigmas=sigmas)

  def noise(self, seed: int, channels: int) -> jax.Array:  # [1, N, C_p]
    height, width = self.frame_shape
    return jax.random.normal(jax.random.key(seed), (1, height * width, channels), jnp.float32)

  def sampler_args(self, prepared: Prepared, seed: int) -> tuple:
    """The jitted sampler's positional arguments (for timing and compiled-memory measurements)."""
    channels = self.module.in_channels
    return (
      self.variables,
      prepared.batch,
      self.noise(seed, channels),
      jnp.asarray(prepared.sigmas, jnp.float32),
      jnp.float32(self.config.sampling.cfg_scale),
    )

  def generate_next(
    self,
    history: Sequence[np.ndarray],
    history_captions: Sequence[CaptionEmbedding],
    caption: CaptionEmbedding,
    *,
    seed: int = 0,
    goldenmem_enabled: bool | None = None,
  ) -> np.ndarray:  # [H p, W p, C] latent of keyframe k+1
    """Keyframe k+1 given keyframes 1..k (latents) and the captions of all k+1."""
    prepared = self.prepare(history, history_captions, caption, goldenmem_enabled=goldenmem_enabled)
    tokens = self.sampler(*self.sampler_args(prepared, seed))  # [1, n, c_p]
    height, width = self.frame_shape
    return goldenmem.unpatchify(np.asarray(tokens[0]), height, width, self.config.latent.patch)

  def generate_story(self, captions: Sequence[CaptionEmbedding], *, seed: int = 0) -> list[np.ndarray]:
    """One keyframe per caption, each conditioned on all earlier ones through GoldenMem."""
    keyframes: list[np.ndarray] = []
    for k in tqdm(range(len(captions)), desc="keyframes", leave=False):
      keyframes.append(self.generate_next(keyframes, captions[:k], captions[k], seed=seed + k))
    return keyframes


def init_variables(module: MMDiT, config: ml_collections.ConfigDict, *, seed: int = 0) -> Any:
  """Random parameters (unboxed) for ``module`` at the config's shapes (one keyframe, one caption)."""
  height, width = config.frame.height, config.frame.width
  t_len = config.text.caption_tokens
  img = np.zeros((1, height * width, module.in_channels), np.float32)
  txt = np.zeros((1, t_len, module.context_in_dim), np.float32)
  y = np.zeros((1, module.vec_in_dim), np.float32)
  img_ids = kl.frame_positions(height, width, frame=0)
  txt_ids = kl.caption_positions(t_len, frame=0)
  guidance = np.ones((1,), np.float32) if module.guidance_embed else None
  init = jax.jit(lambda key: module.init(key, img, txt, y, np.zeros((1,), np.float32), img_ids, txt_ids, guidance))
  return nn.meta.unbox(init(jax.random.key(seed)))
