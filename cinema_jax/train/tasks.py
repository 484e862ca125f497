"""What is trained: a model, its training loss, its batches and its cost, one class per model family.

Legend: B batch, K keyframe slots, T caption tokens per keyframe, N image tokens per keyframe, F latent frames,
h x w latent rows x cols, C channels, E width.

A task's ``length`` is the long-context knob the training stages turn (``train.stage_lengths``): keyframes per
sample for the keyframe MM-DiT, latent frames per clip for the video DiT. Batches are dicts of arrays with the batch
on the leading axis; everything random inside the loss comes from the key the step hands in (folded with the step).

Text comes in one of two forms. Precomputed text states (``txt``/``y`` or ``context``: what frozen T5 / CLIP / umT5
encoders give, read from shards or made up by the synthetic source), or, when the config enables
``text.encoder``, caption token ids (``caption_ids`` + ``caption_mask``) that a small ``TextEncoder`` trained
jointly with the denoiser turns into states; the parameters are then ``{"denoiser": ..., "text": ...}``.
``train.caption_dropout`` zeroes a caption's states and pooled vector with that probability, the unconditional
input of classifier-free guidance at sampling time.
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
from cinema_jax.models.text import TextEncoder


def _count(params: Any) -> int:
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def uses_text_encoder(config) -> bool:
  """Whether ``config`` trains a small text encoder jointly (``text.encoder.enabled``)."""
  text = config.get("text")
  return bool(text is not None and "encoder" in text and text.encoder.enabled)


def text_encoder(config, *, states_dim: int, pooled_dim: int) -> TextEncoder | None:
  return (
    TextEncoder.from_config(config.text, states_dim=states_dim, pooled_dim=pooled_dim) if uses_text_encoder(config)
    else None
  )  # fmt: skip


def _random_caption_ids(rng: np.random.Generator, shape: tuple[int, ...], vocab: int) -> tuple[np.ndarray, np.ndarray]:
  """Seeded stand-in captions: BOS, 1..T-2 random content ids, EOS, padding (the tokenizers' layout)."""
  *lead, t = shape
  ids = np.zeros(shape, np.int32)
  flat = ids.reshape(-1, t)
  for row in flat:
    n = int(rng.integers(1, t - 1))
    row[: n + 2] = [1, *rng.integers(3, vocab, size=n), 2]
  return ids, ids != 0


def _dropout(key: jax.Array, rate: float, shape: tuple[int, ...]) -> jax.Array:
  """1.0 where a caption is kept, 0.0 where it is dropped (the unconditional input of CFG)."""
  if rate <= 0:
    return jnp.ones(shape, jnp.float32)
  return (jax.random.uniform(key, shape) >= rate).astype(jnp.float32)


@dataclasses.dataclass
class KeyframeTask:
  """The keyframe MM-DiT under rectified flow with per-keyframe times (clean memory keyframes at t = 0).

  Batch: ``img`` [B, K*N, C_in] clean latent tokens, ``txt`` [B, K*T, C_txt] and ``y`` [B, K, C_vec] text states
  (or, with ``text.encoder``, ``caption_ids`` / ``caption_mask`` [B, K, T]), ``num_keyframes`` [B] (slots used, the
  rest padding) and ``num_memory`` [B] (leading slots kept clean).
  """

  config: Any

  def __post_init__(self):
    self.model = mmdit.MMDiT.from_config(self.config)
    c = self.config
    self.caption_tokens = c.text.caption_tokens
    self.frame_shape = (c.frame.height, c.frame.width)
    self.image_tokens = c.frame.height * c.frame.width
    self.text = text_encoder(c, states_dim=c.model.context_in_dim, pooled_dim=c.model.vec_in_dim)

  def denoiser_params(self, params: Any) -> Any:
    return params["denoiser"] if self.text is not None else params

  def encode_text(self, params: Any, batch: dict, key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(txt [B, K*T, C_txt], y [B, K, C_vec]) of a batch; captions dropped at ``train.caption_dropout`` when a key
    is given."""
    if self.text is None:
      txt, y = batch["txt"], batch["y"]
      b, k = y.shape[:2]
    else:
      ids, mask = batch["caption_ids"], batch["caption_mask"]  # [b, k, t]
      b, k, t = ids.shape
      states, pooled = self.text.apply({"params": params["text"]}, ids.reshape(b * k, t), mask.reshape(b * k, t))
      txt, y = states.reshape(b, k * t, -1), pooled.reshape(b, k, -1)
    if key is not None:
      keep = _dropout(key, float(self.config.train.get("caption_dropout", 0.0)), (b, k))
      txt = txt * jnp.repeat(keep, txt.shape[1] // k, axis=1)[..., None]
      y = y * keep[..., None]
    return txt, y

  def tokens_per_sample(self, length: int) -> int:
    return length * (self.caption_tokens + self.image_tokens)

  def num_layers(self) -> int:
    return self.config.model.depth + self.config.model.depth_single_blocks

  def width(self) -> int:
    return self.config.model.hidden_size

  def example_batch(self, length: int, batch: int) -> dict:
    m = self.config.model
    out = {"img": np.zeros((batch, length * self.image_tokens, m.in_channels), np.float32)}
    if self.text is None:
      out["txt"] = np.zeros((batch, length * self.caption_tokens, m.context_in_dim), np.float32)
      out["y"] = np.zeros((batch, length, m.vec_in_dim), np.float32)
    else:
      out["caption_ids"] = np.zeros((batch, length, self.caption_tokens), np.int32)
      out["caption_mask"] = np.zeros((batch, length, self.caption_tokens), bool)
    out["num_keyframes"] = np.ones((batch,), np.int32)
    out["num_memory"] = np.zeros((batch,), np.int32)
    return out

  def synthetic_sample(self, rng: np.random.Generator, length: int) -> dict:
    """A sample of random latents and text states: 1..K keyframes, 0..k-1 of them clean memory."""
    m = self.config.model
    k = int(rng.integers(1, length + 1))
    sample = self.example_batch(length, 1)
    sample = {name: value[0] for name, value in sample.items()}
    # Keyframes of one sample share a latent "look" (a per-sample mean) so that memory carries information.
    look = rng.normal(size=(1, m.in_channels)).astype(np.float32)
    sample["img"][: k * self.image_tokens] = look + 0.5 * rng.normal(size=(k * self.image_tokens, m.in_channels))
    if self.text is None:
      sample["txt"][: k * self.caption_tokens] = rng.normal(size=(k * self.caption_tokens, m.context_in_dim))
      sample["y"][:k] = rng.normal(size=(k, m.vec_in_dim))
    else:
      ids, mask = _random_caption_ids(rng, (k, self.caption_tokens), self.config.text.encoder.vocab_size)
      sample["caption_ids"][:k], sample["caption_mask"][:k] = ids, mask
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
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    txt, y = self.encode_text(params, batch, k_drop)
    b, length = img.shape[0], y.shape[1]
    layout = self._layout(batch["num_keyframes"], length)
    _, txt_ids, img_ids = kl.interleaved_layout(
      [1], max_keyframes=length, caption_tokens=self.caption_tokens, frame_shape=self.frame_shape
    )
    t = flow.keyframe_timesteps(
      k_t, length, b, num_memory=batch["num_memory"], kind=c.train.timestep_sampling,
      mean=c.train.logit_mean, std=c.train.logit_std,
    )  # fmt: skip
    noise = jax.random.normal(k_noise, img.shape, jnp.float32)
    t_token = flow.per_token(t, layout.img_segment)  # [b, k*n, 1]
    x_t = flow.add_noise(img, noise, t_token)
    guidance = jnp.full((b,), c.sampling.guidance, jnp.float32) if c.model.guidance_embed else None
    pred = self.model.apply(
      {"params": self.denoiser_params(params)}, x_t, txt, y, t, img_ids[0], txt_ids[0], guidance, layout=layout
    )
    # Padding and clean memory keyframes carry no loss.
    weight = ((layout.img_segment >= 0)[..., None] & (t_token > 0)).astype(jnp.float32)
    return flow.flow_loss(pred, img, noise, weight), {}

  def init(self, key: jax.Array, batch: dict) -> Any:
    # Without a text encoder the model takes the whole key (the parameters of earlier runs stay reproducible).
    k_model, k_text = jax.random.split(key) if self.text is not None else (key, None)
    length = batch["img"].shape[1] // self.image_tokens
    text_vars = None
    if self.text is None:
      txt, y = batch["txt"], batch["y"]
    else:
      b, k, t = batch["caption_ids"].shape
      ids = jnp.asarray(batch["caption_ids"]).reshape(b * k, t)
      text_vars = self.text.init(k_text, ids, jnp.asarray(batch["caption_mask"]).reshape(b * k, t))
      txt = jnp.zeros((b, k * t, self.config.model.context_in_dim), jnp.float32)
      y = jnp.zeros((b, k, self.config.model.vec_in_dim), jnp.float32)
    layout = self._layout(jnp.asarray(batch["num_keyframes"]), length)
    _, txt_ids, img_ids = kl.interleaved_layout(
      [1], max_keyframes=length, caption_tokens=self.caption_tokens, frame_shape=self.frame_shape
    )
    b = batch["img"].shape[0]
    t = jnp.zeros((b, length), jnp.float32)
    guidance = jnp.ones((b,), jnp.float32) if self.config.model.guidance_embed else None
    variables = self.model.init(k_model, batch["img"], txt, y, t, img_ids[0], txt_ids[0], guidance, layout=layout)
    if text_vars is None:
      return variables
    return {"params": {"denoiser": variables["params"], "text": text_vars["params"]}}


@dataclasses.dataclass
class VideoTask:
  """The diffusion-forcing video DiT: per-frame noise levels, velocity target, per-frame mean squared error.

  Batch: ``latents`` [B, F, h, w, C] clean latents, ``context`` [B, T, C_txt] text states (or, with
  ``text.encoder``, ``caption_ids`` / ``caption_mask`` [B, T]).
  """

  config: Any

  def __post_init__(self):
    c = self.config
    self.model = video_dit.from_config(
      c.model,
      dtype=c.dtype,
      param_dtype=c.param_dtype,
      attention=c.attention,
    )
    self.latent_shape = (c.sampling.latent_height, c.sampling.latent_width)
    self.text_len = c.sampling.text_len
    self.text = text_encoder(c, states_dim=c.model.text_dim, pooled_dim=0)
    if self.text is not None and c.text.caption_tokens != self.text_len:
      raise ValueError(f"text.caption_tokens={c.text.caption_tokens} must equal sampling.text_len={self.text_len}")

  def denoiser_params(self, params: Any) -> Any:
    return params["denoiser"] if self.text is not None else params

  def encode_text(self, params: Any, batch: dict, key: jax.Array | None = None) -> jax.Array:
    """Context [B, T, C_txt] of a batch; captions dropped at ``train.caption_dropout`` when a key is given."""
    if self.text is None:
      context = batch["context"]
    else:
      context, _ = self.text.apply({"params": params["text"]}, batch["caption_ids"], batch["caption_mask"])
    if key is not None:
      keep = _dropout(key, float(self.config.train.get("caption_dropout", 0.0)), (context.shape[0],))
      context = context * keep[:, None, None]
    return context

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
    out = {"latents": np.zeros((batch, length, h, w, m.in_channels), np.float32)}
    if self.text is None:
      out["context"] = np.zeros((batch, self.text_len, m.text_dim), np.float32)
    else:
      out["caption_ids"] = np.zeros((batch, self.text_len), np.int32)
      out["caption_mask"] = np.zeros((batch, self.text_len), bool)
    return out

  def synthetic_sample(self, rng: np.random.Generator, length: int) -> dict:
    """A clip whose frames drift smoothly from a random start (temporal structure the model can learn)."""
    m = self.config.model
    h, w = self.latent_shape
    start = rng.normal(size=(h, w, m.in_channels))
    drift = 0.1 * rng.normal(size=(h, w, m.in_channels))
    frames = start[None] + np.arange(length)[:, None, None, None] * drift[None]
    if self.text is None:
      return {
        "latents": frames.astype(np.float32),
        "context": rng.normal(size=(self.text_len, m.text_dim)).astype(np.float32),
      }
    ids, mask = _random_caption_ids(rng, (self.text_len,), self.config.text.encoder.vocab_size)
    return {"latents": frames.astype(np.float32), "caption_ids": ids, "caption_mask": mask}

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
    k_levels, k_noise, k_drop = jax.random.split(key, 3)
    context = self.encode_text(params, batch, k_drop)
    levels = forcing.sample_noise_levels(
      k_levels, b, f, mode=t.noise_mode, causal_block_size=t.causal_block_size, num_levels=t.num_levels,
      spread=t.spread,
    )  # fmt: skip
    sigmas = forcing.levels_to_sigmas(levels, t.num_levels, t.shift)
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
    noisy, timesteps, target = forcing.flow_matching_inputs(x0, noise, sigmas, t.num_prefix_frames)
    pred = self.model.apply({"params": self.denoiser_params(params)}, noisy, timesteps, context, self._fps(b))
    loss, _ = forcing.flow_matching_loss(
      pred, target, num_prefix_frames=t.num_prefix_frames, exclude_prefix=t.exclude_prefix
    )
    return loss, {}

  def init(self, key: jax.Array, batch: dict) -> Any:
    b, f = batch["latents"].shape[:2]
    t = jnp.zeros((b, f), jnp.float32)
    if self.text is None:
      return self.model.init(key, batch["latents"], t, batch["context"], self._fps(b))
    k_model, k_text = jax.random.split(key)
    text_vars = self.text.init(k_text, jnp.asarray(batch["caption_ids"]), jnp.asarray(batch["caption_mask"]))
    context = jnp.zeros((b, self.text_len, self.config.model.text_dim), jnp.float32)
    variables = self.model.init(k_model, batch["latents"], t, context, self._fps(b))
    return {"params": {"denoiser": variables["params"], "text": text_vars["params"]}}


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
