"""The films source: the grain keyframe and clip loaders over an ingested data set, through the pixel codec and
either the stand-in text table or the jointly trained text encoder."""

import json
import pathlib

import numpy as np
import pytest

from cinema_jax.config import load_config
from cinema_jax.data import ingest
from cinema_jax.train import tasks, train_and_evaluate
from cinema_jax.train.data import STANDIN_ROWS, FilmsToClips, FilmsToKeyframes, StageData
from tests.test_data_synthetic import tiny_config, tiny_films


@pytest.fixture(scope="module")
def films_config(tmp_path_factory):
  base = tmp_path_factory.getbasetemp()
  out = base / "train-shards"
  ingest.ingest(tiny_films(base, num_films=3, seed=3), out, tiny_config().ingest, progress=False)
  return load_config(
    "configs/train_keyframes.py:tiny",
    ["--config.train.progress=False", "--config.data.source=films", f"--config.data.root={out}",
     "--config.model.in_channels=12", "--config.model.out_channels=12", "--config.latent.channels=3",
     "--config.train.stage_steps=(2,)", "--config.train.stage_lengths=(2,)", "--config.checkpoint.every=1"],
  )  # fmt: skip


def test_stand_in_conversion_by_hand(films_config):
  convert = FilmsToKeyframes(films_config, seed=0)
  images = np.zeros((1, 2, 16, 16, 3), np.uint8)
  images[0, 0] = 255  # keyframe 0 white, keyframe 1 black
  tokens = np.array([[[1, 2, 0, 0], [5, 0, 0, 0]]], np.int32)
  mask = tokens > 0
  out = convert({"images": images, "caption_tokens": tokens, "caption_mask": mask, "num_keyframes": np.array([2])})
  assert out["img"].shape == (1, 2 * 64, 12)
  np.testing.assert_allclose(out["img"][0, :64], 1.0)
  np.testing.assert_allclose(out["img"][0, 64:], -1.0)
  assert out["txt"].shape == (1, 8, 32)
  table, pool = convert.text.table, convert.text.pool
  np.testing.assert_array_equal(out["txt"][0, 1], table[2 % STANDIN_ROWS])
  np.testing.assert_array_equal(out["txt"][0, 2], 0.0)  # masked token
  pooled = (table[1] + table[2]) / 2 @ pool
  np.testing.assert_allclose(out["y"][0, 0], pooled, rtol=1e-5)
  assert out["num_memory"].tolist() == [1]
  bad = load_config("configs/train_keyframes.py:tiny")
  with pytest.raises(ValueError, match="model.in_channels=16"):
    FilmsToKeyframes(bad, seed=0)


def test_films_position_resumes_the_same_stream(films_config):
  task = tasks.make_task(films_config)
  kw = dict(stage=0, length=2, process_index=0, process_count=1)
  first = StageData(task, films_config, **kw)
  straight = [next(first) for _ in range(3)]
  second = StageData(task, films_config, **kw)
  next(second), next(second)
  state = json.loads(json.dumps(second.get_state()))  # what the checkpoint stores
  third = StageData(task, films_config, **kw)
  third.set_state(state)
  resumed = next(third)
  for name in straight[2]:
    np.testing.assert_array_equal(resumed[name], straight[2][name])


def test_training_on_films(films_config, tmp_path):
  result = train_and_evaluate(films_config, tmp_path)
  assert [h["length"] for h in result.history] == [2, 2]
  assert all(np.isfinite(h["loss"]) and h["loss"] > 0 for h in result.history)
  data = json.loads((tmp_path / "checkpoints/2/data/metadata").read_text())
  assert data["stage"] == 0 and isinstance(data["iterator"]["grain"], str)


@pytest.fixture(scope="module")
def video_films_config(films_config):
  # The story clip model's layout (pixel codec, 8 x 8-pixel tokens, its own text encoder) at toy width, on the tiny
  # data set's 48 x 64 clips of 6 frames.
  return load_config(
    "configs/train_video.py:story",
    ["--config.train.progress=False", f"--config.data.root={films_config.data.root}", "--config.mesh.data=-1",
     "--config.model.width=32", "--config.model.heads=2", "--config.model.depth=1", "--config.model.ffn_dim=64",
     "--config.text.encoder.width=16", "--config.text.encoder.depth=1", "--config.text.encoder.heads=2",
     "--config.sampling.latent_height=48", "--config.sampling.latent_width=64", "--config.codec.height=48",
     "--config.codec.width=64", "--config.sampling.text_len=32",
     "--config.text.caption_tokens=32", "--config.data.loader.caption_tokens=32",
     "--config.data.loader.tokenizer=words",
     "--config.train.batch_size=8", "--config.train.stage_steps=(2,)", "--config.train.stage_lengths=(4,)",
     "--config.checkpoint.every=1"],
  )  # fmt: skip


def test_clip_conversion_by_hand(video_films_config):
  convert = FilmsToClips(video_films_config, length=2, seed=0)
  frames = np.zeros((1, 3, 48, 64, 3), np.uint8)
  frames[0, 1] = 255
  tokens = np.zeros((1, 32), np.int32)
  tokens[0, :3] = [1, 9, 2]
  out = convert({"frames": frames, "caption_tokens": tokens, "caption_mask": tokens > 0})
  np.testing.assert_array_equal(out["latents"][0, 0], -1.0)  # black -> -1, white -> 1, only the first 2 frames
  np.testing.assert_array_equal(out["latents"][0, 1], 1.0)
  assert out["latents"].shape == (1, 2, 48, 64, 3)
  np.testing.assert_array_equal(out["caption_ids"], tokens)  # ids go to the jointly trained encoder
  with pytest.raises(ValueError, match="clips have 3 frames, the training stage asks for 4"):
    FilmsToClips(video_films_config, length=4, seed=0)({"frames": frames, "caption_tokens": tokens,
                                                         "caption_mask": tokens > 0})  # fmt: skip


def test_video_training_on_film_clips(video_films_config, tmp_path):
  result = train_and_evaluate(video_films_config, tmp_path)
  assert [h["length"] for h in result.history] == [4, 4]
  assert all(np.isfinite(h["loss"]) and h["loss"] > 0 for h in result.history)
  # Both the video DiT and its text encoder were trained and exported for sampling.
  from cinema_jax.train.export import load_params

  params, meta = load_params(tmp_path / "params.safetensors")
  assert set(params) == {"denoiser", "text"} and meta["source"] == "ema" and meta["step"] == "2"
  final = result.state.ema["text"]["token_embedding"]
  np.testing.assert_allclose(params["text"]["token_embedding"], np.asarray(final), rtol=1e-6)


def test_precomputed_text_embeddings_feed_the_keyframe_task(films_config, tmp_path):
  # A store of frozen-encoder states for every caption of the data set (here seeded random states standing in for
  # T5 + CLIP): the keyframe batch's text is exactly the stored rows of its captions, padding slots zero.
  from cinema_jax.data.embeddings import TextEmbeddings, write_text_embeddings

  films = sorted(pathlib.Path(films_config.data.root).parent.glob("films-3-3/*.json"))
  captions = sorted({shot["caption"] for f in films for shot in json.loads(f.read_text())["shots"]})
  rng = np.random.default_rng(0)
  t, width, vec = films_config.text.caption_tokens, films_config.model.context_in_dim, films_config.model.vec_in_dim
  mask = np.ones((len(captions), t), bool)
  mask[:, t - 1 :] = False
  store = write_text_embeddings(
    tmp_path / "text.safetensors", captions, rng.normal(size=(len(captions), t, width)), mask,
    rng.normal(size=(len(captions), vec)),
  )  # fmt: skip
  config = films_config.copy_and_resolve_references()
  config.data.text_embeddings = str(store)
  convert = FilmsToKeyframes(config, seed=0)
  data = StageData(tasks.make_task(config), config, stage=0, length=2, process_index=0, process_count=1)
  raw = next(data.iterator)
  out = convert(raw)
  table = TextEmbeddings.load(store)
  for b in range(raw["captions"].shape[0]):
    for k, caption in enumerate(raw["captions"][b]):
      rows = out["txt"][b, k * t : (k + 1) * t]
      if caption:
        np.testing.assert_array_equal(rows, table.states[table.index[str(caption)]])
        np.testing.assert_array_equal(out["y"][b, k], table.pooled[table.index[str(caption)]])
      else:
        np.testing.assert_array_equal(rows, 0.0)
  bad = config.copy_and_resolve_references()
  bad.model.context_in_dim = 16
  with pytest.raises(ValueError, match=f"holds states of {t} tokens x {width}, the model takes {t} x 16"):
    FilmsToKeyframes(bad, seed=0)
