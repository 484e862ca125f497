"""Token layout of an interleaved keyframe sample: segment ids, RoPE positions and the hybrid masks built from them.

Legend: B batch, K keyframe slots, T caption tokens, N image tokens, L = T + N joint tokens, h x w the token grid of
one (possibly downsampled) frame, H x W the full-resolution token grid, A = 3 position axes (frame, row, col).

One sample holds K keyframes and K captions in the Flux joint order ``[caption_1 .. caption_K ; image_1 .. image_K]``
(the text stream first, as Flux concatenates ``cat(txt, img)``). Every token carries the slot index of its keyframe
as its segment id (-1 = padding, so K varies per sample through padding), and that index is also its RoPE frame
position. Caption tokens sit at (k, 0, 0) as Flux's ``txt_ids`` do at (0, 0, 0); image tokens at (k, row, col).

Masks (cinema_jax.attention.masks, never L x L arrays):

* local: ``SegmentMask(segment)``: caption_k and image_k see each other only;
* global ``"full"``: every real token sees every real token (padding isolated);
* global ``"block_causal"``: ``BlockCausalMask(segment)``: keyframe k sees keyframes <= k, the autoregressive order in
  which a story's keyframes are generated (memory slots come first, the keyframe being generated last).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from cinema_jax.attention import masks

Array = Any  # np.ndarray or jax.Array
GLOBAL_MASKS = ("full", "block_causal")


@struct.dataclass
class KeyframeLayout:
  """Segment ids of both streams; the per-keyframe token counts are static (they select the modulation layout).

  ``txt_tokens_per_keyframe`` / ``img_tokens_per_keyframe`` are set when every slot of that stream has the same
  number of tokens in slot order (then per-keyframe AdaLN broadcasts over a [B, K, n, E] view and never builds a
  [B, L, E] copy); ``None`` (e.g. GoldenMem frames of different sizes) gathers each token's keyframe vector.
  """

  txt_segment: Array  # [B, T] int32, keyframe slot of every caption token, -1 = padding
  img_segment: Array  # [B, N] int32, keyframe slot of every image token, -1 = padding
  txt_tokens_per_keyframe: int | None = struct.field(pytree_node=False, default=None)
  img_tokens_per_keyframe: int | None = struct.field(pytree_node=False, default=None)

  def joint_segment(self) -> Array:  # [B, T + N]
    """Segment ids of the joint sequence ``cat(txt, img)`` (numpy in, numpy out; jax otherwise)."""
    xp = np if isinstance(self.txt_segment, np.ndarray) and isinstance(self.img_segment, np.ndarray) else jnp
    return xp.concatenate([self.txt_segment, self.img_segment], axis=-1)


def local_mask(segment: Array) -> masks.Mask:
  """Within-keyframe attention: caption_k with image_k."""
  return masks.SegmentMask(segment)


def global_mask(segment: Array, kind: str) -> masks.Mask:
  """Across keyframes: ``"full"`` (padding isolated) or ``"block_causal"`` over keyframe slots."""
  if kind == "full":
    return masks.padding_mask(segment >= 0)
  if kind == "block_causal":
    return masks.BlockCausalMask(segment, segment)
  raise ValueError(f"unknown global mask {kind!r}; choose one of {GLOBAL_MASKS}")


def block_masks(
  layout: KeyframeLayout, *, num_blocks: int, num_local_blocks: int, global_kind: str
) -> list[masks.Mask]:
  """The mask of every block in model order (double-stream blocks, then single-stream blocks)."""
  if not 0 <= num_local_blocks <= num_blocks:
    raise ValueError(f"num_local_blocks={num_local_blocks} must lie in [0, {num_blocks}] (the number of blocks)")
  segment = layout.joint_segment()
  return [local_mask(segment) if i < num_local_blocks else global_mask(segment, global_kind) for i in range(num_blocks)]


def frame_positions(
  height: int, width: int, *, frame: float, full_height: int | None = None, full_width: int | None = None
) -> np.ndarray:  # [h * w, 3] float32, row-major
  """(frame, row, col) of a h x w token grid that covers a full_height x full_width frame.

  A downsampled frame's tokens sit at the centres of the full-resolution cells they cover:
  ``(i + 0.5) * H / h - 0.5`` (an identity for h = H), so RoPE sees one spatial extent at every memory size.
  """
  full_height = height if full_height is None else full_height
  full_width = width if full_width is None else full_width
  if min(height, width) < 1:
    raise ValueError(f"a frame needs at least one token per side, got {height} x {width}")
  rows = (np.arange(height, dtype=np.float64) + 0.5) * (full_height / height) - 0.5
  cols = (np.arange(width, dtype=np.float64) + 0.5) * (full_width / width) - 0.5
  grid_r, grid_c = np.meshgrid(rows, cols, indexing="ij")  # [h, w]
  pos = np.stack([np.full(height * width, float(frame)), grid_r.ravel(), grid_c.ravel()], axis=-1)
  return pos.astype(np.float32)


def caption_positions(num_tokens: int, *, frame: float) -> np.ndarray:  # [T, 3] float32
  """Caption tokens of keyframe ``frame``: (frame, 0, 0), as Flux's all-zero ``txt_ids`` with the frame set."""
  pos = np.zeros((num_tokens, 3), np.float32)
  pos[:, 0] = frame
  return pos


def interleaved_layout(
  num_keyframes: Sequence[int],
  *,
  max_keyframes: int,
  caption_tokens: int,
  frame_shape: tuple[int, int],
) -> tuple[KeyframeLayout, np.ndarray, np.ndarray]:
  """Layout of a batch of samples with K = ``max_keyframes`` slots of equal size; sample b uses the first
  ``num_keyframes[b]`` slots and pads the rest.

  Returns ``(layout, txt_ids [B, K*T, 3], img_ids [B, K*h*w, 3])`` with numpy ids.
  """
  height, width = frame_shape
  used = np.asarray(num_keyframes, np.int64)
  if used.ndim != 1 or used.size == 0:
    raise ValueError(f"num_keyframes must be a non-empty list of per-sample counts, got {num_keyframes!r}")
  if used.min() < 1 or used.max() > max_keyframes:
    raise ValueError(f"num_keyframes {used.tolist()} must lie in [1, max_keyframes={max_keyframes}]")
  n_img = height * width
  slot_txt = np.repeat(np.arange(max_keyframes), caption_tokens)  # [k*t]
  slot_img = np.repeat(np.arange(max_keyframes), n_img)  # [k*n]
  txt_segment = np.where(slot_txt[None] < used[:, None], slot_txt[None], -1).astype(np.int32)  # [b, k*t]
  img_segment = np.where(slot_img[None] < used[:, None], slot_img[None], -1).astype(np.int32)  # [b, k*n]
  txt_ids = np.concatenate([caption_positions(caption_tokens, frame=k) for k in range(max_keyframes)])
  img_ids = np.concatenate([frame_positions(height, width, frame=k) for k in range(max_keyframes)])
  batch = used.size
  layout = KeyframeLayout(txt_segment, img_segment, caption_tokens, n_img)
  return (
    layout,
    np.broadcast_to(txt_ids, (batch,) + txt_ids.shape).copy(),
    np.broadcast_to(img_ids, (batch,) + img_ids.shape).copy(),
  )


def token_keyframe_index(segment: jax.Array, num_keyframes: int) -> jax.Array:  # [B, L] int32 in [0, K)
  """Keyframe slot of every token for gathers; padding (-1) reads slot 0, harmless since masks isolate it."""
  return jnp.clip(jnp.asarray(segment), 0, num_keyframes - 1).astype(jnp.int32)
