"""Attention: structured masks and the ``dot_product_attention`` dispatcher (xla | cudnn | pallas)."""

from cinema_jax.attention import masks
from cinema_jax.attention.dispatch import IMPLEMENTATIONS, best_implementation, dot_product_attention

__all__ = ["masks", "dot_product_attention", "best_implementation", "IMPLEMENTATIONS"]
