"""The films source: the grain keyframe loader over an ingested data set, through the stand-in encoders."""

import json

import numpy as np
import pytest

from cinema_jax.config import load_config
from cinema_jax.data import ingest
from cinema_jax.train import tasks, train_and_evaluate
from cinema_jax.train.data import STANDIN_ROWS, FilmsToKeyframes, StageData
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
  np.testing.assert_array_equal(out["txt"][0, 1], convert.table[2 % STANDIN_ROWS])
  np.testing.assert_array_equal(out["txt"][0, 2], 0.0)  # masked token
  pooled = (convert.table[1] + convert.table[2]) / 2 @ convert.pool
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
