"""The block-sparse Pallas kernel (CPU interpret mode) against XLA attention, its tile bookkeeping and its skipping.

Interpret mode is slow, so sizes are tiny: L <= 160, tiles 16 x 32, two heads. On a GPU or TPU the same tests run the
compiled kernels (the flavour follows the backend).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import cinema_kernels as ck
from cinema_jax.attention import best_implementation, dot_product_attention, masks
from cinema_jax.bench.attention import benchmark_mask, goldenmem_frame_ids
from cinema_jax.parallel import DEFAULT_RULES, make_mesh, mesh_context
from cinema_kernels import metadata
from tests.test_masks import random_masks

SIZES = ck.BlockSizes(16, 32)
ON_CPU = jax.default_backend() == "cpu"
needs_8_devices = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py fakes them)")


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def make_qkv(seed, b, lq, lkv, h, d, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (b, lq, h, d), dtype)
  k = jax.random.normal(keys[1], (b, lkv, h, d), dtype)
  v = jax.random.normal(keys[2], (b, lkv, h, d), dtype)
  return q, k, v


def xla(q, k, v, mask):
  return dot_product_attention(q, k, v, mask=mask, implementation="xla")


def ours(q, k, v, mask, **kw):
  kw.setdefault("block_sizes", SIZES)
  return ck.block_sparse_attention(q, k, v, mask, **kw)


def grads(fn, q, k, v):
  """Gradients of a non-trivial scalar of the output (every output element gets its own cotangent)."""
  w = jax.random.normal(jax.random.key(99), q.shape[:3] + (v.shape[-1],), jnp.float32)
  return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w), argnums=(0, 1, 2))(q, k, v)


def kernel_masks(rng, length, batch):
  """The acceptance zoo: random segments, block-causal, hybrid, GoldenMem-shaped, dense; with padding rows."""
  seg = rng.integers(0, 3, (batch, length)).astype(np.int32)  # random (non-contiguous) segments
  seg[0, 5:12] = -1  # padding: fully masked rows and columns
  frames = np.arange(length, dtype=np.int32) // 13  # frame blocks not aligned with the tiles
  keyframe = np.sort(rng.integers(0, 4, (batch, length)), axis=-1).astype(np.int32)
  keyframe[1, -9:] = -1  # per-sample padding at the end
  dense = rng.random((batch, length, length)) < 0.35
  dense[:, : length // 3, : length // 3] = True  # full tiles
  dense[:, length // 2 :, length // 2 :] = False  # empty tiles
  dense[0, 3] = False  # a row that sees nothing
  return {
    "segment_random": masks.SegmentMask(seg),
    "block_causal": masks.BlockCausalMask(frames),
    "hybrid": (masks.SegmentMask(keyframe) | masks.BlockCausalMask(frames)) & masks.padding_mask(keyframe >= 0),
    "goldenmem": masks.BlockCausalMask(goldenmem_frame_ids(length)),
    "dense": masks.DenseMask(dense),
    "full": None,
  }


# ------------------------------------------------------------------------------------------------------- metadata


def test_tile_lists_hand_computed():
  summary = np.array([[[2, 0, 1, 2], [0, 0, 0, 0], [1, 1, 0, 0]]], np.int8)  # [b=1, r=3, c=4]
  lists = metadata.tile_lists(summary)
  # Full tiles first, then partial; padded by repeating the last entry; an empty row lists block 0, count 0.
  np.testing.assert_array_equal(lists.index[0], [[0, 3, 2], [0, 0, 0], [0, 1, 1]])
  np.testing.assert_array_equal(lists.counts[0], [[2, 3], [0, 0], [0, 2]])
  transposed = metadata.tile_lists(np.swapaxes(summary, 1, 2))
  np.testing.assert_array_equal(transposed.index[0], [[0, 2], [2, 2], [0, 0], [0, 0]])
  np.testing.assert_array_equal(transposed.counts[0], [[1, 2], [0, 1], [0, 1], [1, 1]])
  # The traced (in-graph) compaction gives the same lists at full length.
  traced = jax.jit(lambda s: metadata.tile_lists(s, length=4))(jnp.asarray(summary))
  np.testing.assert_array_equal(np.asarray(traced.index)[0, :, :3], lists.index[0])
  np.testing.assert_array_equal(np.asarray(traced.counts), lists.counts)


def test_traced_summary_is_conservative_and_exact_for_contiguous_ids(rng):
  lq = lkv = 72
  for name, mask in random_masks(rng, lq, lkv).items():
    host = metadata.block_summary(mask, 2, lq, lkv, 16, 32)
    leaves = metadata._leaves(mask)
    arrays = [a for leaf in leaves for a in metadata._arrays_of(leaf)]

    def traced(*arrs, mask=mask):
      return metadata.block_summary(_replace_arrays(mask, arrs), 2, lq, lkv, 16, 32)

    got = np.asarray(jax.jit(traced)(*[jnp.asarray(a) for a in arrays]))
    assert np.all(got[host != masks.EMPTY] != masks.EMPTY), name  # never skips a tile with visible pairs
    assert np.all(host[got == masks.FULL] == masks.FULL), name  # never skips the mask of a partial tile
  # Contiguous ids (the models' layouts) are summarised exactly.
  seg = np.repeat(np.arange(5), [10, 20, 7, 25, 10]).astype(np.int32)
  for mask in (masks.SegmentMask(seg), masks.BlockCausalMask(seg), masks.SegmentMask(seg) & masks.BlockCausalMask(seg)):
    host = metadata.block_summary(mask, 1, 72, 72, 16, 16)
    got = jax.jit(lambda s, mask=mask: metadata.block_summary(_replace_arrays(mask, [s] * 4), 1, 72, 72, 16, 16))(
      jnp.asarray(seg)
    )
    np.testing.assert_array_equal(np.asarray(got), host)


def _replace_arrays(mask, arrays):
  """The same mask expression over other (e.g. traced) id arrays, in ``_leaves`` order."""
  it = iter(arrays)

  def rebuild(m):
    if isinstance(m, masks._Combined):
      return masks._Combined(m.op, tuple(rebuild(c) for c in m.children))
    if isinstance(m, masks.DenseMask):
      return masks.DenseMask(next(it))
    if isinstance(m, (masks.SegmentMask, masks.BlockCausalMask)):
      return type(m)(next(it), next(it))
    return m

  return rebuild(mask)


def test_ragged_tiles_are_partial_and_dense_tiles_are_stored_once():
  km = metadata.prepare(None, 1, 40, 40, SIZES)  # 40 = 2.5 x 16 = 1.25 x 32
  s = metadata.block_summary(masks.FullMask(), 1, 40, 40, 16, 32)
  np.testing.assert_array_equal(s[0], [[2, 1], [2, 1], [1, 1]])
  assert (km.q_pad, km.kv_pad) == (48, 64)
  # A causal DenseMask: every diagonal tile has the same element mask, stored once.
  causal = masks.DenseMask(np.tril(np.ones((64, 64), bool)))
  km = metadata.prepare(causal, 2, 64, 64, ck.BlockSizes(16, 16))
  assert km.blocks_fwd.shape == (1, 1, 16, 16)
  np.testing.assert_array_equal(km.blocks_fwd[0, 0], np.tril(np.ones((16, 16), np.int8)))
  np.testing.assert_array_equal(km.fwd.counts[0, :, 1], [1, 2, 3, 4])


# ---------------------------------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("name", ["segment_random", "block_causal", "hybrid", "goldenmem", "dense", "full"])
def test_forward_and_gradients_match_xla(name, rng):
  b, length = 2, 88  # not a multiple of the tiles: padded and masked
  mask = kernel_masks(rng, length, b)[name]
  q, k, v = make_qkv(1, b, length, length, 2, 64)
  ref = xla(q, k, v, mask)
  out = ours(q, k, v, mask)
  assert rel_err(out, ref) < 1e-5
  if mask is not None:
    dense = np.broadcast_to(np.asarray(mask.to_dense(length, length)), (b, length, length))
    blind = ~dense.any(-1)  # rows that see nothing return exact zeros
    assert blind.any() == (name in ("segment_random", "hybrid", "dense"))
    assert np.all(np.asarray(out)[blind] == 0)
  g_ref = grads(lambda q, k, v: xla(q, k, v, mask), q, k, v)
  g = grads(lambda q, k, v: ours(q, k, v, mask), q, k, v)
  for name_g, a, r in zip("qkv", g, g_ref, strict=True):
    assert rel_err(a, r) < 1e-4, name_g
  if name == "segment_random":  # padding rows and columns get no gradient
    assert np.all(np.asarray(g[0])[0, 5:12] == 0) and np.all(np.asarray(g[1])[0, 5:12] == 0)


def test_bf16_head_dim_128_and_cross_lengths(rng):
  q, k, v = make_qkv(2, 2, 72, 72, 2, 128, jnp.bfloat16)
  mask = kernel_masks(rng, 72, 2)["hybrid"]
  assert rel_err(ours(q, k, v, mask), xla(q, k, v, mask)) < 2e-2
  # Queries and keys of different lengths (cross-attention shaped), float32.
  q, k, v = make_qkv(3, 1, 40, 72, 2, 64)
  mask = masks.SegmentMask(np.arange(40) * 3 // 40, np.arange(72) * 3 // 72)
  assert rel_err(ours(q, k, v, mask), xla(q, k, v, mask)) < 1e-5
  assert rel_err(ours(q, k, v, None), xla(q, k, v, None)) < 1e-5


def test_gpu_kernels_in_interpret_mode(rng):
  """The Triton-lowered GPU kernels share the tile lists; their arithmetic is checked here through the interpreter."""
  b, length = 2, 72
  q, k, v = make_qkv(4, b, length, length, 2, 64)
  zoo = kernel_masks(rng, length, b)
  sizes = ck.BlockSizes(16, 32, 32, 16)  # different backward tiles
  for name in ("hybrid", "dense"):
    mask = zoo[name]
    fn = lambda q, k, v, mask=mask: ours(q, k, v, mask, flavour="triton", interpret=True, block_sizes=sizes)  # noqa: E731
    assert rel_err(fn(q, k, v), xla(q, k, v, mask)) < 1e-5
    for a, r in zip(grads(fn, q, k, v), grads(lambda q, k, v, m=mask: xla(q, k, v, m), q, k, v), strict=True):
      assert rel_err(a, r) < 1e-4


def test_traced_ids_under_jit(rng):
  """Ids that arrive as jit arguments (a batch's layout) get in-graph summaries; results and gradients still match."""
  b, length = 2, 72
  q, k, v = make_qkv(5, b, length, length, 2, 64)
  keyframe = np.sort(rng.integers(0, 3, (b, length)), axis=-1).astype(np.int32)
  keyframe[0, -10:] = -1

  def mask_of(seg):
    return masks.SegmentMask(seg) | masks.BlockCausalMask(seg)

  def loss(fn):
    return jax.jit(lambda q, k, v, seg: grads(lambda q, k, v: fn(q, k, v, mask_of(seg)), q, k, v))

  seg = jnp.asarray(keyframe)
  out = jax.jit(lambda q, k, v, seg: ours(q, k, v, mask_of(seg)))(q, k, v, seg)
  assert rel_err(out, xla(q, k, v, mask_of(keyframe))) < 1e-5
  for a, r in zip(loss(ours)(q, k, v, seg), loss(xla)(q, k, v, seg), strict=True):
    assert rel_err(a, r) < 1e-4


def test_reference_walk_matches_xla_and_counts_tiles(rng):
  b, length = 2, 88
  q, k, v = make_qkv(6, b, length, length, 2, 64)
  for name in ("hybrid", "dense", "goldenmem"):
    mask = kernel_masks(rng, length, b)[name]
    km = ck.prepare_mask(mask, q, k, block_sizes=SIZES)
    out, lse, visits = ck.reference_attention(q, k, v, km, 64**-0.5)
    assert rel_err(out, xla(q, k, v, mask)) < 1e-5
    summary = metadata.block_summary(mask, b, length, length, *SIZES.fwd)
    np.testing.assert_array_equal(np.asarray(visits), (summary != masks.EMPTY).sum(-1))
    assert np.isfinite(np.asarray(lse)).sum() > 0


# ------------------------------------------------------------------------------------------------------- skipping


@pytest.mark.parametrize("name", ["8-segment", "frame-causal", "goldenmem"])
def test_kernels_visit_exactly_the_non_empty_tiles(name):
  length, heads = 128, 2
  mask = benchmark_mask(name, length)
  q, k, v = make_qkv(7, 1, length, length, heads, 64)
  sizes = ck.BlockSizes(16, 32, 32, 16)
  out, (dq, dk, dv), visits = ck.tile_visits(q, k, v, mask, block_sizes=sizes)
  assert rel_err(out, xla(q, k, v, mask)) < 1e-5
  # tile_visits backpropagates an all-ones output cotangent.
  g = jax.grad(lambda q, k, v: xla(q, k, v, mask).sum(), argnums=(0, 1, 2))(q, k, v)
  for a, r in zip((dq, dk, dv), g, strict=True):
    assert rel_err(a, r) < 1e-4
  fwd = mask.block_summary(*sizes.fwd, q_len=length, kv_len=length)  # the masks' own (exact) summaries
  bwd = mask.block_summary(*sizes.bwd, q_len=length, kv_len=length)
  # Every head of every row visits exactly its non-empty tiles: empty tiles are never computed.
  np.testing.assert_array_equal(np.asarray(visits.fwd), np.broadcast_to((fwd != 0).sum(-1), (1, heads, fwd.shape[0])))
  np.testing.assert_array_equal(np.asarray(visits.dq), np.broadcast_to((bwd != 0).sum(-1), (1, heads, bwd.shape[0])))
  np.testing.assert_array_equal(np.asarray(visits.dkv), np.broadcast_to((bwd != 0).sum(0), (1, heads, bwd.shape[1])))
  assert int(np.asarray(visits.fwd).sum()) < heads * fwd.size  # and the masks do have empty tiles


# -------------------------------------------------------------------------------------------- dispatch, sharding


def test_dispatcher_runs_the_kernel(rng):
  q, k, v = make_qkv(8, 2, 72, 72, 2, 64)
  mask = kernel_masks(rng, 72, 2)["hybrid"]
  with ck.use_block_sizes(16, 32):
    out = dot_product_attention(q, k, v, mask=mask, implementation="pallas")
  assert rel_err(out, xla(q, k, v, mask)) < 1e-5
  if ON_CPU:
    assert best_implementation(q, mask) == "xla"  # interpret mode is for tests, XLA is the fast CPU path


@needs_8_devices
def test_shard_map_over_batch_and_heads_on_the_model_mesh(rng):
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  b, length, h = 4, 72, 4
  q, k, v = make_qkv(9, b, length, length, h, 64)
  keyframe = np.sort(rng.integers(0, 3, (b, length)), axis=-1).astype(np.int32)
  keyframe[2, -20:] = -1
  mask = masks.SegmentMask(keyframe) & masks.BlockCausalMask(np.arange(length) // 16)
  sharding = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))

  def loss(q, k, v):
    out = dot_product_attention(q, k, v, mask=mask, implementation="pallas")
    return jnp.sum(out * jnp.cos(out)), out

  with mesh_context(mesh, DEFAULT_RULES), ck.use_block_sizes(16, 32):
    qs, ks, vs = (jax.device_put(x, sharding) for x in (q, k, v))
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    assert "shard_map" in str(jax.make_jaxpr(fn)(qs, ks, vs))
    (_, out), g = fn(qs, ks, vs)
  ref_fn = jax.value_and_grad(
    lambda q, k, v: (lambda o: (jnp.sum(o * jnp.cos(o)), o))(xla(q, k, v, mask)), argnums=(0, 1, 2), has_aux=True
  )
  (_, ref), g_ref = ref_fn(q, k, v)
  assert rel_err(out, ref) < 1e-5
  for a, r in zip(g, g_ref, strict=True):
    assert rel_err(a, r) < 1e-4


# --------------------------------------------------------------------------------------------------------- errors


def test_errors_name_the_problem():
  q, k, v = make_qkv(10, 1, 32, 32, 2, 48)
  with pytest.raises(ValueError, match="power of two"):
    ck.block_sparse_attention(q, k, v, flavour="triton", interpret=True)
  with pytest.raises(ValueError, match="unknown kernel flavour"):
    ck.block_sparse_attention(q, k, v, flavour="cuda")
  with pytest.raises(ValueError, match="multiple of 8"):
    ck.BlockSizes(12, 32)
  km = ck.prepare_mask(None, q, k, block_sizes=SIZES)
  with pytest.raises(ValueError, match="kernel_mask was prepared for"):
    ck.block_sparse_attention(q[:, :16], k[:, :16], v[:, :16], kernel_mask=km)
  with pytest.raises(TypeError, match="dtypes differ"):
    ck.block_sparse_attention(q, k.astype(jnp.bfloat16), v)
  with pytest.raises(ValueError, match="per-sample ids for batch 3"):
    ck.block_sparse_attention(q, k, v, masks.SegmentMask(np.zeros((3, 32), np.int32)))
