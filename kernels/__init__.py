"""cinema_kernels: Pallas block-sparse attention (installed from the ``kernels/`` folder under this import name).

The folder is called ``kernels/`` as in the project layout, but it installs as ``cinema_kernels`` because the PyPI
package ``kernels`` already owns that import name.

Flash attention over (block_q, block_kv) tiles driven by a mask's block summary: empty tiles are never loaded or
computed, full tiles run unmasked, partial tiles apply the element mask (recomputed from the mask's ids, or stored for
dense masks). Forward and backward (dq, dk/dv) through ``jax.custom_vjp``; TPU (Mosaic TPU), Hopper GPUs (Mosaic
GPU), older NVIDIA GPUs (Triton lowering) and CPU (interpret mode).
``cinema_jax.attention.dot_product_attention(implementation="pallas")`` dispatches here. See docs/kernels.md.

Modules: ``metadata`` (tile lists, KernelMask), ``reference`` (plain-jnp block-sparse walk), ``mosaic_tpu``,
``mosaic_gpu`` and ``triton_gpu`` (the kernels), ``mosaic_gpu_interpret`` (the Mosaic GPU kernels on the CPU),
``mosaic_gpu_profile`` (where their time goes, from their in-kernel profile), ``attention`` (entry points),
``blocks`` (tile sizes), ``_compat`` (JAX version shim).
"""

from cinema_kernels.attention import (
  FLAVOURS,
  TileVisits,
  block_sparse_attention,
  prepare_mask,
  resolve_flavour,
  sharded_block_sparse_attention,
  tile_visits,
)
from cinema_kernels.blocks import DEFAULT_BLOCK_SIZES, BlockSizes, default_block_sizes, use_block_sizes
from cinema_kernels.metadata import KernelMask, TileLists
from cinema_kernels.reference import reference_attention

__all__ = [
  "DEFAULT_BLOCK_SIZES",
  "FLAVOURS",
  "BlockSizes",
  "KernelMask",
  "TileLists",
  "TileVisits",
  "block_sparse_attention",
  "default_block_sizes",
  "prepare_mask",
  "reference_attention",
  "resolve_flavour",
  "sharded_block_sparse_attention",
  "tile_visits",
  "use_block_sizes",
]
