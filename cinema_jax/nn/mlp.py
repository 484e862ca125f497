"""Transformer feed-forward block.

Legend: B batch, L tokens, E embed, M hidden width (``hidden``; 4E in Flux, 8960/13824 in Wan).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cinema_jax.nn.linear import Dense
from cinema_jax.parallel.axes import ACT_BATCH, ACT_LENGTH, ACT_MLP, EMBED
from cinema_jax.parallel.axes import MLP as MLP_AXIS


class MLP(nn.Module):
  """``Dense(E -> M) -> GELU(tanh) -> Dense(M -> E)``: [B, L, E] -> [B, L, E].

  Flux ``img_mlp``/``txt_mlp`` (``0``/``2``), Wan ``ffn`` (``0``/``2``); here ``in_layer``/``out_layer``. The
  hidden activation is constrained to (batch, length, mlp) so that under tensor parallelism it stays split by
  columns between the two matmuls (one reduction after ``out_layer`` rather than a gather in between).
  """

  hidden: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [B, L, E] -> [B, L, E]
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = Dense(self.hidden, kernel_axes=(EMBED, MLP_AXIS), name="in_layer", **kwargs)(x)  # [b, l, m]
    h = nn.with_logical_constraint(h, (ACT_BATCH, ACT_LENGTH, ACT_MLP))
    h = nn.gelu(h, approximate=True)
    return Dense(x.shape[-1], kernel_axes=(MLP_AXIS, EMBED), name="out_layer", **kwargs)(h)  # [b, l, e]
