"""Masks: literal expected masks, and block summaries equal to the tiling of ``to_dense`` for every mask kind."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cinema_jax.attention import masks


def tile_reference(dense: np.ndarray, bq: int, bkv: int) -> np.ndarray:
  """Classify each (bq, bkv) tile of a dense mask by looking at it; ragged edge tiles hold what exists."""
  dense = np.asarray(dense)
  lq, lkv = dense.shape[-2:]
  nq, nk = -(-lq // bq), -(-lkv // bkv)
  out = np.zeros(dense.shape[:-2] + (nq, nk), np.int8)
  for i, j in itertools.product(range(nq), range(nk)):
    tile = dense[..., i * bq : (i + 1) * bq, j * bkv : (j + 1) * bkv]
    out[..., i, j] = np.where(tile.all(axis=(-2, -1)), 2, np.where(tile.any(axis=(-2, -1)), 1, 0))
  return out


def contiguous_segments(rng, length, num_segments, pad):
  """Sorted segment ids (keyframe-like layout) with ``pad`` trailing padding tokens (id -1)."""
  cuts = np.sort(rng.choice(np.arange(1, length - pad), num_segments - 1, replace=False))
  ids = np.zeros(length, np.int32)
  for c in cuts:
    ids[c:] += 1
  ids[length - pad :] = -1
  return ids


def random_masks(rng, lq, lkv, batch=None):
  """A zoo of masks of every kind at the given lengths."""
  shape_q = (lq,) if batch is None else (batch, lq)
  shape_kv = (lkv,) if batch is None else (batch, lkv)
  zoo = {}
  seg_q = rng.integers(-1, 4, shape_q).astype(np.int32)  # non-contiguous ids with padding
  seg_kv = rng.integers(-1, 4, shape_kv).astype(np.int32)
  zoo["segment_random"] = masks.SegmentMask(seg_q, seg_kv)
  if lq == lkv and batch is None:
    zoo["segment_contiguous"] = masks.SegmentMask(contiguous_segments(rng, lq, 5, 3))
  bc_q = np.sort(rng.integers(0, 6, shape_q), axis=-1).astype(np.int32)
  bc_kv = np.sort(rng.integers(0, 6, shape_kv), axis=-1).astype(np.int32)
  bc_kv[..., -2:] = -1
  zoo["block_causal"] = masks.BlockCausalMask(bc_q, bc_kv)
  zoo["block_causal_random"] = masks.BlockCausalMask(
    rng.integers(-1, 6, shape_q).astype(np.int32), rng.integers(-1, 6, shape_kv).astype(np.int32)
  )
  dense = rng.random((lq, lkv)) < 0.3
  dense[: lq // 3, : lkv // 3] = True  # a full region, so FULL tiles occur
  dense[lq // 2 :, lkv // 2 :] = False  # and an empty one
  zoo["dense"] = masks.DenseMask(dense)
  zoo["full"] = masks.FullMask()
  zoo["segment&causal"] = zoo["segment_random"] & zoo["block_causal"]
  zoo["segment|dense"] = zoo["segment_random"] | zoo["dense"]
  zoo["(segment&causal)|dense"] = zoo["segment&causal"] | zoo["dense"]
  zoo["full&causal"] = zoo["full"] & zoo["block_causal"]
  zoo["full|segment"] = zoo["full"] | zoo["segment_random"]
  zoo["causal&dense&segment"] = zoo["block_causal_random"] & zoo["dense"] & zoo["segment_random"]
  if batch is not None:  # per-sample ids combined with masks shared by the batch
    shared = masks.BlockCausalMask(
      np.sort(rng.integers(0, 6, lq)).astype(np.int32), np.sort(rng.integers(0, 6, lkv)).astype(np.int32)
    )
    zoo["per_sample&shared"] = zoo["segment_random"] & shared
    zoo["per_sample|shared"] = zoo["segment_random"] | shared
  return zoo


def test_hybrid_keyframe_layout_literal():
  # Two keyframes, Flux joint layout [caption_1, caption_2, image_1, image_1, image_2, image_2].
  seg = np.array([0, 1, 0, 0, 1, 1])
  local = masks.SegmentMask(seg)
  expected_local = np.array(
    [
      [1, 0, 1, 1, 0, 0],
      [0, 1, 0, 0, 1, 1],
      [1, 0, 1, 1, 0, 0],
      [1, 0, 1, 1, 0, 0],
      [0, 1, 0, 0, 1, 1],
      [0, 1, 0, 0, 1, 1],
    ],
    bool,
  )
  np.testing.assert_array_equal(local.to_dense(), expected_local)
  causal = masks.BlockCausalMask(seg)  # keyframe k sees keyframes <= k
  expected_causal = np.array(
    [
      [1, 0, 1, 1, 0, 0],
      [1, 1, 1, 1, 1, 1],
      [1, 0, 1, 1, 0, 0],
      [1, 0, 1, 1, 0, 0],
      [1, 1, 1, 1, 1, 1],
      [1, 1, 1, 1, 1, 1],
    ],
    bool,
  )
  np.testing.assert_array_equal(causal.to_dense(), expected_causal)
  # Padding (id -1) sees nothing and is seen by nothing.
  padded = masks.SegmentMask(np.array([0, 0, -1]))
  np.testing.assert_array_equal(padded.to_dense(), [[1, 1, 0], [1, 1, 0], [0, 0, 0]])
  np.testing.assert_array_equal(masks.padding_mask(np.array([True, True, False])).to_dense(), padded.to_dense())


def test_summary_literal():
  seg = masks.SegmentMask(np.array([0, 0, 0, 1, 1, 1, 2, 2, -1]))
  np.testing.assert_array_equal(seg.block_summary(3, 3), [[2, 0, 0], [0, 2, 0], [0, 0, 1]])
  np.testing.assert_array_equal(seg.block_summary(4, 4), [[1, 1, 0], [1, 1, 0], [0, 0, 0]])


@pytest.mark.parametrize(
  "lq,lkv,bq,bkv", [(32, 32, 8, 8), (37, 53, 8, 16), (53, 37, 16, 8), (29, 29, 5, 7), (64, 48, 16, 16), (7, 9, 16, 16)]
)
def test_block_summary_equals_tiling_of_dense(lq, lkv, bq, bkv):
  rng = np.random.default_rng(lq * 1000 + lkv * 10 + bq)
  for name, mask in random_masks(rng, lq, lkv).items():
    dense = np.asarray(mask.to_dense(lq, lkv))
    got = mask.block_summary(bq, bkv, q_len=lq, kv_len=lkv)
    assert got.dtype == np.int8
    np.testing.assert_array_equal(got, tile_reference(dense, bq, bkv), err_msg=name)


def test_block_summary_per_sample_ids():
  rng = np.random.default_rng(3)
  lq, lkv, batch = 30, 26, 3
  for name, mask in random_masks(rng, lq, lkv, batch=batch).items():
    dense = np.asarray(mask.to_dense(lq, lkv))
    got = mask.block_summary(8, 4, q_len=lq, kv_len=lkv)
    ref = tile_reference(np.broadcast_to(dense, (batch, lq, lkv)) if mask.batch_size else dense, 8, 4)
    np.testing.assert_array_equal(got, ref, err_msg=name)
    assert (got.ndim == 3) == (mask.batch_size is not None), name


def test_all_summary_kinds_occur():
  # Guards the zoo itself: the equality test above is only meaningful if empty, partial and full tiles all appear.
  rng = np.random.default_rng(1)
  kinds = set()
  for mask in random_masks(rng, 64, 64).values():
    kinds |= set(np.unique(mask.block_summary(8, 8, q_len=64, kv_len=64)).tolist())
  assert kinds == {0, 1, 2}


def test_large_structured_summary_never_builds_dense(monkeypatch):
  # 64k tokens: a dense mask would be 4 GiB. The summaries come from ids and boundary tiles only.
  length = 65536
  frames = np.repeat(np.arange(length // 1024), 1024).astype(np.int32)
  mask = masks.BlockCausalMask(frames // 4) & masks.SegmentMask(frames // 16)

  def forbidden(*a, **k):
    raise AssertionError("to_dense called while summarising")

  monkeypatch.setattr(masks.Mask, "to_dense", forbidden)
  summary = mask.block_summary(512, 512)
  nb = length // 512
  assert summary.shape == (nb, nb)
  # Block q sees block k iff same 16-frame group and k's 4-frame block <= q's: count by ids.
  qb = np.arange(nb) * 512 // 1024
  expected = (qb[:, None] // 16 == qb[None, :] // 16) & (qb[None, :] // 4 <= qb[:, None] // 4)
  np.testing.assert_array_equal(summary == 2, expected)
  assert not (summary == 1).any()
  assert mask.density(block=512) == pytest.approx(expected.mean())


def test_to_dense_under_jit_with_traced_ids():
  ids = jnp.array([0, 0, 1, 1, -1], jnp.int32)

  @jax.jit
  def f(ids):
    return (masks.SegmentMask(ids) & masks.BlockCausalMask(ids)).to_dense()

  np.testing.assert_array_equal(f(ids), np.asarray(masks.SegmentMask(np.asarray(ids)).to_dense()))

  @jax.jit
  def g(ids):
    return masks.SegmentMask(ids).block_summary(2, 2)

  with pytest.raises(TypeError, match="concrete"):
    g(ids)


def test_density_literal():
  seg = masks.SegmentMask(np.array([0, 0, 0, 1, 1, 1, 2, 2, -1]))
  assert seg.density(block=2) == pytest.approx(22 / 81)


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match="q_len"):
    masks.FullMask().block_summary(4, 4)
  with pytest.raises(ValueError, match="kv_len=5 does not match"):
    masks.SegmentMask(np.zeros(4, np.int32)).to_dense(4, 5)
  with pytest.raises(ValueError, match="different q_len"):
    _ = masks.SegmentMask(np.zeros(4, np.int32)) & masks.SegmentMask(np.zeros(5, np.int32))
  with pytest.raises(TypeError, match="integers"):
    masks.SegmentMask(np.zeros(4, np.float32))
  with pytest.raises(ValueError, match=r"\[L\] or \[B, L\]"):
    masks.BlockCausalMask(np.zeros((1, 2, 3), np.int32))
  with pytest.raises(TypeError, match="boolean"):
    masks.DenseMask(np.zeros((3, 3), np.int32))
  with pytest.raises(ValueError, match="block_q"):
    masks.SegmentMask(np.zeros(4, np.int32)).block_summary(0, 4)
  with pytest.raises(TypeError, match="combine only with masks"):
    _ = masks.FullMask() & np.ones((2, 2), bool)
  with pytest.raises(ValueError, match="batch size"):
    masks.SegmentMask(np.zeros((2, 4), np.int32), np.zeros((3, 4), np.int32))
