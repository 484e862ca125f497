"""Story -> movie: the pipeline's outputs, atomicity, errors, and the demo job, with tiny random-weight models.

The shipped demo models are trained; these tests build the same architectures at toy width with random parameters
(exported the way `cinema-jax train` exports them) so that every stage runs in seconds: text encoders, GoldenMem
keyframes, diffusion-forcing clips from the keyframe prefix, decoding, mp4s, contact sheet, metrics, report.
"""

import json
import pathlib

import cv2
import flax.linen as nn
import jax
import numpy as np
import pytest

from cinema_jax import cli, demo
from cinema_jax.config import load_config
from cinema_jax.data.ingest import read_video
from cinema_jax.pipelines import story as story_lib
from cinema_jax.pipelines.story_file import load_story
from cinema_jax.train import export, tasks

KEYFRAME_OVERRIDES = (
  "model.hidden_size=32", "model.num_heads=2", "model.axes_dim=(4,6,6)", "model.depth=1",
  "model.depth_single_blocks=1", "text.encoder.width=16", "text.encoder.depth=1", "text.encoder.heads=2",
  "sampling.num_steps=2",
)  # fmt: skip
VIDEO_OVERRIDES = (
  "model.width=32", "model.heads=2", "model.depth=1", "model.ffn_dim=64", "text.encoder.width=16",
  "text.encoder.depth=1", "text.encoder.heads=2", "sampling.num_steps=2",
)  # fmt: skip

STORY = """\
title: Two shots
characters:
  - {name: Ada, description: the red circle}
  - {name: Bo, description: the blue square}
shots:
  - caption: In a sunny meadow, Ada, the red circle, walks to the right. The camera holds still.
    duration: 1.5
    seed: 4
  - caption: In a desert under a pale sky, Bo, the blue square, waits. The camera pans right.
    duration: 1.0
"""


def _export_random(spec: str, overrides, path: pathlib.Path, seed: int) -> None:
  config = load_config(spec, [f"--config.{o}" for o in overrides])
  task = tasks.make_task(config)
  variables = task.init(jax.random.key(seed), task.example_batch(1, 1))
  params = nn.meta.unbox(variables["params"])
  export.export_params(params, path, config_json=config.to_json_best_effort(), step=0, source="params")


@pytest.fixture(scope="module")
def story_config(tmp_path_factory):
  root = tmp_path_factory.mktemp("models")
  _export_random("configs/train_keyframes.py:story", KEYFRAME_OVERRIDES, root / "kf.safetensors", 0)
  _export_random("configs/train_video.py:story", VIDEO_OVERRIDES, root / "video.safetensors", 1)
  config = load_config("configs/story.py")
  config.keyframes.params = str(root / "kf.safetensors")
  config.keyframes.overrides = KEYFRAME_OVERRIDES
  config.video.params = str(root / "video.safetensors")
  config.video.overrides = VIDEO_OVERRIDES
  config.render.progress = False
  return config


def _write_story(tmp_path: pathlib.Path, text: str = STORY) -> pathlib.Path:
  path = tmp_path / "story.yaml"
  path.write_text(text)
  return path


def _read_video(path: pathlib.Path) -> np.ndarray:
  return read_video(path)[0]


def test_story_renders_every_output(story_config, tmp_path):
  story = load_story(_write_story(tmp_path))
  models = story_lib.load_models(story_config)
  out = tmp_path / "out"
  metrics = story_lib.render_story(story, models, out, story_config)

  # Frames per shot: 1.5 s and 1.0 s at 12 fps, the second raised to the 16-frame floor (cuts stay detectable).
  assert metrics["story"]["frames_per_shot"] == [18, 16]
  movie = _read_video(out / "movie.mp4")
  assert movie.shape == (34, 64, 96, 3)
  clips = [_read_video(out / "clips" / f"shot_{k:02d}.mp4") for k in (1, 2)]
  assert [len(c) for c in clips] == [18, 16]
  assert all(cv2.imread(str(out / "keyframes" / f"shot_{k:02d}.png")).shape == (64, 96, 3) for k in (1, 2))
  sheet = cv2.imread(str(out / "keyframes.png"))
  assert sheet.shape[0] > 64 and sheet.shape[1] >= 2 * 96

  written = json.loads((out / "metrics.json").read_text())
  assert written["frames"]["nonfinite_latents"] == 0 and written["frames"]["frames"] == 34
  assert 0 <= written["frames"]["constant_frames"] <= 34
  for key in ("temporal_flickering", "dynamic_degree", "motion_smoothness", "drift", "num_shots"):
    assert key in written["video"]
  assert 0.0 <= written["adherence"]["presence"] <= 1.0
  page = (out / "report.html").read_text()
  assert "In a sunny meadow, Ada, the red circle" in page and "clips/shot_02.mp4" in page
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "story.yaml"]  # no partial folder left


def test_seeded_story_is_reproducible_and_shot_seeds_matter(story_config, tmp_path):
  story = load_story(_write_story(tmp_path))
  models = story_lib.load_models(story_config)
  a = story_lib.generate_keyframes(story, models, seed=0, progress=False)[0]
  b = story_lib.generate_keyframes(story, models, seed=0, progress=False)[0]
  c = story_lib.generate_keyframes(story, models, seed=5, progress=False)[0]
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  np.testing.assert_array_equal(a[0], c[0])  # shot 1 has its own seed: the base seed does not touch it
  assert not np.array_equal(a[1], c[1])  # shot 2 follows the base seed


def test_clip_starts_from_its_keyframe(story_config, tmp_path):
  # The keyframe is the first window's clean image prefix: the clip's first frame is the keyframe, exactly.
  story = load_story(_write_story(tmp_path))
  models = story_lib.load_models(story_config)
  generated = story_lib.generate_keyframes(story, models, seed=0, progress=False)
  clips, nonfinite = story_lib.generate_clips(story, models, generated, [18, 16], seed=0, progress=False)
  assert nonfinite == [0, 0] and [len(c) for c in clips] == [18, 16] and clips[0].shape[1:] == (64, 96, 3)
  for keyframe, clip in zip(generated[0], clips, strict=True):
    np.testing.assert_array_equal(clip[0], keyframe)
    assert not np.array_equal(clip[1], keyframe)  # later frames are generated


def test_failed_render_leaves_the_previous_output(story_config, tmp_path, capsys):
  out = tmp_path / "out"
  out.mkdir()
  (out / "movie.mp4").write_bytes(b"previous")
  story_path = _write_story(tmp_path)
  code = cli.main(["story", str(story_path), "--out", str(out), "--config.keyframes.params=/nonexistent.safetensors"])
  assert code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "keyframes parameters" in err[0] and "does not exist" in err[0]
  assert (out / "movie.mp4").read_bytes() == b"previous"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "story.yaml"]


def test_failure_while_writing_keeps_the_previous_output(story_config, tmp_path, monkeypatch):
  # A failure inside the output folder (after the movie and clips are written): the old folder stays as it was and
  # no partial folder is left behind.
  out = tmp_path / "out"
  out.mkdir()
  (out / "movie.mp4").write_bytes(b"previous")
  story = load_story(_write_story(tmp_path))
  models = story_lib.load_models(story_config)

  def broken(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(story_lib.report, "write_report", broken)
  with pytest.raises(OSError, match="disk full"):
    story_lib.render_story(story, models, out, story_config)
  assert (out / "movie.mp4").read_bytes() == b"previous" and sorted(p.name for p in out.iterdir()) == ["movie.mp4"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "story.yaml"]


def test_parameters_must_fit_the_model(story_config, tmp_path):
  config = story_config.copy_and_resolve_references()
  config.video.params = config.keyframes.params  # a keyframe model's file given as the clip model's
  with pytest.raises(story_lib.StoryRenderError, match=r"video parameters .* do not fit video.config"):
    story_lib.load_models(config)


def test_bad_story_is_one_error_and_writes_nothing(tmp_path, capsys):
  path = _write_story(tmp_path, STORY.replace("duration: 1.0", "duration: soon"))
  code = cli.main(["story", str(path), "--out", str(tmp_path / "out")])
  assert code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "shots[1].duration" in err[0]
  assert not (tmp_path / "out").exists()


def test_metrics_json_is_strict():
  value = {"a": np.float32(0.5), "b": float("nan"), "c": [np.int64(3), float("inf")], "d": np.arange(2)}
  assert story_lib.plain_json(value) == {"a": 0.5, "b": None, "c": [3, None], "d": [0, 1]}


def test_setting_is_read_from_the_caption():
  assert story_lib.setting_of("In a sunny meadow, Ada, the red circle, waits.").name == "meadow"
  assert story_lib.setting_of("By a turquoise lagoon, Bo waits.").name == "lagoon"
  assert story_lib.setting_of("Somewhere else entirely.") is None


def test_demo_job_end_to_end(story_config, tmp_path, capsys):
  # The demo with two films and the tiny random models: synth -> ingest -> story -> checks printed.
  config = load_config("configs/story.py")
  config.update_from_flattened_dict({"demo.root": str(tmp_path / "run"), "demo.num_films": 2})
  config.keyframes.update(story_config.keyframes)
  config.video.update(story_config.video)
  config.render.progress = False
  config.demo.story = str(_write_story(tmp_path))
  code = demo.main(config)
  out = capsys.readouterr().out
  # The exit status is the verdict of the checks printed (random weights pass some, fail others).
  metrics = json.loads((tmp_path / "run" / "movie" / "metrics.json").read_text())
  assert code == (0 if all(ok for _, ok, _ in demo.checks(metrics)) else 1)
  assert "wrote 2 films" in out and "report:" in out
  assert "shots detected = shots in the story" in out and "no NaN latents" in out
  for name in ("movie.mp4", "keyframes.png", "metrics.json", "report.html"):
    assert (tmp_path / "run" / "movie" / name).is_file()


def test_demo_checks_judge_the_metrics():
  metrics = {
    "story": {"shots": 5},
    "frames": {"nonfinite_latents": 0, "constant_frames": 0, "frames": 100},
    "video": {"num_shots": 5, "dynamic_degree": 0.4},
    "adherence": {"presence": 0.75, "colour_consistency": 0.5},
  }
  results = {name: ok for name, ok, _ in demo.checks(metrics)}
  assert results["shots detected = shots in the story"] and results["objects move (dynamic degree > 0)"]
  assert results["captioned character present >= 70%"] and not results["character keeps its colour >= 80%"]
  metrics["video"]["num_shots"] = 4
  metrics["frames"]["constant_frames"] = 3
  results = {name: ok for name, ok, _ in demo.checks(metrics)}
  assert not results["shots detected = shots in the story"] and not results["no constant frames"]
  del metrics["video"]  # metrics not computed: their checks are left out rather than failed
  metrics["adherence"]["colour_consistency"] = None  # nothing to score
  results = {name: (ok, figure) for name, ok, figure in demo.checks(metrics)}
  assert "objects move (dynamic degree > 0)" not in results
  assert results["character keeps its colour >= 80%"] == (False, "n/a")


def test_a_model_on_precomputed_text_reads_the_store(story_config, tmp_path):
  # A clip model trained on frozen-encoder states (no text.encoder) reads each story caption's states from a store.
  from cinema_jax.data.embeddings import write_text_embeddings

  overrides = (*VIDEO_OVERRIDES, "text.encoder.enabled=False")
  _export_random("configs/train_video.py:story", overrides, tmp_path / "video.safetensors", 2)
  story = load_story(_write_story(tmp_path))
  config = story_config.copy_and_resolve_references()
  config.video.params = str(tmp_path / "video.safetensors")
  config.video.overrides = overrides
  with pytest.raises(story_lib.StoryRenderError, match="set video.text_embeddings to a store"):
    story_lib.load_models(config)
  captions = [shot.caption for shot in story.shots]
  rng = np.random.default_rng(0)
  config.video.text_embeddings = str(
    write_text_embeddings(tmp_path / "text.safetensors", captions[:1], rng.normal(size=(1, 40, 64)),
                          np.ones((1, 40), bool))
  )  # fmt: skip
  models = story_lib.load_models(config)
  generated = story_lib.generate_keyframes(story, models, seed=0, progress=False)
  with pytest.raises(ValueError, match="has no caption 'In a desert"):  # the store lacks shot 2's caption
    story_lib.generate_clips(story, models, generated, [16, 16], seed=0, progress=False)
  config.video.text_embeddings = str(
    write_text_embeddings(tmp_path / "text.safetensors", captions, rng.normal(size=(2, 40, 64)),
                          np.ones((2, 40), bool))
  )  # fmt: skip
  models = story_lib.load_models(config)
  clips, nonfinite = story_lib.generate_clips(story, models, generated, [16, 16], seed=0, progress=False)
  assert nonfinite == [0, 0] and [len(c) for c in clips] == [16, 16]
  np.testing.assert_array_equal(clips[0][0], generated[0][0])
