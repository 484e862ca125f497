"""GoldenMem: earlier keyframes packed at Fibonacci-pyramid sizes, so the context stays under phi x one frame.

Legend: H x W token grid of a full frame (after patchify), h_k x w_k the grid of memory slot k, p the patch size,
C latent channels, C_p = C * p * p channels per token, S memory slots, n history length (keyframes 1..n).

Sizes: the newest memory frame keeps the full size; older ones shrink by phi per step, ``side_k = floor(base /
phi^k)`` (25 -> 25, 15, 9, 5, 3, 2, 1, 0). Areas fall by 1/phi^2 per step, so S slots cost at most
``sum_k phi^(-2k) < phi^2 / (phi^2 - 1) = phi ~ 1.618`` full frames for any n (floors give 1.552 for base 25 over
7 frames); a frame whose side rounds to 0 is dropped.

Packing (``pack_memory``): choose which past frames fill the slots (``recency``: the newest first; ``similarity``:
by cosine similarity of their caption embeddings to the current caption, optionally always keeping the newest),
give rank k the k-th pyramid size, resize each latent by exact area averaging to (p h_k, p w_k), patchify it
("(h p1) (w p2) c -> (h w) (c p1 p2)", Flux's order), and place its tokens at RoPE positions spanning the full
extent, ``(i + 0.5) H / h_k - 0.5``, on their own frame index. Slots sit in story order (oldest first), so a
block-causal global mask lets the keyframe being generated (after all slots) see every memory frame.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import einops
import numpy as np

from cinema_jax.models import keyframes_layout as kl

PHI = (1.0 + math.sqrt(5.0)) / 2.0
SELECTIONS = ("recency", "similarity")
FRAME_POSITIONS = ("slot", "story")


def pyramid_sides(base_side: int, num_frames: int) -> list[int]:
  """``[floor(base_side / phi^k) for k < num_frames]``; (25, 7) -> [25, 15, 9, 5, 3, 2, 1]."""
  if not isinstance(base_side, (int, np.integer)) or base_side < 1:
    raise ValueError(f"base_side must be a positive integer (tokens per side), got {base_side!r}")
  if not isinstance(num_frames, (int, np.integer)) or num_frames < 0:
    raise ValueError(f"num_frames must be a non-negative integer, got {num_frames!r}")
  return [int(math.floor(base_side / PHI**k)) for k in range(num_frames)]


def pyramid_shapes(height: int, width: int, num_frames: int) -> list[tuple[int, int]]:
  """Both sides of a H x W frame shrunk by phi per step: ``(floor(H / phi^k), floor(W / phi^k))``."""
  return list(zip(pyramid_sides(height, num_frames), pyramid_sides(width, num_frames), strict=True))


def context_cost(sides: Sequence[int | tuple[int, int]], *, full: int | tuple[int, int] | None = None) -> float:
  """Tokens of the packed frames over the tokens of one full frame (``full``, default the first entry).

  Entries are square sides or (h, w) shapes: ``context_cost([25, 15, 9, 5, 3, 2, 1]) = 970 / 625 = 1.552``.
  """
  if len(sides) == 0:
    return 0.0

  def tokens(s):
    h, w = (s, s) if np.isscalar(s) else s
    return int(h) * int(w)

  reference = tokens(sides[0] if full is None else full)
  if reference <= 0:
    raise ValueError(f"the full frame must hold at least one token, got {sides[0] if full is None else full!r}")
  return sum(tokens(s) for s in sides) / reference


def area_weights(in_size: int, out_size: int) -> np.ndarray:  # [out, in] float64, rows sum to 1
  """Exact area-averaging weights: output cell i covers [i, i+1) * in/out of the input; overlaps by length."""
  if in_size < 1 or out_size < 1:
    raise ValueError(f"area resize needs positive sizes, got {in_size} -> {out_size}")
  scale = in_size / out_size
  lo = np.arange(out_size)[:, None] * scale  # [out, 1]
  hi = lo + scale
  j = np.arange(in_size)[None, :]  # [1, in]
  overlap = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0.0, None)  # [out, in]
  return overlap / scale


def area_resize(x: np.ndarray, height: int, width: int) -> np.ndarray:  # [Hl, Wl, C] -> [height, width, C]
  """Resizes a channels-last latent by exact area averaging (the mean of the image over each output cell)."""
  if x.ndim != 3:
    raise ValueError(f"area_resize expects a latent [H, W, C], got shape {x.shape}")
  wh = area_weights(x.shape[0], height)
  ww = area_weights(x.shape[1], width)
  # Rows, then columns: two small contractions (one three-operand einsum would loop over every index at once).
  y = np.einsum("ih,hwc->iwc", wh, np.asarray(x, np.float64))  # [height, w, c]
  y = np.einsum("iwc,jw->ijc", y, ww)  # [height, width, c]
  return y.astype(x.dtype)


def patchify(latent: np.ndarray, patch: int) -> np.ndarray:  # [h p, w p, C] -> [h w, C p p]
  """Flux packing of a channels-last latent: "(h p1) (w p2) c -> (h w) (c p1 p2)"."""
  return einops.rearrange(latent, "(h p1) (w p2) c -> (h w) (c p1 p2)", p1=patch, p2=patch)


def unpatchify(tokens: np.ndarray, height: int, width: int, patch: int) -> np.ndarray:  # [h w, C p p] -> latent
  """Inverse of ``patchify`` for a h x w token grid."""
  return einops.rearrange(tokens, "(h w) (c p1 p2) -> (h p1) (w p2) c", h=height, w=width, p1=patch, p2=patch)


def select_memory(
  num_history: int,
  max_memory: int,
  *,
  selection: str = "recency",
  caption_embeddings: np.ndarray | None = None,  # [n, E_cap]
  query_embedding: np.ndarray | None = None,  # [E_cap]
  keep_latest: bool = True,
) -> list[int]:
  """History indices (0 = first keyframe) for the memory slots, by rank: rank 0 gets the full size.

  ``recency``: n-1, n-2, ...; ``similarity``: descending cosine similarity of caption embeddings to the query (ties
  to the newer frame), with the newest frame first when ``keep_latest``.
  """
  if max_memory < 0:
    raise ValueError(f"max_memory must be >= 0, got {max_memory}")
  count = min(num_history, max_memory)
  if selection == "recency":
    return list(range(num_history - 1, num_history - 1 - count, -1))
  if selection != "similarity":
    raise ValueError(f"unknown memory selection {selection!r}; choose one of {SELECTIONS}")
  if caption_embeddings is None or query_embedding is None:
    raise ValueError("selection='similarity' needs caption_embeddings [n, E] and query_embedding [E]")
  emb = np.asarray(caption_embeddings, np.float64).reshape(num_history, -1)
  query = np.asarray(query_embedding, np.float64).reshape(-1)
  if emb.shape[1] != query.shape[0]:
    raise ValueError(f"caption embeddings {emb.shape} and query {query.shape} differ in width")
  sim = emb @ query / np.maximum(np.linalg.norm(emb, axis=1) * np.linalg.norm(query), 1e-12)  # [n]
  order = sorted(range(num_history), key=lambda j: (-sim[j], -j))
  if keep_latest and num_history:
    order = [num_history - 1] + [j for j in order if j != num_history - 1]
  return order[:count]


@dataclasses.dataclass(frozen=True)
class PackedMemory:
  """Memory slots in story order: tokens, RoPE positions and slot ids of every memory token."""

  history_index: tuple[int, ...]  # story index of each slot (oldest first)
  shapes: tuple[tuple[int, int], ...]  # token grid (h_k, w_k) of each slot
  frame_shape: tuple[int, int]  # full-resolution token grid (H, W)
  tokens: np.ndarray  # [N_mem, C_p]
  positions: np.ndarray  # [N_mem, 3] float32 (frame, row, col)
  slot: np.ndarray  # [N_mem] int32, 0..S-1

  @property
  def num_slots(self) -> int:
    return len(self.shapes)

  @property
  def num_tokens(self) -> int:
    return int(self.tokens.shape[0])

  @property
  def cost(self) -> float:
    """Memory tokens over the tokens of one full frame (<= phi with the pyramid)."""
    return context_cost(self.shapes, full=self.frame_shape) if self.shapes else 0.0


def pack_memory(
  latents: Sequence[np.ndarray],  # n x [H p, W p, C] channels-last latents of keyframes 1..n
  *,
  patch: int = 2,
  max_memory: int = 7,
  pyramid: bool = True,
  selection: str = "recency",
  caption_embeddings: np.ndarray | None = None,
  query_embedding: np.ndarray | None = None,
  keep_latest: bool = True,
  frame_position: str = "slot",
) -> PackedMemory:
  """Packs up to ``max_memory`` earlier keyframes; ``pyramid=False`` keeps every chosen frame at full size.

  ``frame_position``: "slot" puts slot s on RoPE frame s (positions stay in [0, S] for any history length, the
  keyframe being generated at S); "story" uses the story index (the new keyframe at n).
  """
  if frame_position not in FRAME_POSITIONS:
    raise ValueError(f"unknown frame_position {frame_position!r}; choose one of {FRAME_POSITIONS}")
  n = len(latents)
  shape = _frame_shape(latents, patch) if n else (0, 0)
  ranked = select_memory(
    n,
    max_memory,
    selection=selection,
    caption_embeddings=caption_embeddings,
    query_embedding=query_embedding,
    keep_latest=keep_latest,
  )
  sizes = pyramid_shapes(*shape, len(ranked)) if pyramid and ranked else [shape] * len(ranked)
  chosen = sorted((j, hw) for j, hw in zip(ranked, sizes, strict=True) if hw[0] > 0 and hw[1] > 0)
  tokens, positions, slots = [], [], []
  for s, (j, (h, w)) in enumerate(chosen):
    lat = latents[j]
    if (h, w) != shape:
      lat = area_resize(lat, h * patch, w * patch)
    tokens.append(patchify(lat, patch))
    frame = s if frame_position == "slot" else j
    positions.append(kl.frame_positions(h, w, frame=frame, full_height=shape[0], full_width=shape[1]))
    slots.append(np.full(h * w, s, np.int32))
  channels = latents[0].shape[-1] * patch * patch if n else 0
  return PackedMemory(
    history_index=tuple(j for j, _ in chosen),
    shapes=tuple(hw for _, hw in chosen),
    frame_shape=shape,
    tokens=np.concatenate(tokens) if tokens else np.zeros((0, channels), np.float32),
    positions=np.concatenate(positions) if positions else np.zeros((0, 3), np.float32),
    slot=np.concatenate(slots) if slots else np.zeros((0,), np.int32),
  )


def _frame_shape(latents: Sequence[np.ndarray], patch: int) -> tuple[int, int]:
  first = latents[0].shape
  for i, lat in enumerate(latents):
    if lat.ndim != 3 or lat.shape != first:
      raise ValueError(f"history latent {i} has shape {lat.shape}; every keyframe latent must be [H, W, C] = {first}")
  if first[0] % patch or first[1] % patch:
    raise ValueError(f"latent {first[:2]} is not divisible by the patch size {patch}")
  return first[0] // patch, first[1] // patch
