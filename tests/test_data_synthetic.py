"""Synthetic films: determinism, recurring identities, captions, real H.264 files, z-buffer and ground-truth motion.

``tiny_config`` and ``tiny_films`` are shared with the other data tests (films are written once per test run:
``generate_films`` keeps finished films).
"""

import json
import re
import subprocess

import cv2
import numpy as np
import pytest

from cinema_jax import config as config_lib
from cinema_jax.data import synthetic


def tiny_config():
  return config_lib.load_config("configs/data.py:tiny")


def tiny_films(base, num_films=None, seed=None):
  """Writes (or finds) the tiny synthetic films under ``base``; returns their mp4 paths."""
  s = tiny_config().synth
  num = s.num_films if num_films is None else num_films
  first = s.seed if seed is None else seed
  folder = base / f"films-{first}-{num}"
  return synthetic.generate_films(
    folder, num, seed=first, crf=s.crf, track_grid=s.track_grid, progress=False, **synthetic.film_options(s)
  )


def decode(path):
  cap = cv2.VideoCapture(str(path))
  frames = []
  while True:
    ok, frame = cap.read()
    if not ok:
      break
    frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
  fps = cap.get(cv2.CAP_PROP_FPS)
  cap.release()
  return np.stack(frames), fps


@pytest.fixture(scope="module")
def films(tmp_path_factory):
  return tiny_films(tmp_path_factory.getbasetemp())


def test_same_seed_same_film_other_seed_other_film():
  a, b, c = synthetic.make_film(3), synthetic.make_film(3), synthetic.make_film(4)
  assert a == b and a != c
  frames_a, depth_a = synthetic.render_film(a)
  frames_b, depth_b = synthetic.render_film(b)
  np.testing.assert_array_equal(frames_a, frames_b)
  np.testing.assert_array_equal(depth_a, depth_b)


def test_identities_recur_and_cuts_change_the_setting():
  by_name, places = {}, {}
  for seed in range(12):
    spec = synthetic.make_film(seed, shots=(3, 5))
    assert 3 <= len(spec.shots) <= 5
    for prev, shot in zip(spec.shots, spec.shots[1:], strict=False):
      assert prev.setting.name != shot.setting.name  # every cut changes the picture
    for shot in spec.shots:
      places.setdefault(shot.setting.name, shot.setting)
      assert places[shot.setting.name] == shot.setting
      for actor in shot.actors:
        c = actor.character
        assert by_name.setdefault(c.name, (c.shape, c.colour, c.rgb)) == (c.shape, c.colour, c.rgb)
  assert len(by_name) >= 6 and len(places) >= 5  # a cast and settings that recur across films


def test_captions_describe_the_shot_and_the_synopsis_the_film():
  spec = synthetic.make_film(7)
  for shot in spec.shots:
    assert shot.caption.lower().startswith(shot.setting.where)
    assert shot.caption.endswith(f"The camera {synthetic.CAMERA_MOVES[shot.camera]}.")
    for actor in shot.actors:
      c = actor.character
      assert f"{c.name}, the {c.colour} {c.shape}, {synthetic.ACTIONS[actor.action]}" in shot.caption
  assert spec.synopsis.startswith(spec.title) and f"in {len(spec.shots)} shots" in spec.synopsis
  assert spec.synopsis.count(". Then, ") + 2 == len(spec.shots) or len(spec.shots) < 3
  for c in spec.characters:
    assert f"{c.name} (a {c.colour} {c.shape})" in spec.synopsis


def test_films_are_browser_mp4_with_sidecar(films):
  import imageio_ffmpeg

  cfg = tiny_config().synth
  for path in films:
    meta = json.loads(path.with_suffix(".json").read_text())
    frames, fps = decode(path)
    assert frames.shape == (meta["num_frames"], cfg.height, cfg.width, 3) and fps == cfg.fps
    assert meta["cuts"] == [s["start"] for s in meta["shots"][1:]]
    assert meta["shots"][-1]["end"] == meta["num_frames"] and meta["synopsis"]
    spec = synthetic.make_film(meta["seed"], **synthetic.film_options(cfg))
    assert meta == json.loads(json.dumps(synthetic.sidecar(spec, path.stem)))
    rendered, _ = synthetic.render_film(spec)
    mse = np.mean((rendered.astype(np.float64) - frames) ** 2)
    assert 10 * np.log10(255**2 / mse) > 30  # the encode is faithful (PSNR in dB)
  info = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(films[0])], capture_output=True)
  stream = info.stderr.decode()
  assert re.search(r"Video: h264 .*yuv420p", stream), stream


def test_writing_is_byte_deterministic_and_reruns_keep_files(tmp_path, films):
  spec = synthetic.make_film(0, **synthetic.film_options(tiny_config().synth))
  synthetic.write_film(spec, tmp_path / "a", "x")
  synthetic.write_film(spec, tmp_path / "b", "x")
  for suffix in (".mp4", ".json", ".gt.npz"):
    assert (tmp_path / "a" / f"x{suffix}").read_bytes() == (tmp_path / "b" / f"x{suffix}").read_bytes()
  stamps = [p.stat().st_mtime_ns for p in films]
  again = tiny_films(films[0].parent.parent)
  assert again == films and [p.stat().st_mtime_ns for p in films] == stamps
  assert not list(films[0].parent.glob(".*"))  # no temporary files left


def test_depth_is_a_z_buffer():
  spec = synthetic.make_film(5, width=64, height=48)
  _, depth = synthetic.render_film(spec)
  start = 0
  for shot in spec.shots:
    for t in (0, shot.num_frames - 1):
      nearest = synthetic._poses(spec, shot, t)[-1]
      x, y = np.round(nearest.center).astype(int)
      if 0 <= x < spec.width and 0 <= y < spec.height:
        assert depth[start + t, y, x] == pytest.approx(nearest.z, rel=1e-6)
    start += shot.num_frames
  backdrop = depth[depth > 9.0]
  assert backdrop.min() >= synthetic.GROUND_NEAR * 0.99 and backdrop.max() == synthetic.SKY_DEPTH
  actors = depth[depth <= 9.0]
  assert actors.size and actors.min() >= 2.9


def test_ground_truth_tracks_follow_the_picture():
  """Brightness constancy along ground-truth tracks, far below the change along random displacements."""
  spec = synthetic.make_film(2, width=64, height=48)
  frames, depth = synthetic.render_film(spec)
  frames = frames.astype(np.float32)
  points = synthetic.grid_points(spec.width, spec.height, 16, 12)
  rng = np.random.default_rng(0)
  for i, (start, end) in enumerate(spec.shot_ranges):
    tracks, visible = synthetic.ground_truth_tracks(spec, i, points, depth[start:end])
    np.testing.assert_allclose(tracks[:, 0], points, atol=1e-4)
    t = end - start - 1
    ok = visible[:, 0] & visible[:, t]
    assert ok.sum() > 40
    first = frames[start][np.round(points[ok, 1]).astype(int), np.round(points[ok, 0]).astype(int)]
    xy = tracks[ok, t]
    last = frames[start + t][np.round(xy[:, 1]).astype(int), np.round(xy[:, 0]).astype(int)]
    moved = np.clip(np.round(xy + rng.uniform(-6, 6, xy.shape)), 0, [spec.width - 1, spec.height - 1]).astype(int)
    wrong = frames[start + t][moved[:, 1], moved[:, 0]]
    along, off = np.median(np.abs(first - last)), np.median(np.abs(first - wrong))
    assert along <= 3 and along < 0.5 * off, (spec.shots[i].camera, along, off)


def test_bad_sizes_are_errors():
  with pytest.raises(ValueError, match="bad film sizes"):
    synthetic.make_film(0, shot_frames=(10, 5))
  with pytest.raises(ValueError, match="even frame size, got 5x4"):
    synthetic.encode_mp4(np.zeros((2, 4, 5, 3), np.uint8), "/nonexistent/x.mp4", 12)
