"""Control maps: global depth normalisation on hand values, depth sources, KLT against ground truth, LongVie point
maps, degradations."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cinema_jax.data import control, synthetic
from tests.test_data_synthetic import decode, tiny_config, tiny_films

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def films(tmp_path_factory):
  return tiny_films(tmp_path_factory.getbasetemp())


# --- depth ------------------------------------------------------------------------------------------------------


def test_normalize_depth_global_hand_values():
  # 0..20: numpy's linear percentiles give p5 = 1 and p95 = 19, so out = (19 - clip(d, 1, 19)) / 18.
  depth = np.arange(21, dtype=np.float64).reshape(3, 7)
  out = control.normalize_depth_global(depth)
  assert out.dtype == np.float32 and out.shape == (3, 7)
  expected = (19 - np.clip(np.arange(21), 1, 19)) / 18
  np.testing.assert_allclose(out.ravel(), expected, atol=1e-7)
  assert out.ravel()[0] == 1.0 and out.ravel()[10] == pytest.approx(0.5) and out.ravel()[20] == 0.0


def test_normalize_depth_global_is_global_and_near_is_zero():
  # Two "frames": percentiles come from both together, so frame 1 is not stretched on its own.
  depth = np.stack([np.full((4, 4), 1.0), np.full((4, 4), 3.0)])
  depth[1, 0, 0] = 2.0
  out = control.normalize_depth_global(depth)
  # p5 = 1, p95 = 3 over the 32 values: the nearest (largest disparity, 3) -> 0, the farthest (1) -> 1.
  assert out[1, 1, 1] == 0.0 and out[0, 0, 0] == 1.0 and out[1, 0, 0] == pytest.approx(0.5)
  np.testing.assert_array_equal(control.normalize_depth_global(np.full((2, 3), 7.0)), np.zeros((2, 3)))
  with pytest.raises(ValueError, match="NaN or inf"):
    control.normalize_depth_global(np.array([1.0, np.nan]))


def test_per_clip_normalisation_with_the_videos_percentiles_equals_the_global_map():
  rng = np.random.default_rng(3)
  depth = rng.gamma(2.0, 1.0, (12, 5, 7)).astype(np.float32)
  p5, p95 = control.depth_percentiles(depth)
  assert (p5, p95) == tuple(np.percentile(depth.astype(np.float64), [5, 95]))
  whole = control.normalize_depth_global(depth)
  for idx in ([0, 1, 2, 3], [4, 6, 8], [11]):  # clips: any subset of frames
    np.testing.assert_array_equal(control.normalize_depth(depth[idx], p5, p95), whole[idx])
  np.testing.assert_array_equal(control.normalize_depth(depth[:2], 4.0, 4.0), np.zeros((2, 5, 7)))


def test_smallest_distance_hand_values_and_blocks():
  xy = np.array([[0, 0], [10, 0], [3, 4], [20, 20]], np.float32)
  assert control._smallest_distance(xy) == 5.0  # (0, 0) - (3, 4)
  assert control._smallest_distance(xy, block=1) == 5.0  # the same when the rows come in blocks of one
  assert control._smallest_distance(np.array([[1.5, 2], [7, 7], [1.5, 2]])) == 0.0  # a repeated point
  rng = np.random.default_rng(0)
  pts = rng.uniform(0, 100, (700, 2))
  brute = min(np.hypot(*(pts[i] - pts[j])) for i in range(700) for j in range(i + 1, 700))
  assert control._smallest_distance(pts, block=128) == pytest.approx(brute, rel=1e-12)


def test_control_needs_no_scipy():
  code = "import sys, cinema_jax.data.control, cinema_jax.data.ingest; print('scipy' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"


def test_synthetic_depth_is_inverse_z_and_normalises_near_to_zero(films):
  frames, _ = decode(films[0])
  disparity = control.SyntheticDepth()(films[0], frames)
  with np.load(films[0].with_suffix(".gt.npz")) as gt:
    z = gt["depth"].astype(np.float32)
  np.testing.assert_allclose(disparity, 1 / z, rtol=1e-6)
  norm = control.normalize_depth_global(disparity)
  actors, backdrop = z < 9, z > 9
  assert norm[actors].mean() < 0.1 and norm[backdrop].mean() > 0.4  # characters are near, hence dark


def test_precomputed_depth_reads_video_depth_anything_npz(tmp_path):
  frames = np.zeros((3, 4, 6, 3), np.uint8)
  depth = np.arange(72, dtype=np.float32).reshape(3, 4, 6) + 1
  video = tmp_path / "clip.mp4"
  np.savez_compressed(tmp_path / "clip_depths.npz", depths=depth)
  np.testing.assert_array_equal(control.PrecomputedDepth()(video, frames), depth)
  np.testing.assert_allclose(control.PrecomputedDepth(metric=True)(video, frames), 1 / depth)
  assert control.AutoDepth()(video, frames) is not None
  assert control.PrecomputedDepth()(tmp_path / "other.mp4", frames) is None
  half = depth[:, ::2, ::2]  # an estimator run at half resolution: same aspect, resized to the frames
  np.savez_compressed(tmp_path / "clip_depths.npz", depths=half)
  got = control.PrecomputedDepth()(video, frames)
  assert got.shape == (3, 4, 6) and got.min() >= half.min() and got.max() <= half.max()
  for bad in (depth[:2], depth[:, :, :4]):  # a frame missing; another aspect
    np.savez_compressed(tmp_path / "clip_depths.npz", depths=bad)
    shape = str(tuple(bad.shape)).replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(control.DepthError, match=f"control size mismatch: depth in clip_depths.npz has shape {shape}"):
      control.PrecomputedDepth()(video, frames)


# --- tracks -----------------------------------------------------------------------------------------------------


def test_klt_follows_ground_truth_within_a_pixel(films):
  """The acceptance check: median KLT error against synthetic ground truth, on the decoded mp4."""
  errors, moving = [], 0
  for path in films:
    meta = json.loads(path.with_suffix(".json").read_text())
    spec = synthetic.make_film(meta["seed"], **synthetic.film_options(tiny_config().synth))
    assert spec.shot_ranges == [(s["start"], s["end"]) for s in meta["shots"]]
    frames, _ = decode(path)
    with np.load(path.with_suffix(".gt.npz")) as gt:
      depth = gt["depth"].astype(np.float32)
    for i, (start, end) in enumerate(spec.shot_ranges):
      tracks = control.track_points(frames[start:end], grid=(16, 12))
      truth, seen = synthetic.ground_truth_tracks(spec, i, tracks.xy[:, 0], depth[start:end])
      both = tracks.visible & seen
      both[:, 0] = False  # frame 0 is the query itself
      errors.append(np.linalg.norm(tracks.xy - truth, axis=-1)[both])
      moving += np.linalg.norm(truth[:, -1] - truth[:, 0], axis=-1).max() > 2
  errors = np.concatenate(errors)
  assert moving >= 3 and errors.size > 1000
  assert np.median(errors) < 1.0, np.median(errors)


def test_forward_backward_check_drops_points_that_do_not_track():
  rng = np.random.default_rng(0)
  smooth = np.tile(np.linspace(0, 255, 32, dtype=np.float32), (24, 1))
  noise = rng.integers(0, 256, (24, 32)).astype(np.uint8)
  frames = np.stack([smooth.astype(np.uint8), noise, noise])
  tracks = control.track_points(frames, grid=(4, 3), window=7, levels=0)
  assert tracks.visible[:, 0].all() and tracks.visible[:, 1].mean() < 0.5
  lost = ~tracks.visible[:, 1]
  assert np.isnan(tracks.xy[lost, 1:]).all() and not tracks.visible[lost, 2].any()


def test_query_points_grid_and_features():
  frame = np.zeros((48, 64, 3), np.uint8)
  grid = control.query_points(frame, "grid", (4, 2))
  np.testing.assert_allclose(grid[:5], [[7.5, 11.5], [23.5, 11.5], [39.5, 11.5], [55.5, 11.5], [7.5, 35.5]])
  frame[10:20, 10:20] = 255
  corners = control.query_points(frame, "features", max_points=10)
  assert 1 <= len(corners) <= 10 and np.all(np.abs(corners - [14.5, 14.5]).max(-1) <= 6)
  with pytest.raises(ValueError, match="unknown query point method 'sift'"):
    control.query_points(frame, "sift")


# --- point maps -------------------------------------------------------------------------------------------------


def _tracks(xy, visible=None):
  xy = np.asarray(xy, np.float32)
  return control.Tracks(xy, np.ones(xy.shape[:2], bool) if visible is None else np.asarray(visible))


def test_point_map_colours_sizes_and_black_background():
  # Three points; smallest distance at frame 0 is 10 -> squares of side 5 (size_fraction 0.5).
  xy = [[[10, 10]], [[20, 10]], [[30, 20]]]
  disparity = np.zeros((1, 32, 40), np.float32)
  disparity[0, 10, 10], disparity[0, 10, 20], disparity[0, 20, 30] = 1.0, 2.0, 3.0
  out = control.render_point_map(_tracks(xy), disparity, size_fraction=0.5)
  assert out.shape == (1, 32, 40, 3) and out.dtype == np.uint8
  # 2nd-98th percentile normalisation of three values a < b < c gives 0, 0.5, 1 -> 0, 128, 255.
  np.testing.assert_array_equal(out[0, 10, 10], [0, 0, 0 + 0])  # x0 lowest, y0 lowest, 1/z0 lowest: black
  np.testing.assert_array_equal(out[0, 10, 20], [128, 0, 128])
  np.testing.assert_array_equal(out[0, 20, 30], [255, 255, 255])
  row = out[0, 20, :, 0]
  assert (row[28:33] == 255).all() and row[27] == 0 and row[33] == 0  # 5 pixels: centres in [27.5, 32.5)
  col = out[0, :, 30, 0]
  assert (col[18:23] == 255).all() and col[17] == 0 and col[23] == 0
  assert out[0, 0, 0].sum() == 0 and (out.sum(-1) > 0).sum() == 2 * 25  # the black point is invisible on black


def test_point_map_draws_far_first_and_skips_lost_points():
  # Frame 0: P0 (4, 4), P1 (16, 16), P2 (10, 4) with disparities 3, 1, 2 -> colours (norm x, norm y, norm 1/z):
  # P0 (0, 0, 255), P1 (255, 255, 0), P2 (128, 0, 128). Smallest distance 6 -> squares of side 3.
  # Frame 1: P0 at (10, 10) and P1 at (11, 11) overlap on pixels x, y in {10, 11}.
  xy = [[[4, 4], [10, 10]], [[16, 16], [11, 11]], [[10, 4], [10, 4]]]
  disparity = np.ones((2, 24, 24), np.float32)
  disparity[0, 4, 4], disparity[0, 16, 16], disparity[0, 4, 10] = 3.0, 1.0, 2.0
  blue, yellow = (0, 0, 255), (255, 255, 0)
  p0_near = disparity.copy()
  p0_near[1, 10, 10] = 5.0  # P0 nearer at frame 1: drawn last, covers the overlap
  out = control.render_point_map(_tracks(xy), p0_near)
  assert tuple(out[0, 4, 4]) == blue and tuple(out[0, 16, 16]) == yellow and tuple(out[0, 4, 10]) == (128, 0, 128)
  assert tuple(out[1, 11, 11]) == blue and tuple(out[1, 12, 12]) == yellow and tuple(out[1, 9, 9]) == blue
  p1_near = disparity.copy()
  p1_near[1, 11, 11] = 5.0  # now P1 is nearer: colours stay those of frame 0, the order changes
  out = control.render_point_map(_tracks(xy), p1_near)
  assert tuple(out[1, 11, 11]) == yellow and tuple(out[1, 10, 10]) == yellow and tuple(out[1, 9, 9]) == blue
  lost = [[True, True], [True, False], [True, True]]  # P1 lost at frame 1: not drawn
  out = control.render_point_map(_tracks(xy, lost), p1_near)
  assert tuple(out[1, 11, 11]) == blue and tuple(out[1, 12, 12]) == (0, 0, 0)


# --- degradations -----------------------------------------------------------------------------------------------


def test_scale_fusion_keeps_constants_and_is_identity_at_full_scale():
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 1, (2, 16, 24, 3)).astype(np.float32)
  np.testing.assert_allclose(control.random_scale_fusion(x, np.random.default_rng(1), (1.0, 1.0, 1.0)), x, atol=1e-6)
  const = np.full((2, 16, 24, 1), 0.3, np.float32)
  np.testing.assert_allclose(control.random_scale_fusion(const, np.random.default_rng(2)), const, atol=1e-6)
  out = control.random_scale_fusion(x, np.random.default_rng(3))
  assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
  assert np.abs(out - x).mean() > 0.01  # coarse scales smooth the noise
  np.testing.assert_array_equal(out, control.random_scale_fusion(x, np.random.default_rng(3)))


def test_average_blur_is_a_box_scaled_to_the_map():
  x = np.zeros((1, 21, 21, 1), np.float32)
  x[0, 10, 10, 0] = 1.0
  out = control.adaptive_average_blur(x, np.random.default_rng(0), kernels=(5,), reference_side=21)
  expected = np.zeros((21, 21), np.float32)
  expected[8:13, 8:13] = 1 / 25
  np.testing.assert_allclose(out[0, ..., 0], expected, atol=1e-7)
  # At 1/10 of the reference side a 15-pixel kernel becomes 1.5 -> odd, >= 3: a 3 x 3 box.
  out = control.adaptive_average_blur(x, np.random.default_rng(0), kernels=(15,), reference_side=210)
  expected = np.zeros((21, 21), np.float32)
  expected[9:12, 9:12] = 1 / 9
  np.testing.assert_allclose(out[0, ..., 0], expected, atol=1e-7)


def test_degrade_probability():
  x = np.random.default_rng(0).uniform(0, 1, (2, 8, 8, 3)).astype(np.float32)
  np.testing.assert_array_equal(control.degrade(x, np.random.default_rng(0), prob=0.0), x)
  changed = [not np.array_equal(control.degrade(x, np.random.default_rng(s), prob=1.0), x) for s in range(10)]
  assert all(changed)
  hits = sum(not np.array_equal(control.degrade(x, np.random.default_rng(s), prob=0.1), x) for s in range(400))
  assert 20 <= hits <= 65  # ~ 40 of 400


def test_estimator_registry():
  assert isinstance(control.get_depth_estimator("none"), control.NoDepth)
  # Ingest passes its metric flag to whichever estimator the config names; those without the option ignore it.
  assert isinstance(control.get_depth_estimator("none", metric=True), control.NoDepth)
  assert control.get_depth_estimator("precomputed", metric=True).metric is True
  with pytest.raises(KeyError, match="unknown depth estimator 'midas'"):
    control.get_depth_estimator("midas")
