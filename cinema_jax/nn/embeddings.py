"""Sinusoidal timestep embeddings and the MLP that lifts them to the model width.

Legend: ``...`` any timestep shape ([B] per sample, [B, F] per frame, [B, L] per token); C frequency channels
(``dim``); E embed.

Precision: everything here is float32. BFL Flux and diffusers compute the embedding in float32 too, with the same op
order; they differ from this code by at most one float32 ulp of the argument (<= 6.1e-5 near 1000), because torch's
float32 exp is not correctly rounded for a few frequencies and ours are. The original Wan/SkyReels code uses float64:
against it the highest-frequency channels are off by up to ~1e-4 (measured 8e-5 over t in [0, 1000], the same for
Flux over t in [0, 1]) and the low-frequency channels by ~1e-7, far below the bf16 rounding (4e-3) that the first
Dense applies to them anyway. Note that the BFL and diffusers Flux pipelines hand the timestep over in the model
dtype, so in a bf16 run t (and t * 1000) is rounded to bf16 before the sinusoid; that quantisation belongs to the
caller (a parity test against a bf16 pipeline should use ``timestep_embedding(round_bf16(round_bf16(t) * 1000),
time_factor=1.0)``), not to this function.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cinema_jax.nn.linear import Dense
from cinema_jax.parallel.axes import EMBED, IN_FEATURES, MLP


def timestep_embedding(
  t: jax.Array,  # [...]
  dim: int,
  *,
  time_factor: float,
  max_period: float = 10000.0,
  flip_sin_to_cos: bool = True,
  downscale_freq_shift: float = 0.0,
) -> jax.Array:  # [..., dim] float32
  """diffusers ``get_timestep_embedding`` semantics on any timestep shape.

  ``freqs_i = exp(-ln(max_period) * i / (C/2 - downscale_freq_shift))`` for i < C/2; ``args = t * time_factor *
  freqs``; output ``[cos, sin]`` if ``flip_sin_to_cos`` else ``[sin, cos]``, zero-padded by one channel for odd
  ``dim``. ``time_factor`` is applied to ``t`` before the product, as BFL Flux does (diffusers scales ``t`` by 1000
  in the transformer before calling it: the same float32 operations).
  """
  half = dim // 2
  if half - downscale_freq_shift <= 0:
    raise ValueError(f"dim={dim} with downscale_freq_shift={downscale_freq_shift} leaves no frequencies")
  t = jnp.asarray(t, jnp.float32) * jnp.float32(time_factor)
  # The frequencies are host constants: the exponent in float32 in torch's op order, the exp correctly rounded from
  # float64, so they are the same on every backend (XLA's float32 exp is 1 ulp off for some channels, which at
  # arguments near 1000 is 6e-5 rad).
  exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
  exponent = exponent / np.float32(half - downscale_freq_shift)
  freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)  # [c/2]
  args = t[..., None] * freqs  # [..., c/2]
  parts = (jnp.cos(args), jnp.sin(args)) if flip_sin_to_cos else (jnp.sin(args), jnp.cos(args))
  emb = jnp.concatenate(parts, axis=-1)  # [..., 2 * (c/2)]
  if dim % 2:
    emb = jnp.pad(emb, [(0, 0)] * (emb.ndim - 1) + [(0, 1)])  # [..., c]
  return emb


def flux_timestep_embedding(t: jax.Array, dim: int = 256) -> jax.Array:  # [...] in [0, 1] -> [..., dim]
  """Flux (BFL ``timestep_embedding``): t in [0, 1] times 1000, freqs ``exp(-ln(1e4) i / (dim/2))``, [cos, sin]."""
  return timestep_embedding(t, dim, time_factor=1000.0, flip_sin_to_cos=True, downscale_freq_shift=0.0)


def wan_timestep_embedding(t: jax.Array, dim: int = 256) -> jax.Array:  # [...] in [0, 1000] -> [..., dim]
  """Wan/SkyReels (``sinusoidal_embedding_1d``, float64 there): t already in [0, 1000], [cos, sin]."""
  return timestep_embedding(t, dim, time_factor=1.0, flip_sin_to_cos=True, downscale_freq_shift=0.0)


class MLPEmbedder(nn.Module):
  """``Dense -> activation -> Dense``: [..., C_in] -> [..., hidden].

  Flux ``time_in``/``guidance_in``/``vector_in`` (``in_layer``/``out_layer``, SiLU) and Wan ``time_embedding``
  (``0``/``2`` there, SiLU); Wan's ``text_embedding`` is the same with ``activation=gelu_tanh``. The inner width is
  annotated MLP so that, like a feed-forward layer, the first kernel splits by columns and the second by rows.
  """

  hidden: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  activation: Callable[[jax.Array], jax.Array] = nn.silu

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [..., C_in] -> [..., hidden]
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = Dense(self.hidden, kernel_axes=(IN_FEATURES, MLP), name="in_layer", **kwargs)(x)
    h = self.activation(h)
    return Dense(self.hidden, kernel_axes=(MLP, EMBED), name="out_layer", **kwargs)(h)
