"""Entry points: block-sparse attention with a custom VJP, per backend, optionally under ``jax.shard_map``.

Letters: B batch, L length (Lq queries, Lkv keys/values), H heads, D head dim.

``block_sparse_attention(q, k, v, mask)`` takes the model layout [B, L, H, D], builds the ``KernelMask`` (or takes a
prepared one), pads the lengths to the tiles, and runs the forward kernel of the flavour; its VJP runs the dq and dk/dv
kernels over the same tile lists. Flavours:

* ``"mosaic_tpu"``: Pallas Mosaic TPU (scalar-prefetched lists driving the BlockSpec pipeline). On CPU the same
  kernels run in interpret mode; that is how the tests run them.
* ``"mosaic_gpu"``: Pallas Mosaic GPU for Hopper (and newer) GPUs: warp-specialised TMA + WGMMA kernels whose
  producer warpgroup follows the tile lists. Inputs outside their scope (float32, stored dense tiles, other tiles)
  run the Triton kernels. On CPU, ``interpret=True`` runs them in ``mosaic_gpu_interpret``.
* ``"triton"``: Pallas with the Triton lowering, for older NVIDIA GPUs and as the fallback above (documented: the
  Triton lowering is deprecated in JAX 0.11 in favour of Mosaic GPU; see docs/kernels.md).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from cinema_jax.attention import masks as masks_lib
from cinema_kernels import _compat, metadata, mosaic_gpu, mosaic_tpu, triton_gpu
from cinema_kernels.blocks import BlockSizes, default_block_sizes
from cinema_kernels.metadata import KernelMask

FLAVOURS = ("mosaic_tpu", "mosaic_gpu", "triton")
_MODULES = {"mosaic_tpu": mosaic_tpu, "mosaic_gpu": mosaic_gpu, "triton": triton_gpu}
_NATIVE = {"mosaic_tpu": "tpu", "mosaic_gpu": "gpu", "triton": "gpu"}


def _is_hopper_or_newer() -> bool:
  cc = getattr(jax.devices()[0], "compute_capability", None)
  try:
    return cc is not None and int(str(cc).split(".")[0]) >= 9
  except ValueError:
    return False


@dataclasses.dataclass(frozen=True)
class _Options:
  scale: float
  flavour: str
  interpret: bool


def resolve_flavour(flavour: str | None = None, interpret: bool | None = None) -> tuple[str, bool]:
  """(flavour, interpret) for the default backend: TPU -> mosaic_tpu, Hopper (and newer) GPUs -> mosaic_gpu, older
  GPUs -> triton, CPU -> mosaic_tpu interpreted.

  ``interpret=False`` off the flavour's accelerator is allowed so that ``jax.export`` can lower for another platform.
  """
  backend = jax.default_backend()
  if flavour is None:
    if backend == "gpu":
      flavour = "mosaic_gpu" if _is_hopper_or_newer() else "triton"
    else:
      flavour = "mosaic_tpu"
  if flavour not in FLAVOURS:
    raise ValueError(f"unknown kernel flavour {flavour!r}; choose one of {FLAVOURS}")
  if interpret is None:
    interpret = backend != _NATIVE[flavour]
  return flavour, bool(interpret)


def resolve_block_sizes(block_sizes: BlockSizes | None, flavour: str, interpret: bool) -> BlockSizes:
  if block_sizes is not None:
    return block_sizes
  # The Mosaic GPU kernels' structure follows their tiles (consumer warpgroups of 64 rows): interpreted, they keep them.
  on_cpu = interpret and jax.default_backend() == "cpu" and flavour != "mosaic_gpu"
  return default_block_sizes("interpret" if on_cpu else flavour)


def _check_inputs(q: jax.Array, k: jax.Array, v: jax.Array, flavour: str) -> None:
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"block_sparse_attention: {name} must be [B, L, H, D], got shape {tuple(x.shape)}")
  if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(
      f"block_sparse_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must agree on B, H, D "
      "(and k, v on L)"
    )
  if not (q.dtype == k.dtype == v.dtype):
    raise TypeError(f"block_sparse_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
  if q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    raise TypeError(f"block_sparse_attention takes float32, bfloat16 or float16, got {q.dtype}")
  d = q.shape[-1]
  if flavour in ("triton", "mosaic_gpu") and (d < 16 or d & (d - 1)):
    raise ValueError(f"block_sparse_attention ({flavour}): head dim must be a power of two >= 16, got {d}")


def _pad(x: jax.Array, length: int) -> jax.Array:
  if x.shape[1] == length:
    return x
  return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q: jax.Array, k: jax.Array, v: jax.Array, km: KernelMask, opts: _Options) -> jax.Array:
  return _attention_fwd(q, k, v, km, opts)[0]


def _attention_fwd(q, k, v, km, opts):
  out, lse, _ = _MODULES[opts.flavour].forward(q, k, v, km, opts.scale, interpret=opts.interpret)
  return out, (q, k, v, out, lse, km)


def _attention_bwd(opts, res, do):
  q, k, v, out, lse, km = res
  dq, dk, dv, _ = _MODULES[opts.flavour].backward(q, k, v, out, lse, do, km, opts.scale, interpret=opts.interpret)
  return dq, dk, dv, jax.tree.map(lambda _: None, km)


_attention.defvjp(_attention_fwd, _attention_bwd)


def prepare_mask(
  mask: masks_lib.Mask | None,
  q: jax.Array,
  k: jax.Array,
  *,
  block_sizes: BlockSizes | None = None,
  flavour: str | None = None,
  interpret: bool | None = None,
) -> KernelMask:
  """The ``KernelMask`` for these inputs; build it once (outside ``jit``) to reuse across calls and layers."""
  flavour, interpret = resolve_flavour(flavour, interpret)
  sizes = resolve_block_sizes(block_sizes, flavour, interpret)
  return metadata.prepare(mask, q.shape[0], q.shape[1], k.shape[1], sizes)


def block_sparse_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  mask: masks_lib.Mask | None = None,
  *,
  scale: float | None = None,
  block_sizes: BlockSizes | None = None,
  flavour: str | None = None,
  interpret: bool | None = None,
  kernel_mask: KernelMask | None = None,
) -> jax.Array:
  """Masked softmax attention over [B, L, H, D] inputs that computes only the non-empty tiles of ``mask``.

  Same contract as ``cinema_jax.attention.dot_product_attention``: ``scale`` defaults to ``1/sqrt(D)``, a query
  row that sees no key returns zeros (and passes no gradient). Differentiable in q, k, v.

  Args:
    mask: a ``masks.Mask`` (None = everything visible); ignored when ``kernel_mask`` is given.
    block_sizes: tile sizes (default: ``use_block_sizes`` override, else the flavour's defaults).
    flavour: "mosaic_tpu" or "triton" (default: from the backend).
    interpret: run the Pallas interpreter (default: True on CPU).
    kernel_mask: a ``prepare_mask`` result for the same shapes.
  """
  flavour, interpret = resolve_flavour(flavour, interpret)
  _check_inputs(q, k, v, flavour)
  if kernel_mask is None:
    kernel_mask = prepare_mask(mask, q, k, block_sizes=block_sizes, flavour=flavour, interpret=interpret)
  km = kernel_mask
  if (km.q_len, km.kv_len) != (q.shape[1], k.shape[1]) or km.batch != q.shape[0]:
    raise ValueError(
      f"kernel_mask was prepared for B={km.batch}, Lq={km.q_len}, Lkv={km.kv_len}; inputs have "
      f"B={q.shape[0]}, Lq={q.shape[1]}, Lkv={k.shape[1]}"
    )
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  opts = _Options(scale=scale, flavour=flavour, interpret=interpret)
  out = _attention(_pad(q, km.q_pad), _pad(k, km.kv_pad), _pad(v, km.kv_pad), km, opts)
  return out[:, : q.shape[1]]


@dataclasses.dataclass(frozen=True)
class TileVisits:
  """Tiles each kernel computed: ``fwd``/``dq`` [B, H, query blocks], ``dkv`` [B, H, key blocks]."""

  fwd: jax.Array
  dq: jax.Array
  dkv: jax.Array
  kernel_mask: KernelMask


def tile_visits(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  mask: masks_lib.Mask | None = None,
  *,
  block_sizes: BlockSizes | None = None,
  flavour: str | None = None,
  interpret: bool | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array], TileVisits]:
  """Runs the forward and backward kernels once with visit counters (for tests and debugging).

  Returns (out, (dq, dk, dv) for an all-ones output cotangent, visits).
  """
  flavour, interpret = resolve_flavour(flavour, interpret)
  _check_inputs(q, k, v, flavour)
  km = prepare_mask(mask, q, k, block_sizes=block_sizes, flavour=flavour, interpret=interpret)
  mod = _MODULES[flavour]
  scale = q.shape[-1] ** -0.5
  qp, kp, vp = _pad(q, km.q_pad), _pad(k, km.kv_pad), _pad(v, km.kv_pad)
  out, lse, fwd_visits = mod.forward(qp, kp, vp, km, scale, interpret=interpret, count_visits=True)
  do = jnp.ones_like(out)
  dq, dk, dv, (dq_visits, dkv_visits) = mod.backward(
    qp, kp, vp, out, lse, do, km, scale, interpret=interpret, count_visits=True
  )
  lq, lkv = q.shape[1], k.shape[1]
  grads = (dq[:, :lq], dk[:, :lkv], dv[:, :lkv])
  return out[:, :lq], grads, TileVisits(fwd_visits, dq_visits, dkv_visits, km)


def sharded_block_sparse_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  mask: masks_lib.Mask | None = None,
  *,
  mesh: Any = None,
  batch_axes: Sequence[str] = (),
  head_axes: Sequence[str] = (),
  scale: float | None = None,
  block_sizes: BlockSizes | None = None,
  flavour: str | None = None,
  interpret: bool | None = None,
) -> jax.Array:
  """``block_sparse_attention`` inside ``jax.shard_map``: batch split over ``batch_axes``, heads over ``head_axes``.

  A ``pallas_call`` is opaque to the SPMD partitioner, so under ``jit`` on a mesh the kernel runs per shard: each
  device attends its own samples and heads (attention is independent across both). The mask's tile lists and ids are
  split over the batch with the inputs. Lengths are not split (every device holds whole sequences of its heads).
  ``mesh`` defaults to the one set by ``jax.set_mesh``.
  """
  flavour, interpret = resolve_flavour(flavour, interpret)
  _check_inputs(q, k, v, flavour)
  mesh = _compat.abstract_mesh() if mesh is None else mesh
  batch_axes, head_axes = tuple(batch_axes), tuple(head_axes)
  if mesh is None or mesh.empty or not (batch_axes or head_axes):
    return block_sparse_attention(
      q, k, v, mask, scale=scale, block_sizes=block_sizes, flavour=flavour, interpret=interpret
    )
  for axes, dim, what in ((batch_axes, q.shape[0], "batch"), (head_axes, q.shape[2], "heads")):
    size = 1
    for a in axes:
      size *= mesh.shape[a]
    if dim % size:
      raise ValueError(f"sharded_block_sparse_attention: {what} {dim} is not divisible by mesh axes {axes} ({size})")
  km = prepare_mask(mask, q, k, block_sizes=block_sizes, flavour=flavour, interpret=interpret)
  bspec = batch_axes or None
  hspec = head_axes or None
  x_spec = P(bspec, None, hspec, None)
  opts = _Options(scale=q.shape[-1] ** -0.5 if scale is None else float(scale), flavour=flavour, interpret=interpret)

  def local(q_, k_, v_, km_):
    out = _attention(_pad(q_, km_.q_pad), _pad(k_, km_.kv_pad), _pad(v_, km_.kv_pad), km_, opts)
    return out[:, : q_.shape[1]]

  fn = _compat.shard_map(
    local, mesh=mesh, in_specs=(x_spec, x_spec, x_spec, km.batch_axis_specs(bspec)), out_specs=x_spec
  )
  return fn(q, k, v, km)
