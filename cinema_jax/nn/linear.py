"""Dense layer whose parameters carry logical axis names.

Legend: E_in input width, E_out output width; ``...`` any leading dimensions (batch, frames, tokens).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]
AxisName = str | None


class Dense(nn.Module):
  """``y = x @ kernel + bias`` over the last axis: [..., E_in] -> [..., E_out].

  ``kernel`` is [E_in, E_out] (a PyTorch ``Linear.weight`` transposed) and ``bias`` [E_out], both stored in
  ``param_dtype`` and cast to ``dtype`` at use, so a bf16 forward keeps float32 master weights.
  ``kernel_axes`` names the two kernel dimensions from ``cinema_jax.parallel.axes``; ``bias`` takes the second.
  """

  features: int
  kernel_axes: tuple[AxisName, AxisName]
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()
  precision: jax.lax.PrecisionLike = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [..., E_in] -> [..., E_out]
    in_axis, out_axis = self.kernel_axes
    kernel = self.param(
      "kernel",
      nn.with_logical_partitioning(self.kernel_init, (in_axis, out_axis)),
      (x.shape[-1], self.features),
      self.param_dtype,
    )
    y = jax.lax.dot_general(
      x.astype(self.dtype),
      jnp.asarray(kernel, self.dtype),
      (((x.ndim - 1,), (0,)), ((), ())),
      precision=self.precision,
    )
    if self.use_bias:
      bias = self.param(
        "bias",
        nn.with_logical_partitioning(self.bias_init, (out_axis,)),
        (self.features,),
        self.param_dtype,
      )
      y = y + jnp.asarray(bias, self.dtype)
    return y
