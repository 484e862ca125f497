"""AdaLN modulation: conditioning vectors -> (shift, scale, gate) chunks, and their application to tokens.

Legend: B batch, F frames (or keyframes), N tokens per frame, L tokens (= F * N when per frame), E embed,
K modulation chunks (6 for a Flux double / Wan block, 3 for a Flux single block, 2 for a final layer).

Conditioning comes at three granularities, told apart by shape:

* per sample ``[B, E]``: one timestep per video (Flux, Wan without diffusion forcing);
* per frame ``[B, F, E]`` with ``tokens_per_frame=N``: diffusion forcing's per-frame timesteps, Captain Cinema's
  per-keyframe timesteps. The tokens are viewed as [B, F, N, E] and the vector broadcast over N, so a [B, L, E]
  copy of every chunk is never built (at Wan 14B / 540P that copy is 6.3 GB per block in float32);
* per token ``[B, L, E]``: arbitrary layouts (a joint caption+image sequence whose segments differ in length).
"""

from __future__ import annotations

from collections.abc import Callable

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from cinema_jax.nn.linear import Dense
from cinema_jax.parallel.axes import EMBED, MODULATION


class AdaLNModulation(nn.Module):
  """``SiLU(vec) -> Dense(K * E)`` reshaped to K chunks: [..., E_vec] -> [..., K, E].

  ``vec`` may be [B, E_vec], [B, F, E_vec] or [B, L, E_vec]; the chunks keep that granularity. The Dense is named
  ``lin`` (BFL ``img_mod.lin``) and its output columns are chunk-major, matching ``torch.chunk(K, dim=-1)``.
  """

  num_chunks: int
  features: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, vec: jax.Array) -> jax.Array:  # [..., E_vec] -> [..., K, E]
    h = nn.silu(vec.astype(self.dtype))
    h = Dense(
      self.num_chunks * self.features,
      kernel_axes=(EMBED, MODULATION),
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="lin",
    )(h)
    return einops.rearrange(h, "... (k e) -> ... k e", k=self.num_chunks)  # [..., k, e]


def _check_layout(x: jax.Array, mods: tuple[jax.Array, ...], tokens_per_frame: int | None) -> str:
  """Returns 'sample', 'frame' or 'token' for conditioning ``mods`` applied to tokens ``x`` [B, L, E]."""
  if x.ndim != 3:
    raise ValueError(f"expected tokens [B, L, E], got shape {x.shape}")
  shape = mods[0].shape
  if any(m.shape != shape for m in mods):
    raise ValueError(f"modulation tensors differ in shape: {[m.shape for m in mods]}")
  _, length, embed = x.shape
  if shape[-1] != embed:
    raise ValueError(f"modulation width {shape[-1]} != token width {embed} (x {x.shape}, modulation {shape})")
  if len(shape) == 2:
    return "sample"
  if len(shape) != 3:
    raise ValueError(f"modulation must be [B, E], [B, F, E] or [B, L, E], got {shape}")
  if tokens_per_frame is not None:
    if shape[1] * tokens_per_frame != length:
      raise ValueError(
        f"per-frame modulation with {shape[1]} frames x {tokens_per_frame} tokens_per_frame "
        f"!= {length} tokens (x {x.shape})"
      )
    return "frame"
  if shape[1] != length:
    raise ValueError(
      f"modulation {shape} has {shape[1]} rows but x has {length} tokens; "
      "pass tokens_per_frame for per-frame modulation"
    )
  return "token"


def _broadcast(
  fn: Callable[..., jax.Array], x: jax.Array, mods: tuple[jax.Array, ...], tokens_per_frame: int | None
) -> jax.Array:
  """Applies the elementwise ``fn(x, *mods)`` in float32 with the layout's broadcasting; result in x.dtype."""
  layout = _check_layout(x, mods, tokens_per_frame)
  x32 = x.astype(jnp.float32)
  mods32 = tuple(m.astype(jnp.float32) for m in mods)
  if layout == "sample":
    y = fn(x32, *(m[:, None, :] for m in mods32))
  elif layout == "frame":
    xf = einops.rearrange(x32, "b (f n) e -> b f n e", n=tokens_per_frame)  # [b, f, n, e]
    y = fn(xf, *(m[:, :, None, :] for m in mods32))
    y = einops.rearrange(y, "b f n e -> b (f n) e")  # [b, l, e]
  else:
    y = fn(x32, *mods32)
  return y.astype(x.dtype)


def modulate(
  x: jax.Array,  # [B, L, E]
  shift: jax.Array,  # [B, E] | [B, F, E] | [B, L, E]
  scale: jax.Array,  # same shape as shift
  *,
  tokens_per_frame: int | None = None,
) -> jax.Array:  # [B, L, E] in x.dtype
  """``x * (1 + scale) + shift`` in float32 (as Wan does), broadcast per sample, per frame or per token."""
  return _broadcast(lambda x_, sh, sc: x_ * (1.0 + sc) + sh, x, (shift, scale), tokens_per_frame)


def gate(
  x: jax.Array,  # [B, L, E]
  g: jax.Array,  # [B, E] | [B, F, E] | [B, L, E]
  *,
  tokens_per_frame: int | None = None,
) -> jax.Array:  # [B, L, E] in x.dtype
  """``g * x`` for gated residuals (``h = h + gate(attn_out, g)``), with the same broadcasting as ``modulate``."""
  return _broadcast(lambda x_, g_: x_ * g_, x, (g,), tokens_per_frame)
