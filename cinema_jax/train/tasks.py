"""What is trained: a model, its training loss, its batches and its cost, one class per model family.

Legend: B batch, K keyframe slots, T caption tokens per keyframe, N image tokens per keyframe, F latent frames,
h x w latent rows x cols, C channels, E width.

A task's ``length`` is the long-context knob the training stages turn (``train.stage_lengths``): keyframes per
sample for the keyframe MM-DiT, latent frames per clip for the video DiT. Batches are dicts of arrays with the batch
on the leading axis; everything random inside the loss comes from the key the step hands in (folded with the step).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cinema_jax.diffusion import flow, forcing
from cinema_jax.models import keyframes_layout as kl
from cinema_jax.models import mmdit, video_dit


def _count(params: Any) -> int:
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


@dataclasses.dataclass
class KeyframeTask:
  """The keyframe MM-DiT under rectified flow with per-keyframe times (clean memory keyframes at t = 0).

  Batch: ``img`` [B, K*N, C_in] clean latent tokens, ``txt`` [B, K*T, C_txt], ``y`` [B, K, C_vec] pooled captions,
  ``num_keyframes`` [B] (slots used, the rest padding) and ``num_memory`` [B] (leading slots kept clean).
  """

  config: Any

  def __post_init__(self):
    self.model = mmdit.MMDiT.from_config(self.config)
    c = self.config
    self.caption_tokens = c.text.caption_tokens
    self.frame_shape = (c.frame.height, c.frame.width)
    self.image_tokens = c.frame.height * c.frame.width

  def tokens_per_sample(self, length: int) -> int:
    return length * (self.caption_tokens + self.image_tokens)

  def num_layers(self) -> int:
    return self.config.model.depth + self.config.model.depth_single_blocks

  def width(self) -> int:
    return self.config.model.hidden_size

  def example_batch(self, length: int, batch: int) -> dict:
    m = self.config.model
    return {
      "img": np.zeros((batch, length * self.image_tokens, m.in_channels), np.float32),
      "txt": np.zeros((batch, length * self.caption_tokens, m.context_in_dim), np.float32),
      "y": np.zeros((batch, length, m.vec_in_dim), np.float32),
      "num_keyframes": np.ones((batch,), np.int32),
      "num_memory": np.zeros((batch,), np.int32),
    }

  def synthetic_sample(self, rng: np.random.Generator, length: int) -> dict:
    """A sample of random latents and text states: 1..K keyframes, 0..k-1 of them clean memory."""
    m = self.config.model
    k = int(rng.integers(1, length + 1))
    sample = self.example_batch(length, 1)
    sample = {name: value[0] for name, value in sample.items()}
    # Keyframes of one sample share a latent "look" (a per-sample mean) so that memory carries information.
    look = rng.normal(size=(1, m.in_channels)).astype(np.float32)
    sample["img"][: k * self.image_tokens] = look + 0.5 * rng.normal(size=(k * self.image_tokens, m.in_channels))
    sample["txt"][: k * self.caption_tokens] = rng.normal(size=(k * self.caption_tokens, m.context_in_dim))
    sample["y"][:k] = rng.normal(size=(k, m.vec_in_dim))
    sample["num_keyframes"] = np.int32(k)
    sample["num_memory"] = np.int32(rng.integers(0, k))
    return sample

  def synthetic_record(self, seed: int, stage: int, index: int, length: int) -> dict:
    """Record ``index`` of a stage of the synthetic source, a pure function of its arguments."""
    return self.synthetic_sample(np.random.default_rng([seed, stage, index]), length)

  def _layout(self, num_keyframes: jax.Array, length: int):
    slot_txt = jnp.repeat(jnp.arange(length), self.caption_tokens)  # [k*t]
    slot_img = jnp.repeat(jnp.arange(length), self.image_tokens)  # [k*n]
    used = num_keyframes[:, None]
    txt_segment = jnp.where(slot_txt[None] < used, slot_txt[None], -1).astype(jnp.int32)  # [b, k*t]
    img_segment = jnp.where(slot_img[None] < used, slot_img[None], -1).astype(jnp.int32)  # [b, k*n]
    return kl.KeyframeLayout(txt_segment, img_segment, self.caption_tokens, self.image_tokens)

  def loss(self, params: Any, batch: dict, key: jax.Array) -> tuple[jax.Array, dict]:
    c = self.config
    img = batch["img"]
    b, length = img.shape[0], batch["y"].shape[1]
    layout = self._layout(batch["num_keyframes"], length)
    _, txt_ids, img_ids = kl.interleaved_layout(
      [1], max_keyframes=length, caption_tokens=self.caption_tokens, frame_shape=self.frame_shape
    )
    k_t, k_noise = jax.random.split(key)
    t = flow.keyframe_timesteps(
      k_t, length, b, num_memory=batch["num_memory"], kind=c.train.timestep_sampling,
      mean=c.train.logit_mean, std=c.train.logit_std,
    )  # fmt: skip
    noise = jax.random.normal(k_noise, img.shape, jnp.float32)
    t_token = flow.per_token(t, layout.img_segment)  # [b, k*n, 1]
    x_t = flow.add_noise(img, noise, t_token)
    guidance = jnp.full((b,), c.sampling.guidance, jnp.float32) if c.model.guidance_embed else None
    pred = self.model.apply(
      {"params": params}, x_t, batch["txt"], batch["y"], t, img_ids[0], txt_ids[0], guidance, layout=layout
    )
    # Padding and clean memory keyframes carry no loss.
    weight = ((layout.img_segment >= 0)[..., None] & (t_token > 0)).astype(jnp.float32)
    return flow.flow_loss(pred, img, noise, weight), {}

  def init(self, key: jax.Array, batch: dict) -> Any:
    length = batch["y"].shape[1]
    layout = self._layout(jnp.asarray(batch["num_keyframes"]), length)
    _, txt_ids, img_ids = kl.interleaved_layout(
      [1], max_keyframes=length, caption_tokens=self.caption_tokens, frame_shape=self.frame_shape
    )
    b = batch["img"].shape[0]
    t = jnp.zeros((b, length), jnp.float32)
    guidance = jnp.ones((b,), jnp.float32) if self.config.model.guidance_embed else None
    return self.model.init(
      key, batch["img"], batch["txt"], batch["y"], t, img_ids[0], txt_ids[0], guidance, layout=layout
    )


@dataclasses.dataclass
class VideoTask:
  """The diffusion-forcing video DiT: per-frame noise levels, velocity target, per-frame mean squared error.

  Batch: ``latents`` [B, F, h, w, C] clean latents, ``context`` [B, T, C_txt] text states.
  """

  config: Any

  def __post_init__(self):
    c = self.config
    self.model = video_dit.from_config(
      c.model, dtype=c.dtype, param_dtype=c.param_dtype, attention_implementation=c.attention.implementation
    )
    self.latent_shape = (c.sampling.latent_height, c.sampling.latent_width)
    self.text_len = c.sampling.text_len

  def tokens_per_sample(self, length: int) -> int:
    pt, ph, pw = self.config.model.patch_size
    h, w = self.latent_shape
    return (length // pt) * (h // ph) * (w // pw)

  def num_layers(self) -> int:
    return self.config.model.depth

  def width(self) -> int:
    return self.config.model.width

  def example_batch(self, length: int, batch: int) -> dict:
    m = self.config.model
    h, w = self.latent_shape
    return {
      "latents": np.zeros((batch, length, h, w, m.in_channels), np.float32),
      "context": np.zeros((batch, self.text_len, m.text_dim), np.float32),
    }

  def synthetic_sample(self, rng: np.random.Generator, length: int) -> dict:
    """A clip whose frames drift smoothly from a random start (temporal structure the model can learn)."""
    m = self.config.model
    h, w = self.latent_shape
    start = rng.normal(size=(h, w, m.in_channels))
    drift = 0.1 * rng.normal(size=(h, w, m.in_channels))
    frames = start[None] + np.arange(length)[:, None, None, None] * drift[None]
    return {
      "latents": frames.astype(np.float32),
      "context": rng.normal(size=(self.text_len, m.text_dim)).astype(np.float32),
    }

  def synthetic_record(self, seed: int, stage: int, index: int, length: int) -> dict:
    """Record ``index`` of a stage of the synthetic source, a pure function of its arguments."""
    return self.synthetic_sample(np.random.default_rng([seed, stage, index]), length)

  def _fps(self, b: int):
    return (
      jnp.full((b,), video_dit.fps_class(self.config.sampling.fps), jnp.int32)
      if self.config.model.fps_embedding
      else None
    )

  def loss(self, params: Any, batch: dict, key: jax.Array) -> tuple[jax.Array, dict]:
    t = self.config.training
    x0 = batch["latents"]
    b, f = x0.shape[:2]
    k_levels, k_noise = jax.random.split(key)
    levels = forcing.sample_noise_levels(
      k_levels, b, f, mode=t.noise_mode, causal_block_size=t.causal_block_size, num_levels=t.num_levels,
      spread=t.spread,
    )  # fmt: skip
    sigmas = forcing.levels_to_sigmas(levels, t.num_levels, t.shift)
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
    noisy, timesteps, target = forcing.flow_matching_inputs(x0, noise, sigmas, t.num_prefix_frames)
    pred = self.model.apply({"params": params}, noisy, timesteps, batch["context"], self._fps(b))
    loss, _ = forcing.flow_matching_loss(
      pred, target, num_prefix_frames=t.num_prefix_frames, exclude_prefix=t.exclude_prefix
    )
    return loss, {}

  def init(self, key: jax.Array, batch: dict) -> Any:
    b, f = batch["latents"].shape[:2]
    return self.model.init(key, batch["latents"], jnp.zeros((b, f), jnp.float32), batch["context"], self._fps(b))


TASKS = {"keyframes": KeyframeTask, "video": VideoTask}


def make_task(config) -> KeyframeTask | VideoTask:
  """The task named by ``config.train.task``."""
  name = config.train.task
  if name not in TASKS:
    raise KeyError(f"unknown training task {name!r}; choose one of {', '.join(TASKS)}")
  return TASKS[name](config)


def flops_per_token(task, params: Any, length: int) -> float:
  """Training FLOPs per token: 6 x parameters (forward + backward matmuls) + 12 x layers x E x context (attention
  scores and values, forward + backward; the usual estimate, counting masked-out pairs as a dense kernel would)."""
  return 6.0 * _count(params) + 12.0 * task.num_layers() * task.width() * task.tokens_per_sample(length)


def num_params(params: Any) -> int:
  return _count(params)
