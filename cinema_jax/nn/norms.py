"""Normalisations over the last axis, computed in float32 whatever the compute dtype.

Legend: ``...`` any leading dimensions; the last axis (E, or D for a per-head QK norm) is normalised.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cinema_jax.parallel.axes import NORM


class RMSNorm(nn.Module):
  """``x * rsqrt(mean(x^2) + eps) * scale`` over the last axis; [..., E] -> [..., E] in ``dtype``.

  Flux normalises q/k per head (scale [D], parameter ``scale``), Wan across all heads (scale [E], PyTorch
  ``weight``); both are this module applied to the last axis. The originals cast the normalised value back to the
  input dtype *before* multiplying by the scale; here the whole product stays in float32 and is rounded once, which
  differs from them by at most one rounding of ``dtype``.
  """

  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  use_scale: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [..., E] -> [..., E]
    x32 = x.astype(jnp.float32)
    # bf16 squares lose most of their mantissa in the mean; float32 keeps the norm exact enough for attention logits.
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    if self.use_scale:
      scale = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), (NORM,)), (x.shape[-1],), self.param_dtype
      )
      y = y * scale.astype(jnp.float32)
    return y.astype(self.dtype)


class LayerNorm(nn.Module):
  """``(x - mean) * rsqrt(var + eps)`` over the last axis, optionally ``* scale + bias``; [..., E] -> [..., E].

  Without affine (the default) this is Flux's ``LayerNorm(elementwise_affine=False, eps=1e-6)`` and Wan's norm1/
  norm2; with ``use_scale=use_bias=True`` it is Wan's cross-attention norm (PyTorch ``weight`` -> ``scale``).
  Mean, variance and the affine run in float32 (Wan casts to float32 the same way); the result is cast to ``dtype``.
  """

  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  use_scale: bool = False
  use_bias: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [..., E] -> [..., E]
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centred = x32 - mean
    # Two-pass variance: E[x^2] - E[x]^2 cancels badly for activations with a large common offset.
    var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(var + self.eps)
    features = (x.shape[-1],)
    if self.use_scale:
      scale = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), (NORM,)), features, self.param_dtype
      )
      y = y * scale.astype(jnp.float32)
    if self.use_bias:
      bias = self.param(
        "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (NORM,)), features, self.param_dtype
      )
      y = y + bias.astype(jnp.float32)
    return y.astype(self.dtype)
