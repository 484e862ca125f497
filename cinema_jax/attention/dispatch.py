"""``dot_product_attention``: one entry point, several implementations.

Letters: B batch, Q query length, K key/value length, H heads, D head dim.

Implementations:

* ``"xla"``: the reference. Logits and softmax in float32 whatever the input dtype; the mask is expanded to a dense
  boolean ``[B, 1, Q, K]`` (XLA fuses the id comparisons into the select, nothing L x L is stored for structured
  masks beyond the logits themselves). Works everywhere, under jit, vmap, grad and shard_map.
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` on CUDA GPUs, bf16/fp16 only. Fast for
  ``FullMask``/no mask; any other mask is handed to cuDNN as a dense mask, which is correct but computes every tile.
* ``"pallas"``: the block-sparse kernel of ``cinema_kernels`` (the ``kernels/`` folder): it visits only non-empty
  tiles of the mask's block summary and applies the element mask only on partial ones; Mosaic TPU on TPUs, Mosaic
  GPU on Hopper GPUs (the Triton lowering on older ones), interpret mode on the CPU. Under a mesh it runs inside
  ``jax.shard_map`` over the batch and head axes of the logical rules.
* ``None``: the best available for the inputs: the Pallas kernel for masked attention on a TPU or GPU, cuDNN for
  unmasked bf16/fp16 attention on a GPU, otherwise XLA.

A query row that sees no key at all (a fully masked row, e.g. a padding token) returns zeros, in every
implementation, instead of the uniform average that a softmax over equal -inf-like logits would give.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

from cinema_jax.attention import masks as masks_lib

IMPLEMENTATIONS = ("xla", "cudnn", "pallas")
# Pallas kernel tiles: (block_q, block_kv, block_q_bwd, block_kv_bwd); the backward pair may be None (= forward).
Tiles = tuple[int, int, int | None, int | None]
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def _check_shapes(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"dot_product_attention: {name} must be [B, L, H, D], got shape {tuple(x.shape)}")
  if k.shape[:3] != v.shape[:3]:
    raise ValueError(f"dot_product_attention: k {tuple(k.shape)} and v {tuple(v.shape)} disagree on [B, L, H]")
  if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
    raise ValueError(
      f"dot_product_attention: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, heads and head dim"
    )


def _dense_mask(mask: masks_lib.Mask | None, lq: int, lkv: int, batch: int) -> jax.Array | None:
  """Boolean [B or 1, 1, Q, K] or None for no mask."""
  if mask is None or isinstance(mask, masks_lib.FullMask):
    return None
  if not isinstance(mask, masks_lib.Mask):
    raise TypeError(
      f"mask must be a cinema_jax.attention.masks.Mask or None, got {type(mask).__name__}; "
      "wrap a boolean array in masks.DenseMask"
    )
  if mask.batch_size not in (None, batch):
    raise ValueError(f"mask holds per-sample ids for batch {mask.batch_size}, inputs have batch {batch}")
  dense = mask.to_dense(lq, lkv)
  return dense[:, None] if dense.ndim == 3 else dense[None, None]  # [b|1, 1, q, k]


def _xla(q, k, v, mask, scale):
  dense = _dense_mask(mask, q.shape[1], k.shape[1], q.shape[0])
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if dense is not None:
    logits = jnp.where(dense, logits, -jnp.inf)
  # A row with no visible key has max = -inf; shift it by 0 instead so exp gives exact zeros and no NaN.
  row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  weights = jnp.exp(logits - row_max)
  denom = jnp.sum(weights, axis=-1, keepdims=True)
  probs = weights / jnp.where(denom > 0, denom, 1.0)
  out = jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(jnp.float32))
  return out.astype(q.dtype)


def _cudnn(q, k, v, mask, scale):
  if jax.default_backend() != "gpu":
    raise RuntimeError(f"implementation='cudnn' needs a CUDA GPU; the default JAX backend is {jax.default_backend()!r}")
  if q.dtype not in _CUDNN_DTYPES:
    raise TypeError(f"implementation='cudnn' takes bfloat16 or float16 inputs, got {q.dtype}")
  dense = _dense_mask(mask, q.shape[1], k.shape[1], q.shape[0])
  if dense is None:
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
  dense = jnp.broadcast_to(dense, (q.shape[0], 1, q.shape[1], k.shape[1]))
  out = jax.nn.dot_product_attention(q, k, v, mask=dense, scale=scale, implementation="cudnn")
  # cuDNN averages over all keys on a fully masked row; the contract is zeros.
  seen = jnp.any(dense, axis=-1)[:, 0, :, None, None]  # [b, q, 1, 1]
  return jnp.where(seen, out, jnp.zeros((), out.dtype))


def _kernel_mesh_axes(q: jax.Array) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """Mesh axes that split the batch and the heads of ``q`` under the current mesh and logical rules.

  The Pallas kernel is opaque to the SPMD partitioner, so it runs inside ``jax.shard_map``: each device attends its
  own samples and heads. The axes come from the rules of ``activation_batch``/``activation_heads`` (the config's, or
  the defaults), keeping only mesh axes that are not already manual, have more than one device and divide the size.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return (), ()
  import flax.linen as nn

  from cinema_jax.parallel import axes as axes_lib

  rules = nn.get_logical_axis_rules() or axes_lib.DEFAULT_RULES
  spec = nn.logical_to_mesh_axes(
    (axes_lib.ACT_BATCH, axes_lib.ACT_LENGTH, axes_lib.ACT_HEADS, axes_lib.ACT_HEAD_DIM), tuple(rules)
  )
  manual = set(getattr(mesh, "manual_axes", ()))

  def usable(entry, size):
    names = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
    names = tuple(a for a in names if a in mesh.axis_names and a not in manual and mesh.shape[a] > 1)
    total = 1
    for a in names:
      total *= mesh.shape[a]
    return names if names and size % total == 0 else ()

  return usable(spec[0], q.shape[0]), usable(spec[2], q.shape[2])


def _pallas(q, k, v, mask, scale):
  from cinema_kernels import sharded_block_sparse_attention  # Pallas imports only when the kernel is asked for

  batch_axes, head_axes = _kernel_mesh_axes(q)
  return sharded_block_sparse_attention(q, k, v, mask, batch_axes=batch_axes, head_axes=head_axes, scale=scale)


_REGISTRY: dict[str, Callable] = {"xla": _xla, "cudnn": _cudnn, "pallas": _pallas}


def best_implementation(q: jax.Array, mask: masks_lib.Mask | None) -> str:
  """What ``implementation=None`` picks for these inputs on the current backend.

  Sparse (masked) attention on a TPU or GPU goes to the block-sparse Pallas kernel, which skips empty tiles; unmasked
  bf16/fp16 attention on a GPU goes to cuDNN; everything else (CPU, unusual head dims) to XLA.
  """
  unmasked = mask is None or isinstance(mask, masks_lib.FullMask)
  backend = jax.default_backend()
  pallas_ok = q.dtype in (jnp.float32, jnp.bfloat16, jnp.float16) and q.shape[-1] in (64, 128)
  if backend in ("tpu", "gpu") and not unmasked and pallas_ok:
    return "pallas"
  if backend == "gpu" and unmasked and q.dtype in _CUDNN_DTYPES and q.shape[-1] <= 128:
    return "cudnn"
  return "xla"


def dot_product_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  mask: masks_lib.Mask | None = None,
  scale: float | None = None,
  implementation: str | None = None,
) -> jax.Array:
  """Softmax attention ``softmax(q k^T * scale + mask) v`` over [B, L, H, D] inputs; returns [B, Lq, H, D].

  Args:
    q: queries [B, Lq, H, D].
    k, v: keys and values [B, Lkv, H, D].
    mask: a ``masks.Mask`` (None = everything visible). Rows with no visible key return zeros.
    scale: logit scale, default ``1/sqrt(D)``.
    implementation: "xla", "cudnn", "pallas" or None (best available, see ``best_implementation``).
  """
  _check_shapes(q, k, v)
  if implementation is not None and implementation not in _REGISTRY:
    raise ValueError(f"unknown attention implementation {implementation!r}; choose one of {IMPLEMENTATIONS} or None")
  if mask is not None and not isinstance(mask, masks_lib.Mask):
    raise TypeError(
      f"mask must be a cinema_jax.attention.masks.Mask or None, got {type(mask).__name__}; "
      "wrap a boolean array in masks.DenseMask"
    )
  if scale is None:
    scale = q.shape[-1] ** -0.5
  name = implementation or best_implementation(q, mask)
  return _REGISTRY[name](q, k, v, mask, scale)


def config_tiles(attention: Any) -> Tiles | None:
  """The Pallas tiles of a config's ``attention`` section (``block_q``, ``block_kv``, ``block_q_bwd``,
  ``block_kv_bwd``), checked; None when unset (each backend's defaults, ``cinema_kernels.DEFAULT_BLOCK_SIZES``)."""
  names = ("block_q", "block_kv", "block_q_bwd", "block_kv_bwd")
  values = tuple(attention.get(name) for name in names)
  if all(v is None for v in values):
    return None
  for name, value in zip(names[:2], values[:2], strict=True):
    if value is None:
      raise ValueError(f"attention.{name} is unset while other attention tiles are set: give block_q and block_kv")
  from cinema_kernels import BlockSizes  # Pallas imports only when tiles are asked for

  BlockSizes(*values)  # raises naming the field that is not a positive multiple of 8
  return values


@contextlib.contextmanager
def kernel_tiles(tiles: Tiles | None) -> Iterator[None]:
  """Pallas kernels traced inside use ``tiles`` (None: the backend's defaults); models enter it around their body."""
  if tiles is None:
    yield
    return
  from cinema_kernels import use_block_sizes

  with use_block_sizes(*tiles):
    yield
