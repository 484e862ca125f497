"""The Mosaic GPU (Hopper) kernels: lowering on any machine, numerics against XLA on a Hopper GPU.

JAX's Mosaic GPU interpreter cannot run these kernels (no ``run_state``, layout casts or transposed WGMMA operands), so
on the CPU the tests lower forward and backward for CUDA with ``jax.export`` (the whole Pallas -> Mosaic GPU lowering
runs here; the final PTX compilation happens on the device) and check which inputs fall back to the Triton kernels.
On a Hopper GPU the compiled kernels are compared with XLA attention in float32: outputs and dq, dk, dv within
2e-2 (bf16/f16 inputs), exact zeros on rows that see nothing.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import cinema_kernels as ck
from cinema_jax.attention import masks
from cinema_jax.bench.attention import benchmark_mask
from cinema_kernels import mosaic_gpu
from tests.test_kernels import grads, kernel_masks, make_qkv, rel_err, xla

SIZES = ck.default_block_sizes("mosaic_gpu")


def _is_hopper():
  if jax.default_backend() != "gpu":
    return False
  cc = getattr(jax.devices()[0], "compute_capability", "0")
  return int(str(cc).split(".")[0]) >= 9


needs_hopper = pytest.mark.skipif(not _is_hopper(), reason="needs an NVIDIA Hopper (or newer) GPU")


def _targets(fn, *specs):
  triton = "__gpu$xla.gpu.triton"
  checks = [export.DisabledSafetyCheck.custom_call(triton)]
  text = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*specs).mlir_module()
  return text.count("custom_call @mosaic_gpu"), text.count(f"custom_call @{triton}")


def _mask_of(kind, length):
  seg = np.repeat(np.arange(4), -(-length // 4))[:length].astype(np.int32)
  if kind == "none":
    return lambda _: None
  if kind == "ids":  # keyframe segments or frame block-causal, the MM-DiT's hybrid layout, with padding
    keep = np.arange(length) < length - 37
    return lambda _: (
      (masks.SegmentMask(seg) | masks.BlockCausalMask(np.arange(length) // 100)) & masks.padding_mask(keep)
    )
  return lambda ids: masks.SegmentMask(ids) | masks.BlockCausalMask(ids)  # traced: in-graph summaries


@pytest.mark.parametrize("case", [("none", jnp.float16, 64), ("ids", jnp.bfloat16, 128), ("traced", jnp.bfloat16, 64)])
def test_forward_and_backward_lower_to_mosaic_gpu(case):
  kind, dtype, d = case
  b, length, h = 1, 1000, 2  # not a multiple of the tiles: padded
  spec = jax.ShapeDtypeStruct((b, length, h, d), dtype)
  ids = jax.ShapeDtypeStruct((b, length), jnp.int32)
  mask_of = _mask_of(kind, length)

  def fwd(q, k, v, ids):
    return ck.block_sparse_attention(q, k, v, mask_of(ids), flavour="mosaic_gpu", interpret=False)

  def loss(q, k, v, ids):
    return jax.grad(lambda q, k, v: fwd(q, k, v, ids).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)

  assert _targets(fwd, spec, spec, spec, ids) == (1, 0)
  assert _targets(loss, spec, spec, spec, ids) == (3, 0)  # forward, dq, dk/dv


def test_inputs_outside_the_scope_run_the_triton_kernels():
  length = 256
  f32 = jax.ShapeDtypeStruct((1, length, 2, 64), jnp.float32)
  bf16 = jax.ShapeDtypeStruct((1, length, 2, 64), jnp.bfloat16)
  dense = masks.DenseMask(np.tril(np.ones((length, length), bool)))

  def run(mask=None, sizes=None):
    return lambda q, k, v: ck.block_sparse_attention(
      q, k, v, mask, flavour="mosaic_gpu", interpret=False, block_sizes=sizes
    )

  assert _targets(run(), f32, f32, f32) == (0, 1)  # float32: no 16-bit WGMMA
  assert _targets(run(dense), bf16, bf16, bf16) == (0, 1)  # stored dense tiles
  assert _targets(run(None, ck.BlockSizes(64, 64)), bf16, bf16, bf16) == (0, 1)  # forward needs 128-row tiles
  assert _targets(run(), bf16, bf16, bf16) == (1, 0)


def test_interpret_mode_is_refused_with_a_reason():
  q, k, v = make_qkv(0, 1, 128, 128, 1, 64, jnp.bfloat16)
  with pytest.raises(NotImplementedError, match="no CPU interpret mode"):
    ck.block_sparse_attention(q, k, v, None, flavour="mosaic_gpu", interpret=True)


def test_scope():
  q = jnp.zeros((1, 256, 2, 128), jnp.bfloat16)
  km = ck.prepare_mask(None, q, q, block_sizes=SIZES, flavour="mosaic_gpu", interpret=False)
  assert mosaic_gpu.supports(q, km)
  assert not mosaic_gpu.supports(q.astype(jnp.float32), km)
  assert not mosaic_gpu.supports(jnp.zeros((1, 256, 2, 32), jnp.bfloat16), km)


# ------------------------------------------------------------------------------------------------ on a Hopper GPU


def _check(q, k, v, mask, tol=2e-2):
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  ours = lambda q, k, v: ck.block_sparse_attention(q, k, v, mask, flavour="mosaic_gpu")  # noqa: E731
  out = ours(q, k, v)
  ref = xla(*f32, mask)
  assert rel_err(out, ref) < tol
  if mask is not None:
    lq, lkv = q.shape[1], k.shape[1]
    dense = np.broadcast_to(np.asarray(mask.to_dense(lq, lkv)), (q.shape[0], lq, lkv))
    blind = ~dense.any(-1)
    assert np.all(np.asarray(out.astype(jnp.float32))[blind] == 0)
  g = grads(ours, q, k, v)
  g_ref = grads(lambda q, k, v: xla(q, k, v, mask), *f32)
  for name, a, r in zip("qkv", g, g_ref, strict=True):
    assert np.all(np.isfinite(np.asarray(a, np.float32))), name
    assert rel_err(a, r) < tol, name


@needs_hopper
@pytest.mark.parametrize("name", ["segment_random", "block_causal", "hybrid", "goldenmem", "full"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_matches_xla_on_the_mask_zoo(name, dtype, rng):
  b, length = 2, 600  # padded to 640: partial tiles check positions
  mask = kernel_masks(rng, length, b)[name]
  q, k, v = make_qkv(1, b, length, length, 2, 64, dtype)
  _check(q, k, v, mask)


@needs_hopper
@pytest.mark.parametrize("name", ["dense", "8-segment", "frame-causal", "goldenmem"])
def test_matches_xla_on_the_benchmark_masks_head_dim_128(name):
  length = 2048
  mask = benchmark_mask(name, length)
  q, k, v = make_qkv(2, 1, length, length, 4, 128, jnp.bfloat16)
  _check(q, k, v, mask)


@needs_hopper
def test_dispatcher_picks_mosaic_gpu_on_hopper():
  assert ck.resolve_flavour() == ("mosaic_gpu", False)
