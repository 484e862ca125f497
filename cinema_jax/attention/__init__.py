"""Attention: structured masks and the ``dot_product_attention`` dispatcher (xla | cudnn | pallas)."""

from cinema_jax.attention import masks
from cinema_jax.attention.dispatch import (
  IMPLEMENTATIONS,
  Tiles,
  best_implementation,
  config_tiles,
  dot_product_attention,
  kernel_tiles,
)

__all__ = [
  "masks",
  "dot_product_attention",
  "best_implementation",
  "IMPLEMENTATIONS",
  "Tiles",
  "config_tiles",
  "kernel_tiles",
]
