"""Rectified flow: noising, velocity target, loss, training timesteps and the Flux sampling schedule.

Legend: ``...`` any shape of data (e.g. [B, N, C] tokens); t broadcasts against it (a [B] or [B, K] time padded
with trailing axes by the caller, or already expanded per token).

Convention (Flux, SD3): t = 1 is pure noise, t = 0 is data.

* noising ``x_t = (1 - t) x0 + t eps``;
* velocity target ``v = d x_t / dt = eps - x0``, so a sampler steps ``x <- x + (t_next - t) v``;
* loss: mean squared error of the predicted velocity, optionally weighted (padding, clean memory keyframes at t = 0);
* training timesteps: ``uniform`` on [0, 1] or ``logit_normal`` (``sigmoid(N(mean, std))``, SD3), optionally shifted;
* sampling schedule: ``linspace(1, 0, steps + 1)`` shifted by ``t' = e^mu / (e^mu + (1/t - 1)^sigma)`` with ``mu``
  linear in the image token count through (256, base_shift) and (4096, max_shift) (BFL ``get_schedule``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

TIMESTEP_SAMPLERS = ("uniform", "logit_normal")


def add_noise(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """``x_t = (1 - t) x0 + t noise`` with t broadcast against x0 (t = 0: data, t = 1: noise)."""
  t = jnp.asarray(t, jnp.float32)
  return ((1.0 - t) * x0.astype(jnp.float32) + t * noise.astype(jnp.float32)).astype(x0.dtype)


def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
  """The rectified-flow regression target ``noise - x0`` (independent of t)."""
  return noise.astype(jnp.float32) - x0.astype(jnp.float32)


def flow_loss(
  pred: jax.Array,  # [...] predicted velocity
  x0: jax.Array,  # [...]
  noise: jax.Array,  # [...]
  weight: jax.Array | None = None,  # broadcastable to pred: 0 drops a token (padding, clean memory), 1 keeps it
) -> jax.Array:  # scalar float32
  """Weighted mean over elements of ``(pred - (noise - x0))^2``, in float32; an all-zero weight gives 0."""
  err = jnp.square(pred.astype(jnp.float32) - velocity_target(x0, noise))
  if weight is None:
    return jnp.mean(err)
  w = jnp.broadcast_to(jnp.asarray(weight, jnp.float32), err.shape)
  return jnp.sum(w * err) / jnp.maximum(jnp.sum(w), 1.0)


def time_shift(mu: float | jax.Array, sigma: float, t: jax.Array) -> jax.Array:
  """BFL ``time_shift``: ``e^mu / (e^mu + (1/t - 1)^sigma)``; t = 0 stays 0 and t = 1 stays 1."""
  t = jnp.asarray(t, jnp.float32)
  safe = jnp.where(t > 0, t, 1.0)
  shifted = jnp.exp(mu) / (jnp.exp(mu) + (1.0 / safe - 1.0) ** sigma)
  return jnp.where(t > 0, shifted, 0.0)


def flux_mu(image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15) -> float:
  """The shift ``mu`` linear in the image token count through (256, base_shift) and (4096, max_shift)."""
  slope = (max_shift - base_shift) / (4096 - 256)
  return slope * image_seq_len + (base_shift - slope * 256)


def flux_sigmas(
  num_steps: int, image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15, *, shift: bool = True
) -> np.ndarray:  # [num_steps + 1] float64, from 1 down to 0
  """The Flux sampling schedule: ``linspace(1, 0, num_steps + 1)`` shifted by ``mu(image_seq_len)``.

  ``shift=False`` gives the plain linspace (flux1-schnell). Computed in float64 on the host.
  """
  if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
  if image_seq_len < 1:
    raise ValueError(f"image_seq_len must be a positive token count, got {image_seq_len!r}")
  t = np.linspace(1.0, 0.0, num_steps + 1)
  if not shift:
    return t
  mu = flux_mu(image_seq_len, base_shift, max_shift)
  out = np.zeros_like(t)
  pos = t > 0
  out[pos] = math.exp(mu) / (math.exp(mu) + (1.0 / t[pos] - 1.0))
  return out


def sample_timesteps(
  key: jax.Array,
  shape: tuple[int, ...],
  kind: str = "logit_normal",
  *,
  mean: float = 0.0,
  std: float = 1.0,
  shift_mu: float | None = None,
) -> jax.Array:  # shape, float32 in (0, 1)
  """Training timesteps: ``uniform`` or ``logit_normal`` (``sigmoid(mean + std * N(0, 1))``), then optionally
  ``time_shift(shift_mu, 1, t)`` (more weight on noisy times for large images)."""
  if kind == "uniform":
    t = jax.random.uniform(key, shape, jnp.float32)
  elif kind == "logit_normal":
    t = jax.nn.sigmoid(mean + std * jax.random.normal(key, shape, jnp.float32))
  else:
    raise ValueError(f"unknown timestep sampler {kind!r}; choose one of {TIMESTEP_SAMPLERS}")
  return t if shift_mu is None else time_shift(shift_mu, 1.0, t)


def keyframe_timesteps(
  key: jax.Array,
  num_keyframes: int,
  batch: int,
  *,
  num_memory: int | jax.Array,
  kind: str = "logit_normal",
  **sampler_kwargs,
) -> jax.Array:  # [B, K] float32
  """Per-keyframe training times: the first ``num_memory`` slots are clean memory (t = 0), the others get
  independent draws (asynchronous per-keyframe noise, as in long-context tuning)."""
  t = sample_timesteps(key, (batch, num_keyframes), kind, **sampler_kwargs)
  memory = jnp.arange(num_keyframes)[None, :] < jnp.reshape(jnp.asarray(num_memory), (-1, 1))
  return jnp.where(memory, 0.0, t)


def per_token(t: jax.Array, segment: jax.Array) -> jax.Array:  # [B, K], [B, L] -> [B, L, 1]
  """Each token's keyframe time (padding reads slot 0), with a trailing axis to broadcast over channels."""
  index = jnp.clip(jnp.asarray(segment), 0, t.shape[1] - 1)
  return jnp.take_along_axis(jnp.asarray(t), index, axis=1)[..., None]
