"""n-D rotary position embedding on adjacent pairs, with float positions (the Flux / Wan layout).

Legend: B batch, L tokens, H heads, D head dim, P = D/2 rotated pairs, A position axes (3: frame, row, col).

Channel pair i is (x[2i], x[2i+1]); the pairs are split between the axes in order, axis a owning ``axes_dim[a] / 2``
consecutive pairs with frequencies ``omega_j = theta^(-2j / axes_dim[a])``. Positions are floats so that GoldenMem's
downsampled memory frames can sit at ``(i + 0.5) * H/h - 0.5`` on the full-resolution grid.

Precision: angles and rotations are float32; the originals use float64 (Flux's ``rope``, Wan's complex128 ``polar``).
For positions below ~1000 the float32 angle is within ~6e-5 rad of the float64 one, well under bf16 q/k rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def wan_axes_dim(head_dim: int) -> tuple[int, int, int]:
  """Wan's (frame, row, col) split of the head dim: (d - 4*(d//6), 2*(d//6), 2*(d//6)); 128 -> (44, 42, 42)."""
  sixth = head_dim // 6
  return (head_dim - 4 * sixth, 2 * sixth, 2 * sixth)


def rope_frequencies(axes_dim: Sequence[int], theta: float = 10000.0) -> np.ndarray:  # [P] float32
  """Concatenated per-axis ``theta^(-2j/dim)``, j < dim/2; computed in float64 once, rounded to float32."""
  for dim in axes_dim:
    if dim % 2:
      raise ValueError(f"every RoPE axis needs an even width, got axes_dim={tuple(axes_dim)}")
  return np.concatenate([theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim) for dim in axes_dim]).astype(
    np.float32
  )


def rope_angles(
  positions: jax.Array,  # [..., L, A] float
  axes_dim: Sequence[int],
  theta: float = 10000.0,
) -> jax.Array:  # [..., L, P] float32, P = sum(axes_dim) / 2
  """Rotation angle of every pair: axis a's position times its frequencies, concatenated over axes in order."""
  if positions.shape[-1] != len(axes_dim):
    raise ValueError(f"positions {positions.shape} have {positions.shape[-1]} axes but axes_dim={tuple(axes_dim)}")
  freqs = rope_frequencies(axes_dim, theta)  # [p]
  # Which position axis each pair reads: pair p belongs to the axis whose block of axes_dim[a]/2 pairs contains it.
  axis_of_pair = np.repeat(np.arange(len(axes_dim)), [dim // 2 for dim in axes_dim])  # [p]
  pos = jnp.asarray(positions, jnp.float32)[..., axis_of_pair]  # [..., l, p]
  return pos * freqs


def apply_rope(
  x: jax.Array,  # [B, L, H, D]
  angles: jax.Array,  # [B or 1, L, P] (or [L, P])
) -> jax.Array:  # [B, L, H, D] in x.dtype
  """Rotates each adjacent pair (x0, x1) by its angle: (x0 cos - x1 sin, x0 sin + x1 cos), in float32."""
  if angles.shape[-1] * 2 != x.shape[-1]:
    raise ValueError(f"angles have {angles.shape[-1]} pairs but head dim is {x.shape[-1]} (x {x.shape})")
  if angles.ndim == 2:
    angles = angles[None]  # [1, l, p]
  angles = angles[:, :, None, :]  # [b, l, 1, p]: shared by all heads
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)  # [b, l, h, p, 2]
  x0, x1 = pairs[..., 0], pairs[..., 1]
  out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)  # [b, l, h, p, 2]
  return out.reshape(x.shape).astype(x.dtype)
