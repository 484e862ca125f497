"""GoldenMem: pyramid sizes, the phi bound, exact area resize, positions, slot selection and packed token counts."""

import math

import numpy as np
import pytest

from cinema_jax.models import goldenmem as gm

PHI = (1 + math.sqrt(5)) / 2


def test_pyramid_sides_and_cost_by_hand():
  assert gm.pyramid_sides(25, 7) == [25, 15, 9, 5, 3, 2, 1]
  assert gm.pyramid_sides(25, 8) == [25, 15, 9, 5, 3, 2, 1, 0]
  assert gm.pyramid_sides(8, 5) == [8, 4, 3, 1, 1]
  assert gm.pyramid_sides(25, 0) == []
  # (625 + 225 + 81 + 25 + 9 + 4 + 1) / 625
  assert gm.context_cost([25, 15, 9, 5, 3, 2, 1]) == pytest.approx(970 / 625) == pytest.approx(1.552)
  assert gm.context_cost([(25, 44), (15, 27)]) == pytest.approx((25 * 44 + 15 * 27) / (25 * 44))
  assert gm.context_cost([3, 2], full=4) == pytest.approx(13 / 16)
  assert gm.pyramid_shapes(25, 44, 3) == [(25, 44), (15, 27), (9, 16)]
  with pytest.raises(ValueError, match="base_side must be a positive integer"):
    gm.pyramid_sides(0, 3)


def test_context_cost_stays_below_phi_for_any_history():
  for base in range(1, 65):
    for frames in (1, 2, 5, 7, 12, 40):
      assert gm.context_cost(gm.pyramid_sides(base, frames)) <= PHI + 1e-12, (base, frames)
  for h, w in [(25, 44), (64, 64), (9, 16)]:
    assert gm.context_cost(gm.pyramid_shapes(h, w, 30)) <= PHI


def test_area_weights_and_resize_by_hand():
  # 3 -> 2: each output cell covers 1.5 input cells.
  np.testing.assert_allclose(gm.area_weights(3, 2), [[2 / 3, 1 / 3, 0], [0, 1 / 3, 2 / 3]])
  np.testing.assert_allclose(gm.area_weights(4, 2), [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
  np.testing.assert_allclose(gm.area_weights(2, 2), np.eye(2))
  x = np.arange(16, dtype=np.float32).reshape(4, 4, 1)
  np.testing.assert_allclose(gm.area_resize(x, 2, 2)[..., 0], [[2.5, 4.5], [10.5, 12.5]])  # 2 x 2 block means
  r = np.random.default_rng(0)
  y = r.standard_normal((10, 14, 3)).astype(np.float32)
  small = gm.area_resize(y, 6, 8)
  assert small.shape == (6, 8, 3) and small.dtype == np.float32
  np.testing.assert_allclose(small.mean(axis=(0, 1)), y.mean(axis=(0, 1)), atol=1e-5)  # area averaging keeps the mean
  np.testing.assert_allclose(gm.area_resize(np.full((7, 5, 2), 3.0), 3, 2), 3.0)


def test_patchify_is_flux_packing():
  # Flux: "b c (h ph) (w pw) -> b (h w) (c ph pw)" on channels-first; ours takes channels-last latents.
  r = np.random.default_rng(1)
  lat = r.standard_normal((4, 6, 3)).astype(np.float32)  # [h*2, w*2, c]
  tokens = gm.patchify(lat, 2)
  assert tokens.shape == (2 * 3, 3 * 4)
  # Token (row 1, col 2) = pixels rows 2..3, cols 4..5; channel-major, then ph, then pw.
  expected = np.stack([lat[2 + i, 4 + j, c] for c in range(3) for i in range(2) for j in range(2)])
  np.testing.assert_array_equal(tokens[1 * 3 + 2], expected)
  np.testing.assert_array_equal(gm.unpatchify(tokens, 2, 3, 2), lat)


def test_select_memory_by_recency_and_similarity():
  assert gm.select_memory(10, 3) == [9, 8, 7]
  assert gm.select_memory(2, 7) == [1, 0]
  emb = np.array([[1, 0], [0, 1], [1, 1], [1, 0.1], [-1, 0]], np.float64)
  query = np.array([1.0, 0.0])
  # cos to the query: 1, 0, 0.707, 0.995, -1 -> order 0, 3, 2, 1, 4
  assert gm.select_memory(
    5, 3, selection="similarity", caption_embeddings=emb, query_embedding=query, keep_latest=False
  ) == [0, 3, 2]
  assert gm.select_memory(5, 3, selection="similarity", caption_embeddings=emb, query_embedding=query) == [4, 0, 3]
  with pytest.raises(ValueError, match="needs caption_embeddings"):
    gm.select_memory(5, 3, selection="similarity")
  with pytest.raises(ValueError, match="unknown memory selection 'nearest'"):
    gm.select_memory(5, 3, selection="nearest")


def test_pack_memory_token_counts_positions_and_order():
  r = np.random.default_rng(2)
  latents = [r.standard_normal((16, 16, 4)).astype(np.float32) for _ in range(10)]  # 8 x 8 tokens each
  packed = gm.pack_memory(latents, patch=2, max_memory=7)
  # Pyramid 8, 4, 3, 1, 1, 0, 0: five slots, newest largest, stored oldest first.
  assert packed.history_index == (5, 6, 7, 8, 9)
  assert packed.shapes == ((1, 1), (1, 1), (3, 3), (4, 4), (8, 8))
  assert packed.num_tokens == 1 + 1 + 9 + 16 + 64 == packed.tokens.shape[0]
  assert packed.tokens.shape[1] == 16
  assert packed.cost == pytest.approx(91 / 64) and packed.cost <= 1.62
  np.testing.assert_array_equal(np.bincount(packed.slot), [1, 1, 9, 16, 64])
  # Slot 2 (3 x 3 over 8 x 8): rows/cols at (i + 0.5) * 8/3 - 0.5, frame index 2.
  pos = packed.positions[packed.slot == 2]
  np.testing.assert_allclose(np.unique(pos[:, 1]), [5 / 6, 3.5, 37 / 6], rtol=1e-6)
  np.testing.assert_array_equal(pos[:, 0], 2)
  # A 1 x 1 slot sits at the centre of the frame.
  np.testing.assert_allclose(packed.positions[packed.slot == 0], [[0, 3.5, 3.5]])
  # The full-size slot is the newest latent patchified unchanged, on integer positions.
  np.testing.assert_array_equal(packed.tokens[packed.slot == 4], gm.patchify(latents[9], 2))
  np.testing.assert_array_equal(packed.positions[packed.slot == 4][:3, 1:], [[0, 0], [0, 1], [0, 2]])
  # The 4 x 4 slot is latent 8 area-resized to 8 x 8 latent pixels, then packed.
  np.testing.assert_allclose(packed.tokens[packed.slot == 3], gm.patchify(gm.area_resize(latents[8], 8, 8), 2))
  story = gm.pack_memory(latents, patch=2, frame_position="story")
  np.testing.assert_array_equal(np.unique(story.positions[:, 0]), [5, 6, 7, 8, 9])


def test_packed_context_stays_bounded_for_any_history_length():
  r = np.random.default_rng(3)
  latent = r.standard_normal((50, 50, 1)).astype(np.float32)  # 25 x 25 tokens
  counts = []
  for n in (1, 2, 5, 7, 8, 20, 48):
    packed = gm.pack_memory([latent] * n, patch=2, max_memory=100)
    assert packed.num_tokens == sum(h * w for h, w in packed.shapes)
    assert packed.cost <= 1.62, (n, packed.cost)
    counts.append(packed.num_tokens)
  assert counts[-1] == counts[-2] == counts[-3] == 970  # 25, 15, 9, 5, 3, 2, 1 and nothing more
  full = gm.pack_memory([latent] * 9, patch=2, pyramid=False, max_memory=9)
  assert full.num_tokens == 9 * 625 and full.cost == 9


def test_pack_memory_rejects_mismatched_latents():
  with pytest.raises(ValueError, match="history latent 1 has shape"):
    gm.pack_memory([np.zeros((4, 4, 2)), np.zeros((4, 6, 2))])
  with pytest.raises(ValueError, match="not divisible by the patch size 2"):
    gm.pack_memory([np.zeros((5, 4, 2))])
  with pytest.raises(ValueError, match="unknown frame_position"):
    gm.pack_memory([np.zeros((4, 4, 2))], frame_position="time")
