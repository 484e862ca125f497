"""Ingest: shot detection (synthetic films, ffmpeg test sources), captioners, clip planning, shards, bad input,
interrupted runs."""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import weakref

import cv2
import numpy as np
import pytest

from cinema_jax.data import captions, cli, control, ingest, shards
from tests.test_data_synthetic import decode, tiny_config, tiny_films

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def films(tmp_path_factory):
  return tiny_films(tmp_path_factory.getbasetemp())


def _ingest(paths, out, **kw):
  return ingest.ingest(paths, out, tiny_config().ingest, progress=False, **kw)


# --- shots ------------------------------------------------------------------------------------------------------


def _assert_cuts_recovered(detected, cuts):
  found = [a for a, _ in detected[1:]]
  assert len(found) == len(cuts), (found, cuts)
  for cut, got in zip(cuts, found, strict=True):
    assert abs(cut - got) <= 1, (found, cuts)


def test_detect_shots_recovers_every_synthetic_cut(tmp_path_factory):
  paths = tiny_films(tmp_path_factory.getbasetemp(), num_films=8, seed=100)
  total_cuts = 0
  for path in paths:
    meta = json.loads(path.with_suffix(".json").read_text())
    shots = ingest.detect_shots(path)
    assert shots[0][0] == 0 and shots[-1][1] == meta["num_frames"]
    assert all(a[1] == b[0] for a, b in zip(shots, shots[1:], strict=False))  # contiguous, end exclusive
    _assert_cuts_recovered(shots, meta["cuts"])
    total_cuts += len(meta["cuts"])
  assert total_cuts >= 10


def _ffmpeg_concat(path, sources, seconds=2, fps=12, size="96x64"):
  imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
  cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y"]
  for name in sources:
    cmd += ["-f", "lavfi", "-t", str(seconds), "-i", f"{name}=size={size}:rate={fps}"]
  inputs = "".join(f"[{i}:v]" for i in range(len(sources)))
  cmd += ["-filter_complex", f"{inputs}concat=n={len(sources)}:v=1:a=0", "-c:v", "libx264", "-pix_fmt", "yuv420p"]
  subprocess.run([*cmd, str(path)], check=True, capture_output=True)
  return [i * seconds * fps for i in range(1, len(sources))]


def test_detect_shots_on_ffmpeg_test_sources(tmp_path):
  video = tmp_path / "sources.mp4"
  cuts = _ffmpeg_concat(video, ["testsrc2", "smptebars", "mandelbrot", "rgbtestsrc", "testsrc"])
  shots = ingest.detect_shots(video)
  _assert_cuts_recovered(shots, cuts)
  assert shots[-1][1] == 5 * 24


def test_detect_shots_without_a_cut_and_detector_options(tmp_path):
  video = tmp_path / "one.mp4"
  _ffmpeg_concat(video, ["testsrc2"])
  assert ingest.detect_shots(video) == [(0, 24)]
  both = tmp_path / "two.mp4"
  _ffmpeg_concat(both, ["smptebars", "rgbtestsrc"])
  assert ingest.detect_shots(both, detector="adaptive") == [(0, 24), (24, 48)]
  assert ingest.detect_shots(both, threshold=255.0) == [(0, 48)]  # nothing changes that much
  assert ingest.detect_shots(both, downscale=4) == [(0, 24), (24, 48)]  # detection on 24 x 16 frames
  with pytest.raises(KeyError, match="unknown shot detector 'magic'"):
    ingest.detect_shots(both, detector="magic")


# --- captions ---------------------------------------------------------------------------------------------------


def test_sidecar_json_ranges_match_by_overlap(tmp_path):
  video = tmp_path / "v.mp4"
  side = {"shots": [{"start": 0, "end": 10, "caption": "a"}, {"start": 10, "end": 30, "caption": "b"}]}
  (tmp_path / "v.json").write_text(json.dumps(side))
  got = captions.SidecarCaptioner()(video, [(0, 9), (9, 20), (20, 30)], 12.0)
  assert got.shots == ["a", "b", "b"] and got.synopsis == "a b b"
  (tmp_path / "v.json").write_text(json.dumps({"captions": ["x", "y"], "synopsis": "s"}))
  assert captions.SidecarCaptioner()(video, [(0, 5), (5, 9)], 12.0) == captions.FilmCaptions(["x", "y"], "s")
  with pytest.raises(captions.MissingCaption, match="v.json has 2 captions for 3 detected shots"):
    captions.SidecarCaptioner()(video, [(0, 1), (1, 2), (2, 3)], 12.0)
  (tmp_path / "v.json").write_text(json.dumps({"shots": [{"start": 0, "end": 10, "caption": "a"}]}))
  with pytest.raises(captions.MissingCaption, match=r"missing caption for shot 1 \(frames 10-20\)"):
    captions.SidecarCaptioner()(video, [(0, 10), (10, 20)], 12.0)


def test_sidecar_srt_and_txt(tmp_path):
  video = tmp_path / "v.mp4"
  (tmp_path / "v.srt").write_text(
    "1\n00:00:00,000 --> 00:00:01,500\nA red circle\nwalks.\n\n2\n00:00:02,000 --> 00:00:03,000\nA cut.\n"
  )
  got = captions.SidecarCaptioner()(video, [(0, 12), (12, 30), (30, 36)], 12.0)
  # shot 1 spans 1.0-2.5 s: both cues overlap it.
  assert got.shots == ["A red circle walks.", "A red circle walks. A cut.", "A cut."]
  (tmp_path / "v.srt").unlink()
  (tmp_path / "v.txt").write_text("first\n\nsecond\n")
  assert captions.SidecarCaptioner()(video, [(0, 5), (5, 9)], 12.0).shots == ["first", "second"]
  (tmp_path / "v.txt").write_text("one line for all\n")
  got = captions.SidecarCaptioner()(video, [(0, 5), (5, 9), (9, 12)], 12.0)
  assert got.shots == ["one line for all"] * 3 and got.synopsis == "one line for all"
  (tmp_path / "v.txt").unlink()
  with pytest.raises(captions.MissingCaption, match=r"no sidecar \(looked for v.json, v.srt, v.txt\)"):
    captions.SidecarCaptioner()(video, [(0, 5)], 12.0)


@pytest.mark.parametrize(
  "sidecar, field",
  [
    ({"captions": ["a"], "synopsis": 3}, "'synopsis' must be a string, not int 3"),
    ({"captions": ["a", 5]}, r"'captions'\[1\] must be a string, not int 5"),
    ({"shots": [{"start": 0, "end": 9, "caption": None}]}, r"'shots'\[0\].caption must be a string, not NoneType"),
  ],
)
def test_sidecar_fields_that_are_not_text_are_named(tmp_path, sidecar, field):
  video = tmp_path / "v.mp4"
  (tmp_path / "v.json").write_text(json.dumps(sidecar))
  shots = [(0, 5), (5, 9)][: len(sidecar.get("captions", [0, 0]))]
  with pytest.raises(captions.BadSidecar, match=f"caption sidecar v.json: {field}"):
    captions.SidecarCaptioner()(video, shots, 12.0)


# --- clips ------------------------------------------------------------------------------------------------------


def test_resampling_and_clip_plan_hand_values():
  np.testing.assert_array_equal(ingest.resample_indices(0, 10, 24.0, 12.0), [0, 2, 4, 6, 8])
  np.testing.assert_array_equal(ingest.resample_indices(0, 10, 12.0, 8.0), [0, 1, 3, 4, 6, 7, 9])
  np.testing.assert_array_equal(ingest.resample_indices(5, 8, 12.0, 0), [5, 6, 7])
  clips = ingest.plan_clips([(0, 10), (10, 13), (13, 30)], 12.0, 12.0, clip_frames=4, clip_stride=3)
  assert [s for s, _ in clips] == [0, 0, 0, 2, 2, 2, 2, 2]  # shot 1 is too short; clips never cross a cut
  np.testing.assert_array_equal(clips[1][1], [3, 4, 5, 6])
  np.testing.assert_array_equal(clips[3][1], [13, 14, 15, 16])


def test_fit_frames_crops_the_centre_then_resizes():
  frames = np.arange(2 * 4 * 8 * 3, dtype=np.uint8).reshape(2, 4, 8, 3)
  np.testing.assert_array_equal(ingest.fit_frames(frames, (4, 4)), frames[:, :, 2:6])
  tall = np.arange(6 * 2, dtype=np.float32).reshape(6, 2)[None]
  np.testing.assert_array_equal(ingest.fit_frames(tall, (2, 2), channels=False), tall[:, 2:4])
  assert ingest.fit_frames(frames, (2, 2)).shape == (2, 2, 2, 3)


def test_keyframe_policies():
  rng = np.random.default_rng(0)
  frames = np.repeat(rng.integers(0, 256, (1, 16, 16, 3), dtype=np.uint8), 12, axis=0)
  for i in range(12):
    if i != 5:
      frames[i] = frames[i] // 4 + 90  # low contrast everywhere but frame 5
  assert ingest.keyframe_index(frames, 2, 12, "middle") == 6
  assert ingest.keyframe_index(frames, 2, 12, "first") == 2
  assert ingest.keyframe_index(frames, 2, 12, "sharpest") == 5


# --- shards -----------------------------------------------------------------------------------------------------


def test_ingest_writes_consistent_shards_and_reruns_skip(films, tmp_path):
  out = tmp_path / "ds"
  report = _ingest(films, out)
  assert len(report.ingested) == len(films) and not report.skipped
  manifest = shards.load_manifest(out)
  assert [v["id"] for v in manifest["videos"]] == sorted(report.ingested)
  cfg = tiny_config().ingest
  for entry, path in zip(sorted(manifest["videos"], key=lambda v: v["source"]), films, strict=True):
    meta = json.loads(path.with_suffix(".json").read_text())
    folder = shards.videos_dir(out) / entry["id"]
    video = json.loads((folder / "video.json").read_text())
    assert video["shots"] == [[s["start"], s["end"]] for s in meta["shots"]]
    assert video["captions"] == [s["caption"] for s in meta["shots"]] and video["synopsis"] == meta["synopsis"]
    frames, _ = decode(path)
    keyframes = shards.read_array(folder / "keyframes.zarr")
    np.testing.assert_array_equal(keyframes, ingest.fit_frames(frames[video["keyframes"]], cfg.keyframe_size))
    records = shards.read_records(folder / "clips.array_record")
    clip_frames = shards.read_array(folder / "frames.zarr")
    assert len(records) == entry["clips"] == len(clip_frames) > 0
    for i, record in enumerate(records):
      assert record["clip"] == i and record["caption"] == video["captions"][record["shot"]]
      a, b = video["shots"][record["shot"]]
      assert a <= record["frames"][0] and record["frames"][-1] < b  # inside its shot
      np.testing.assert_array_equal(clip_frames[i], ingest.fit_frames(frames[record["frames"]], cfg.clip_size))
    (film,) = shards.read_records(folder / "films.array_record")
    assert film["captions"] == video["captions"] and film["video"] == entry["id"]
    depth = shards.read_array(folder / "depth.zarr").astype(np.float32)
    points = shards.read_array(folder / "points.zarr")
    assert depth.min() >= 0 and depth.max() <= 1 and points.shape == (*depth.shape, 3)
    assert (points.reshape(-1, 3).sum(-1) > 0).mean() > 0.1  # tracked points are drawn
  before = shards.tree_digest(out)
  again = _ingest(films, out)
  assert again.ingested == [] and sorted(again.present) == sorted(report.ingested)
  assert shards.tree_digest(out) == before


def _bad_files(folder, films):
  """One file per kind of bad input; returns {path: expected reason fragment}."""
  folder.mkdir()
  (folder / "corrupt.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
  (folder / "empty.mp4").write_bytes(b"")
  (folder / "notes.xyz").write_text("not a video")
  shutil.copy(films[0], folder / "nocaption.mp4")
  shutil.copy(films[1], folder / "mismatch.mp4")
  shutil.copy(films[1].with_suffix(".json"), folder / "mismatch.json")
  with np.load(films[1].with_suffix(".gt.npz")) as gt:
    np.savez(folder / "mismatch.gt.npz", depth=gt["depth"][:-3])
  data = films[2].read_bytes()
  (folder / "truncated.mp4").write_bytes(data[: int(len(data) * 0.6)])
  shutil.copy(films[2].with_suffix(".json"), folder / "truncated.json")
  return {
    folder / "corrupt.mp4": "cannot decode",
    folder / "empty.mp4": "empty file (0 bytes)",
    folder / "notes.xyz": "unsupported file type '.xyz'",
    folder / "missing.mp4": "no such file",
    folder / "nocaption.mp4": "missing caption: no sidecar",
    folder / "mismatch.mp4": "control size mismatch",
    folder / "truncated.mp4": "corrupt or truncated: decoded",
  }


def test_bad_input_is_reported_once_and_changes_nothing_else(films, tmp_path):
  bad = _bad_files(tmp_path / "bad", films)
  lines = []
  mixed = [films[0], *bad, films[1], films[2]]
  report = _ingest(mixed, tmp_path / "mixed", on_skip=lines.append)
  assert len(report.ingested) == 3 and len(lines) == len(bad) == len(report.skipped)
  for line, (path, reason) in zip(lines, bad.items(), strict=True):
    assert line.startswith(f"skipped {path}: ") and reason in line, line
  _ingest(films, tmp_path / "clean")
  assert shards.tree_digest(tmp_path / "mixed") == shards.tree_digest(tmp_path / "clean")


def test_sidecar_with_a_number_for_synopsis_is_skipped(films, tmp_path):
  folder = tmp_path / "in"
  folder.mkdir()
  shutil.copy(films[0], folder / "numbers.mp4")
  meta = json.loads(films[0].with_suffix(".json").read_text())
  (folder / "numbers.json").write_text(json.dumps({**meta, "synopsis": 3}))
  lines = []
  report = _ingest([folder / "numbers.mp4", films[1]], tmp_path / "ds", on_skip=lines.append)
  assert len(report.ingested) == 1
  assert lines == [
    f"skipped {folder / 'numbers.mp4'}: caption sidecar numbers.json: 'synopsis' must be a string, not int 3"
  ]


def test_unexpected_error_while_decoding_skips_only_that_file(films, tmp_path, monkeypatch):
  real = ingest.iter_frames

  def breaking(path, *args, **kw):
    for i, frame in real(path, *args, **kw):
      if path.name == films[1].name and i == 10:
        raise cv2.error("decoder exploded")  # an OpenCV failure that is not one of the known bad inputs
      yield i, frame

  monkeypatch.setattr(ingest, "iter_frames", breaking)
  lines = []
  report = _ingest(films, tmp_path / "ds", on_skip=lines.append)
  assert lines == [f"skipped {films[1]}: error: decoder exploded"]
  assert len(report.ingested) == len(films) - 1 and report.skipped == [(str(films[1]), "error: decoder exploded")]
  assert not [p for p in shards.videos_dir(tmp_path / "ds").iterdir() if p.name.startswith(shards.TMP_PREFIX)]
  monkeypatch.setattr(ingest, "iter_frames", real)
  _ingest([films[0], films[2]], tmp_path / "clean")
  assert shards.tree_digest(tmp_path / "ds") == shards.tree_digest(tmp_path / "clean")


def test_ingest_streams_one_decoded_frame_at_a_time(films, tmp_path, monkeypatch):
  """Peak memory is bounded by one clip, not the video: never more than one full-resolution frame is alive, the
  whole-video reader is never used, and decoding stops after the last frame a clip or keyframe needs."""
  real, alive, most, decoded = ingest.iter_frames, [0], [0], []

  def gone():
    alive[0] -= 1

  def counting(path, *args, **kw):
    for i, frame in real(path, *args, **kw):
      alive[0] += 1
      most[0] = max(most[0], alive[0])
      weakref.finalize(frame, gone)
      decoded.append(i)
      yield i, frame

  def whole_video(*args, **kw):
    raise AssertionError("ingest must not decode a whole video into memory")

  monkeypatch.setattr(ingest, "iter_frames", counting)
  monkeypatch.setattr(ingest, "read_video", whole_video)
  cfg = tiny_config().ingest
  cfg.clip_stride = 3  # overlapping clips: frames shared between clips are kept until their last clip
  video = ingest.process_video(
    films[0], cfg, captioner=captions.SidecarCaptioner(), depth_estimator=control.AutoDepth()
  )
  meta = json.loads(films[0].with_suffix(".json").read_text())
  assert meta["num_frames"] >= 60 and video.manifest["num_clips"] >= 6 and video.manifest["has_control"]
  assert most[0] == 1 and alive[0] == 0
  last_needed = max(max(r["frames"][-1] for r in video.clip_records), *video.manifest["keyframes"])
  assert decoded == list(range(last_needed + 1))
  # The streamed result equals cutting the fully decoded video.
  frames, _ = decode(films[0])
  for record, clip in zip(video.clip_records, video.arrays["frames"], strict=True):
    np.testing.assert_array_equal(clip, ingest.fit_frames(frames[record["frames"]], cfg.clip_size))
  keyframes = ingest.fit_frames(frames[video.manifest["keyframes"]], cfg.keyframe_size)
  np.testing.assert_array_equal(video.arrays["keyframes"], keyframes)


def test_sharpest_keyframe_streamed_equals_the_policy_on_decoded_frames(films, tmp_path):
  cfg = tiny_config().ingest
  cfg.keyframe = "sharpest"
  video = ingest.process_video(films[2], cfg, captioner=captions.SidecarCaptioner(), depth_estimator=control.NoDepth())
  frames, _ = decode(films[2])
  want = [ingest.keyframe_index(frames, a, b, "sharpest") for a, b in video.manifest["shots"]]
  assert video.manifest["keyframes"] == want and "depth" not in video.arrays


def test_manifest_sources_are_relative_so_the_location_does_not_matter(films, tmp_path):
  here, there = tmp_path / "a" / "films", tmp_path / "b" / "deeper" / "films"
  for folder in (here / "sub", there / "sub"):
    folder.mkdir(parents=True)
    for suffix in (".mp4", ".json", ".gt.npz"):
      shutil.copy(films[0].with_suffix(suffix), folder / films[0].with_suffix(suffix).name)
  _ingest([here], tmp_path / "one")
  _ingest([there], tmp_path / "two")
  assert shards.tree_digest(tmp_path / "one") == shards.tree_digest(tmp_path / "two")
  assert [v["source"] for v in shards.load_manifest(tmp_path / "one")["videos"]] == [f"sub/{films[0].name}"]
  _ingest([here / "sub" / films[0].name], tmp_path / "file")
  assert [v["source"] for v in shards.load_manifest(tmp_path / "file")["videos"]] == [films[0].name]
  assert (
    str(tmp_path)
    not in (shards.videos_dir(tmp_path / "one"))
    .joinpath(shards.finished_videos(tmp_path / "one")[0]["id"], "video.json")
    .read_text()
  )


def test_unreadable_file_is_reported(films, tmp_path, monkeypatch):
  def refuse(path):
    raise PermissionError(13, "Permission denied", str(path))

  monkeypatch.setattr(ingest, "hash_file", refuse)
  lines = []
  report = _ingest([films[0]], tmp_path / "ds", on_skip=lines.append)
  assert not report.ok and lines == [f"skipped {films[0]}: unreadable: permission denied"]


def test_cli_exit_codes_and_report_lines(films, tmp_path, capsys):
  bad = _bad_files(tmp_path / "bad", films)
  args = ["--out", str(tmp_path / "ds"), "--config", "configs/data.py:tiny", "--quiet"]
  assert cli.ingest_main([*map(str, bad), str(films[0]), *args]) == 0
  out = capsys.readouterr().out.splitlines()
  assert sum(line.startswith("skipped ") for line in out) == len(bad)
  assert out[-1].startswith("ingested 1 videos (0 already present, 7 skipped)")
  assert cli.ingest_main([*map(str, bad), *args]) == 1  # none of the given files could be ingested
  assert sum(line.startswith("skipped ") for line in capsys.readouterr().out.splitlines()) == len(bad)
  assert cli.ingest_main([str(films[0]), *args]) == 0  # already present counts as ingested
  assert "ingested 0 videos (1 already present, 0 skipped)" in capsys.readouterr().out
  assert cli.ingest_main([str(films[0]), *args, "--config.ingest.threshold=30"]) == 2  # other settings, same DIR
  assert "ingested with other settings (threshold differ)" in capsys.readouterr().err
  assert cli.ingest_main([str(films[0]), *args, "--config.ingest.nope=1"]) == 2


def test_synth_cli_writes_films(tmp_path, capsys):
  out = tmp_path / "films"
  assert cli.synth_main(["--out", str(out), "--config", "configs/data.py:tiny", "--num-films", "2", "--quiet"]) == 0
  assert sorted(p.name for p in out.iterdir()) == [
    "film_000.gt.npz", "film_000.json", "film_000.mp4", "film_001.gt.npz", "film_001.json", "film_001.mp4",
  ]  # fmt: skip
  assert "wrote 2 films (64x48 @ 12 fps, seeds 0..1)" in capsys.readouterr().out


# --- interruption -----------------------------------------------------------------------------------------------

_KILLER = """
import os, signal, sys
from cinema_jax import config as config_lib
from cinema_jax.data import ingest, shards

calls = [0]
real = shards.write_array

def dying(path, array):
  calls[0] += 1
  if calls[0] == int(sys.argv[3]):
    real(path, array[: len(array) // 2 + 1])  # part of an array on disk, then the process dies
    os.kill(os.getpid(), signal.SIGKILL)
  real(path, array)

shards.write_array = dying
config = config_lib.load_config("configs/data.py:tiny").ingest
ingest.ingest(sys.argv[1].split(","), sys.argv[2], config, progress=False)
"""


def test_killed_ingest_then_rerun_equals_one_uninterrupted_run(films, tmp_path):
  out = tmp_path / "killed"
  # Five zarr arrays per video: the 8th write is the middle of the second video.
  proc = subprocess.run(
    [sys.executable, "-c", _KILLER, ",".join(map(str, films)), str(out), "8"], cwd=ROOT, capture_output=True
  )
  assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
  partial = [p.name for p in shards.videos_dir(out).iterdir() if p.name.startswith(shards.TMP_PREFIX)]
  assert len(partial) == 1
  assert shards.load_manifest(out)["totals"]["videos"] == 1  # the manifest only lists finished videos
  report = _ingest(films, out)
  assert len(report.present) == 1 and len(report.ingested) == len(films) - 1
  _ingest(films, tmp_path / "whole")
  assert shards.tree_digest(out) == shards.tree_digest(tmp_path / "whole")


def test_failed_write_leaves_no_partial_shard(films, tmp_path, monkeypatch):
  real, calls = shards.write_array, [0]

  def failing(path, array):
    calls[0] += 1
    if calls[0] == 3:
      raise OSError(28, "No space left on device")
    real(path, array)

  monkeypatch.setattr(shards, "write_array", failing)
  with pytest.raises(OSError, match="No space left"):  # not bad input: an environment failure stops the run
    _ingest(films, tmp_path / "ds")
  assert [p.name for p in shards.videos_dir(tmp_path / "ds").iterdir()] == []
  monkeypatch.setattr(shards, "write_array", real)
  _ingest(films, tmp_path / "ds")
  _ingest(films, tmp_path / "whole")
  assert shards.tree_digest(tmp_path / "ds") == shards.tree_digest(tmp_path / "whole")


def test_main_cli_runs_the_data_commands(films, tmp_path, capsys):
  from cinema_jax import cli as main_cli

  sub = next(a for a in main_cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
  assert {"synth", "ingest"} <= set(sub.choices)
  args = ["--out", str(tmp_path / "ds"), "--config", "configs/data.py:tiny", "--quiet"]
  assert main_cli.main(["ingest", str(films[0]), str(tmp_path / "missing.mp4"), *args]) == 0
  assert f"skipped {tmp_path / 'missing.mp4'}: no such file" in capsys.readouterr().out
  assert main_cli.main(["synth", "--out", str(tmp_path / "f"), "--config", "configs/data.py:tiny", "--quiet"]) == 0
