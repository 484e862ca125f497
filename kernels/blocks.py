"""Tile sizes of the block-sparse kernels, per backend.

A tile is ``block_q`` query rows x ``block_kv`` key columns. Smaller tiles skip more of a sparse mask (the skipping
granularity is the tile) but pay more per-step overhead; larger tiles feed the matrix units better. The forward pass
and the backward pass may use different sizes (the backward kernels hold more accumulators per tile).

The defaults below are what each backend runs when nothing else is asked for. ``use_block_sizes`` overrides them for
a region of code (a trainer enters it with the sizes of its config's ``attention`` section), and every entry point
also takes an explicit ``block_sizes=``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes: forward (``block_q`` x ``block_kv``) and backward (dq and dk/dv kernels; default = forward)."""

  block_q: int
  block_kv: int
  block_q_bwd: int | None = None
  block_kv_bwd: int | None = None

  def __post_init__(self):
    for name in ("block_q", "block_kv", "block_q_bwd", "block_kv_bwd"):
      value = getattr(self, name)
      if value is None and name.endswith("_bwd"):
        continue
      if not isinstance(value, int) or value <= 0 or value % 8:
        raise ValueError(f"BlockSizes.{name} must be a positive multiple of 8, got {value!r}")

  @property
  def fwd(self) -> tuple[int, int]:
    return self.block_q, self.block_kv

  @property
  def bwd(self) -> tuple[int, int]:
    return self.block_q_bwd or self.block_q, self.block_kv_bwd or self.block_kv


# Kernel flavours: "mosaic_tpu" (TPU; the same kernels run on CPU in interpret mode), "mosaic_gpu" (Hopper GPUs) and
# "triton" (older NVIDIA GPUs, and the fallback for inputs outside the Mosaic GPU kernel's scope).
DEFAULT_BLOCK_SIZES: dict[str, BlockSizes] = {
  # TPU: the MXU wants multiples of 128; 512-wide key tiles amortise the per-grid-step cost, 256-row query tiles keep
  # the skipping granularity of frame-sized masks useful. Not tuned on hardware yet.
  "mosaic_tpu": BlockSizes(block_q=256, block_kv=512, block_q_bwd=256, block_kv_bwd=256),
  # NVIDIA (Triton lowering): the forward keeps a 128 x D accumulator per program; the backward kernels hold two
  # accumulators each, so 64 x 64 tiles keep them in registers (the same split as JAX's Triton flash attention).
  "triton": BlockSizes(block_q=128, block_kv=64, block_q_bwd=64, block_kv_bwd=64),
  # Hopper (Mosaic GPU): 128 query rows = two consumer warpgroups of 64 (the WGMMA M), 128-key tiles in a two-slot
  # TMA ring (FlashAttention-3's split). Backward 128 x 128: two 64-row consumers per CTA share each listed block;
  # measured faster than 64 x 64 (one consumer) on an H200 at L = 16384: dense 22.5 vs 29.8 ms, 8 segments 3.39 vs
  # 4.64 ms (docs/kernels.md).
  "mosaic_gpu": BlockSizes(block_q=128, block_kv=128, block_q_bwd=128, block_kv_bwd=128),
  # CPU interpret mode: for tests and debugging only (XLA is the fast CPU path).
  "interpret": BlockSizes(block_q=128, block_kv=128),
}

_OVERRIDE: contextvars.ContextVar[BlockSizes | None] = contextvars.ContextVar(
  "cinema_kernels_block_sizes", default=None
)


def default_block_sizes(flavour: str) -> BlockSizes:
  """The sizes in force for ``flavour``: an active ``use_block_sizes`` override, else the table above."""
  override = _OVERRIDE.get()
  if override is not None:
    return override
  if flavour not in DEFAULT_BLOCK_SIZES:
    raise ValueError(f"unknown kernel flavour {flavour!r}; choose one of {sorted(DEFAULT_BLOCK_SIZES)}")
  return DEFAULT_BLOCK_SIZES[flavour]


@contextlib.contextmanager
def use_block_sizes(
  block_q: int, block_kv: int, block_q_bwd: int | None = None, block_kv_bwd: int | None = None
) -> Iterator[BlockSizes]:
  """Within the block, every kernel call without explicit ``block_sizes`` uses these (read at trace time)."""
  sizes = BlockSizes(block_q, block_kv, block_q_bwd, block_kv_bwd)
  token = _OVERRIDE.set(sizes)
  try:
    yield sizes
  finally:
    _OVERRIDE.reset(token)
