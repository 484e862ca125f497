"""Story -> movie (cinema_jax.pipelines.story) and the `make demo` job (cinema_jax.demo).

  cinema-jax story STORY.yaml --out DIR [--config configs/story.py] [--config.render.seed=3]
  cinema-jax demo [--config configs/story.py] [--config.demo.train=True]        (= make demo [TRAIN=1])

Variants (``configs/story.py:VARIANT``):

  demo  the tiny keyframe and clip models of the demo (configs/train_keyframes.py:story and
        configs/train_video.py:story) with the parameters shipped in demo/ (see demo/README.md for the commands
        that produced them); 12 fps, 64 x 96 pixels.

The models' own settings (sampling steps, CFG scales, GoldenMem, rollout windows) live in their configs; override
them here through ``keyframes.overrides`` / ``video.overrides`` (lists of ``key=value`` strings) when needed.
"""

import ml_collections
from ml_collections import config_dict

from cinema_jax.config import import_config

VARIANTS = ("demo",)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "demo"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of configs/story.py; choose one of {', '.join(VARIANTS)}")
  c = import_config("base").get_config("default")  # numerics and mesh sections shared by every config
  c.variant = variant

  # The two models: the config each was trained with, and its parameters (a params.safetensors file written by
  # `cinema-jax train`, or a training workdir holding one).
  c.keyframes = ml_collections.ConfigDict()
  c.keyframes.config = "configs/train_keyframes.py:story"
  c.keyframes.params = "demo/keyframes.safetensors"
  c.keyframes.overrides = ()  # e.g. ("sampling.num_steps=12",)
  c.keyframes.text_embeddings = ""  # a model without text.encoder: store of the story captions' precomputed states
  c.video = ml_collections.ConfigDict()
  c.video.config = "configs/train_video.py:story"
  c.video.params = "demo/video.safetensors"
  c.video.overrides = ()
  c.video.text_embeddings = ""  # as keyframes.text_embeddings

  # Rendering.
  r = c.render = ml_collections.ConfigDict()
  r.fps = 0.0  # frame rate of the clips and the movie; 0 = the clip model's own (video sampling.fps, 12)
  r.min_shot_frames = 16  # shortest shot; >= PySceneDetect's min_scene_len (15), so every cut stays detectable
  r.seed = 0  # shot k without its own seed uses seed + k (keyframe noise and clip noise)
  r.memory = "recency"  # GoldenMem slot choice: recency | similarity (caption-embedding cosine)
  r.progress = True  # progress bars: keyframes, windows, decoding

  # Evaluation written to metrics.json and the report.
  e = c.eval = ml_collections.ConfigDict()
  e.metrics = True  # cinema_jax.eval metrics of movie.mp4 (flicker, dynamics, smoothness, consistency, drift, shots)
  e.adherence = True  # synthetic-world classifier: captioned characters present, colours kept across shots

  # The demo (cinema_jax.demo): synthetic films -> ingest -> (train) -> the story -> movie.
  d = c.demo = ml_collections.ConfigDict()
  d.story = "stories/demo.yaml"
  d.root = "runs/story"  # films/, data/, keyframes/ and video/ (training workdirs), movie/ (the outputs)
  d.data_config = "configs/data.py:story"  # the synthetic films and their ingest settings
  d.num_films = config_dict.placeholder(int)  # None: the data config's synth.num_films (480, the training set)
  d.train = False  # True: train both models here (about an hour on 2 CPU cores) instead of loading demo/*.safetensors
  return c
