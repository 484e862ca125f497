"""The kernels lower for their accelerators: ``jax.export`` runs the Pallas -> Mosaic TPU and Pallas -> Triton
lowerings on this machine, without a TPU or GPU.

This catches block shapes, dtypes and primitives that a backend does not support before any hardware run (the final
compilation, e.g. Triton -> PTX or Mosaic's layout passes, still happens on the device).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import cinema_kernels as ck
from cinema_jax.attention import masks

PLATFORMS = {"mosaic_tpu": "tpu", "triton": "cuda"}


def export_or_skip(fn, *args, platform, checks=()):
  """``jax.export`` for ``platform``; skipped where this JAX lowers Triton kernels only with a GPU present (0.11)."""
  try:
    return export.export(jax.jit(fn), platforms=[platform], disabled_checks=list(checks))(*args)
  except RuntimeError as e:
    if "No supported GPU devices found" not in str(e):
      raise
    pytest.skip(f"jax {jax.__version__} lowers Triton kernels only where a GPU is present")


def _lower(flavour, fn, *args):
  checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")] if flavour == "triton" else []
  return export_or_skip(fn, *args, platform=PLATFORMS[flavour], checks=checks).mlir_module()


@pytest.mark.parametrize("flavour", ["mosaic_tpu", "triton"])
@pytest.mark.parametrize(
  "case",
  [
    ("ids", jnp.bfloat16, 128),  # segment & block-causal from ids, the models' layout
    ("dense", jnp.float32, 64),  # stored partial tiles
    ("traced", jnp.bfloat16, 64),  # ids traced inside jit: in-graph summaries, full-length lists
  ],
  ids=lambda c: c[0] if isinstance(c, tuple) else c,
)
def test_forward_and_backward_lower(flavour, case):
  kind, dtype, d = case
  b, length, h = 1, 512, 2
  spec = jax.ShapeDtypeStruct((b, length, h, d), dtype)
  sizes = ck.default_block_sizes(flavour)
  seg = np.repeat(np.arange(4), length // 4).astype(np.int32)
  if kind == "ids":
    mask_of = lambda _: masks.SegmentMask(seg) & masks.BlockCausalMask(np.arange(length) // 128)  # noqa: E731
  elif kind == "dense":
    mask_of = lambda _: masks.DenseMask(np.tril(np.ones((length, length), bool)))  # noqa: E731
  else:
    mask_of = lambda ids: masks.SegmentMask(ids) | masks.BlockCausalMask(ids)  # noqa: E731

  def fwd(q, k, v, ids):
    return ck.block_sparse_attention(q, k, v, mask_of(ids), flavour=flavour, interpret=False, block_sizes=sizes)

  def loss(q, k, v, ids):
    return jax.grad(lambda q, k, v: fwd(q, k, v, ids).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)

  ids = jax.ShapeDtypeStruct((b, length), jnp.int32)
  text = _lower(flavour, fwd, spec, spec, spec, ids)
  assert "block_sparse_attention_fwd" in text
  text = _lower(flavour, loss, spec, spec, spec, ids)
  assert "block_sparse_attention_dq" in text and "block_sparse_attention_dkv" in text
