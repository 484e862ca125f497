"""Story -> movie: keyframes top-down with GoldenMem memory, then each shot's clip bottom-up by diffusion forcing.

Legend: K shots, F_k frames of shot k, (H, W) pixels, T caption tokens, C_txt / C_vec text widths.

``render_story(story, models, out_dir)``:

1. Text: every caption is tokenised (``cinema_jax.data.text``) and encoded by each model's own text encoder (the
   small encoders trained with the demo models); a model trained on precomputed states (frozen T5 / CLIP / umT5)
   reads each caption's states from a text-embedding store instead (``keyframes.text_embeddings``,
   ``video.text_embeddings``; ``cinema_jax.data.embeddings``).
2. Keyframes (top-down): keyframe k is sampled by the keyframe MM-DiT from its caption and keyframes 1..k-1 packed
   by GoldenMem (``KeyframePipeline``: newest at full size, older ones on the Fibonacci pyramid, chosen by recency
   or caption similarity).
3. Clips (bottom-up): shot k's clip is rolled out by the diffusion-forcing video DiT with the keyframe as the first
   window's clean image prefix and the caption as the prompt, window by window (``LongVideoSampler``: W frames,
   then W - O per window with O carried over), until the shot's F_k frames exist.
4. Decoding through the models' codec, then the outputs: ``movie.mp4`` (H.264, plays in browsers), ``clips/`` (one
   mp4 per shot), ``keyframes/`` (one PNG per shot) and the ``keyframes.png`` contact sheet, ``metrics.json``
   (``cinema_jax.eval`` metrics of the movie, frame sanity checks and story adherence) and ``report.html``.

Everything is written into a temporary sibling folder that replaces ``out_dir`` only when the whole story is done
(``report.atomic_output_dir``): a failed run leaves no half-written output and an earlier output intact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from cinema_jax.config import load_config
from cinema_jax.data import synthetic
from cinema_jax.data.text import get_tokenizer
from cinema_jax.models.codecs import PixelCodec
from cinema_jax.pipelines import report
from cinema_jax.pipelines.keyframes import CaptionEmbedding, KeyframePipeline
from cinema_jax.pipelines.long_video import LongVideoSampler, RolloutSettings, video_dit_apply
from cinema_jax.pipelines.story_file import Story, shot_frames
from cinema_jax.train import export, tasks


class StoryRenderError(RuntimeError):
  """A story that cannot be rendered with these models (e.g. the models' parameters are missing)."""


@dataclasses.dataclass
class _TextModel:
  """A model's tokenizer and text encoder: captions -> (states [N, T, C_txt], pooled [N, C_vec] or None)."""

  tokenizer: Any
  caption_tokens: int
  encoder: Any
  params: Any

  def __post_init__(self):
    self._apply = jax.jit(lambda p, ids, mask: self.encoder.apply({"params": p}, ids, mask))

  def __call__(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray | None]:
    ids, mask = self.tokenizer(list(captions), self.caption_tokens)
    states, pooled = self._apply(self.params, jnp.asarray(ids), jnp.asarray(mask))
    return np.asarray(states), None if pooled is None else np.asarray(pooled)


@dataclasses.dataclass
class _StoredTextModel:
  """Precomputed caption states (frozen T5 / CLIP / umT5 outputs) from a text-embedding store."""

  store: Any

  def __call__(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray | None]:
    states, _, pooled = self.store.lookup(list(captions))
    return states, pooled


def _text_model(task, params, embeddings: str, what: str) -> _TextModel | _StoredTextModel:
  """The model's own text encoder, or (a model trained on precomputed states) the store at ``embeddings``."""
  from cinema_jax.data.embeddings import EmbeddingsError, TextEmbeddings

  if task.text is not None:
    config = task.config
    e = config.text.encoder
    tokenizer = get_tokenizer(e.tokenizer, **({"vocab_size": e.vocab_size} if e.tokenizer == "words" else {}))
    return _TextModel(tokenizer, config.text.caption_tokens, task.text, params["text"])
  if not embeddings:
    raise StoryRenderError(
      f"the {what} model reads precomputed text states: set {what}.text_embeddings to a store holding every caption "
      "of the story (cinema_jax.data.embeddings)"
    )
  try:
    return _StoredTextModel(TextEmbeddings.load(embeddings))
  except EmbeddingsError as e:
    raise StoryRenderError(f"{what} text embeddings: {e}") from e


@dataclasses.dataclass
class StoryModels:
  """The keyframe and clip models with their text encoders and codecs, ready to sample."""

  keyframe_config: ml_collections.ConfigDict
  video_config: ml_collections.ConfigDict
  keyframes: KeyframePipeline
  keyframe_text: _TextModel | _StoredTextModel
  keyframe_codec: PixelCodec
  video: LongVideoSampler
  video_text: _TextModel | _StoredTextModel
  video_codec: PixelCodec
  sources: dict  # what was loaded: parameter files and their training steps


def _params_path(spec: str) -> pathlib.Path:
  path = pathlib.Path(spec)
  return path / export.FILENAME if path.is_dir() else path


def _load(spec: str, what: str) -> tuple[dict, dict]:
  path = _params_path(spec)
  try:
    return export.load_params(path)
  except export.ParamsFileError as e:
    raise StoryRenderError(
      f"{what} parameters: {e} (train them with `make demo TRAIN=1`, or point {what}.params at a params file)"
    ) from e


def _check_model_config(config, what: str) -> None:
  if config.codec.kind != "pixels":
    raise StoryRenderError(f"the {what} config has codec.kind={config.codec.kind!r}; this pipeline decodes pixels")
  c = config.codec
  model_size = (
    (config.frame.height * config.latent.patch, config.frame.width * config.latent.patch)
    if what == "keyframes"
    else (config.sampling.latent_height, config.sampling.latent_width)
  )
  if (c.height, c.width) != model_size:
    raise StoryRenderError(f"the {what} config's codec latent is {c.height} x {c.width}, its model's {model_size}")


def _check_params(task, params: dict, spec: str, what: str) -> None:
  """The parameter file must hold exactly the tree the config's model (and text encoder) would create."""
  abstract = jax.eval_shape(lambda: nn.meta.unbox(task.init(jax.random.key(0), task.example_batch(1, 1))["params"]))
  want = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(abstract)}
  have = {jax.tree_util.keystr(k): tuple(np.shape(v)) for k, v in jax.tree_util.tree_leaves_with_path(params)}
  for name in sorted(set(want) | set(have)):
    if want.get(name) != have.get(name):
      raise StoryRenderError(
        f"{what} parameters {_params_path(spec)} do not fit {what}.config: {name} is "
        f"{have.get(name, 'missing')} in the file, {want.get(name, 'absent')} in the model"
      )


def load_models(config: ml_collections.ConfigDict) -> StoryModels:
  """Builds both models from ``config`` (configs/story.py): their configs, parameters and codecs."""
  kf_config = load_config(config.keyframes.config, [f"--config.{o}" for o in config.keyframes.overrides])
  vd_config = load_config(config.video.config, [f"--config.{o}" for o in config.video.overrides])
  _check_model_config(kf_config, "keyframes")
  _check_model_config(vd_config, "video")
  if config.render.memory not in ("recency", "similarity"):
    raise StoryRenderError(f"render.memory={config.render.memory!r}: choose recency or similarity")
  kf_params, kf_meta = _load(config.keyframes.params, "keyframes")
  vd_params, vd_meta = _load(config.video.params, "video")
  kf_task, vd_task = tasks.make_task(kf_config), tasks.make_task(vd_config)
  _check_params(kf_task, kf_params, config.keyframes.params, "keyframes")
  _check_params(vd_task, vd_params, config.video.params, "video")

  kf_config.goldenmem.selection = config.render.memory
  kf_text = _text_model(kf_task, kf_params, config.keyframes.text_embeddings, "keyframes")
  vd_text = _text_model(vd_task, vd_params, config.video.text_embeddings, "video")
  keyframes = KeyframePipeline(kf_task.model, {"params": kf_task.denoiser_params(kf_params)}, kf_config)
  kf_codec = PixelCodec.from_config(kf_config.codec)

  vd_codec = PixelCodec.from_config(vd_config.codec)
  fps = vd_config.sampling.fps if vd_config.model.fps_embedding else None
  sampler = LongVideoSampler(
    video_dit_apply(vd_task.model, fps),
    {"params": vd_task.denoiser_params(vd_params)},
    RolloutSettings.from_config(vd_config.sampling),
    latent_shape=vd_codec.latent_shape,
  )
  sources = {
    "keyframes": {"params": str(_params_path(config.keyframes.params)), "step": int(kf_meta.get("step", 0))},
    "video": {"params": str(_params_path(config.video.params)), "step": int(vd_meta.get("step", 0))},
  }
  return StoryModels(kf_config, vd_config, keyframes, kf_text, kf_codec, sampler, vd_text, vd_codec, sources)


def setting_of(caption: str) -> synthetic.Setting | None:
  """The synthetic world's setting a caption names (its "where" phrase), or None."""
  text = caption.lower()
  found = [s for s in synthetic.SETTINGS if s.where.lower() in text]
  return max(found, key=lambda s: len(s.where)) if found else None


def _shot_seed(story: Story, k: int, base: int) -> int:
  seed = story.shots[k].seed
  return base + k if seed is None else seed


def generate_keyframes(
  story: Story, models: StoryModels, *, seed: int, progress: bool
) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """One keyframe per shot, each conditioned on the earlier ones through GoldenMem: (pictures uint8 [H, W, 3],
  latents [h, w, C])."""
  captions = [shot.caption for shot in story.shots]
  states, pooled = models.keyframe_text(captions)
  if pooled is None:
    raise StoryRenderError("the keyframe model needs a pooled text vector per caption; its text source has none")
  embeddings = [CaptionEmbedding(states[k], pooled[k]) for k in range(len(captions))]
  latents: list[np.ndarray] = []
  for k in tqdm(range(len(captions)), desc="keyframes", unit="keyframe", disable=not progress):
    latents.append(
      models.keyframes.generate_next(latents, embeddings[:k], embeddings[k], seed=_shot_seed(story, k, seed))
    )
  return [models.keyframe_codec.decode(x) for x in latents], latents


def _nonfinite(x: np.ndarray) -> int:
  return int(np.size(x) - np.isfinite(x).sum())


def _prefix(models: StoryModels, picture: np.ndarray, latent: np.ndarray) -> np.ndarray:
  """The clip's image prefix: the keyframe's latent when both models share a latent space (no decode/encode round
  trip, so the clip opens on exactly the keyframe), else the decoded keyframe encoded by the video codec."""
  kc, vc = models.keyframe_codec, models.video_codec
  if (kc.latent_shape, kc.out_height, kc.out_width) == (vc.latent_shape, vc.out_height, vc.out_width):
    return np.asarray(latent, np.float32)
  return vc.encode(picture)


def generate_clips(
  story: Story, models: StoryModels, keyframes: tuple[Sequence[np.ndarray], Sequence[np.ndarray]],
  frames: Sequence[int], *, seed: int, progress: bool,
) -> tuple[list[np.ndarray], list[int]]:  # fmt: skip
  """Each shot's clip (uint8 [F_k, H, W, 3]) rolled out from its keyframe (``generate_keyframes``' pictures and
  latents); also the non-finite latent count per shot (a diverging model shows here before uint8 hides it)."""
  states, _ = models.video_text([shot.caption for shot in story.shots])
  latent_clips, nonfinite = [], []
  for k, (picture, latent) in enumerate(zip(*keyframes, strict=True)):
    prefix = np.nan_to_num(_prefix(models, picture, latent))[None, None]  # [1, 1, h, w, c]
    context = states[k : k + 1]
    latents = models.video.generate(
      context, num_frames=frames[k], image_prefix=prefix, negative_prompts=np.zeros_like(context),
      key=jax.random.key(_shot_seed(story, k, seed)), progress=progress,
    )[0]  # fmt: skip
    nonfinite.append(_nonfinite(latents))
    latent_clips.append(np.nan_to_num(latents))
  clips = [models.video_codec.decode(x) for x in tqdm(latent_clips, desc="decoding", unit="clip", disable=not progress)]
  return clips, nonfinite


def frame_checks(clips: Sequence[np.ndarray], nonfinite: Sequence[int], keyframe_latents=()) -> dict:
  """Sanity of the rendered frames: NaN/inf latents (keyframes and clips) and constant (single-colour) frames."""
  constant = [int(sum(float(f.std()) < 1.0 for f in clip)) for clip in clips]
  bad = int(sum(nonfinite)) + sum(_nonfinite(x) for x in keyframe_latents)
  return {"nonfinite_latents": bad, "constant_frames": int(sum(constant)), "frames": int(sum(len(c) for c in clips))}


def plain_json(value: Any) -> Any:
  """``value`` with numpy scalars and arrays as Python values and NaN / inf as None: strict JSON (a score with
  nothing to average is NaN, which ``json.dumps`` would write as the non-standard token ``NaN``)."""
  if isinstance(value, dict):
    return {str(k): plain_json(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [plain_json(v) for v in value]
  if isinstance(value, np.ndarray):
    return plain_json(value.tolist())
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float) and not np.isfinite(value):
    return None
  return value


def render_story(
  story: Story, models: StoryModels, out_dir: str | os.PathLike, config: ml_collections.ConfigDict
) -> dict:
  """Renders ``story`` into ``out_dir`` (see the module docstring); returns the metrics written to metrics.json."""
  r = config.render
  fps = float(r.fps or models.video_config.sampling.fps)
  if fps <= 0:
    raise StoryRenderError(f"render.fps must be positive, got {r.fps}")
  progress = bool(r.progress)
  notes = [
    "Keyframes: keyframe MM-DiT with GoldenMem memory of the earlier keyframes; clips: diffusion-forcing "
    "rollout from each keyframe.",
    "Consistency and adherence figures are classical proxies (see docs/eval.md and docs/adherence.md).",
  ]
  controlled = [k + 1 for k, shot in enumerate(story.shots) if shot.control is not None]
  if controlled:  # the LongVie control branches are not built: say so rather than pretend
    note = f"control videos of shots {controlled} are not used: this pipeline has no control branches yet"
    print(f"warning: {note}", file=sys.stderr)
    notes.append(f"Note: {note}.")
  frames = shot_frames(story, fps, minimum=int(r.min_shot_frames))
  generated = generate_keyframes(story, models, seed=int(r.seed), progress=progress)
  keyframes = generated[0]
  clips, nonfinite = generate_clips(story, models, generated, frames, seed=int(r.seed), progress=progress)
  expected = [[c.name for c in story.characters_in(k)] for k in range(len(story.shots))]
  settings = [setting_of(shot.caption) for shot in story.shots]

  with report.atomic_output_dir(out_dir) as tmp:
    (tmp / "clips").mkdir()
    (tmp / "keyframes").mkdir()
    for k, (keyframe, clip) in enumerate(zip(keyframes, clips, strict=True)):
      report.write_png(tmp / "keyframes" / f"shot_{k + 1:02d}.png", keyframe)
      report.write_movie(clip, tmp / "clips" / f"shot_{k + 1:02d}.mp4", fps)
    movie = np.concatenate(clips)
    report.write_movie(movie, tmp / "movie.mp4", fps)
    labels = [f"{k + 1}. {', '.join(names) or '-'}" for k, names in enumerate(expected)]
    report.write_png(tmp / "keyframes.png", report.contact_sheet(keyframes, labels))

    metrics: dict[str, Any] = {
      "story": {
        "title": story.title,
        "shots": len(story.shots),
        "frames_per_shot": frames,
        "fps": fps,
        "unused_control_shots": controlled,
      },  # fmt: skip
      "models": models.sources,
      "frames": frame_checks(clips, nonfinite, generated[1]),
    }
    if config.eval.metrics:
      from cinema_jax.eval import evaluate_video

      metrics["video"] = evaluate_video(tmp / "movie.mp4")
      metrics["video"]["path"] = "movie.mp4"  # relative to the output folder (it was measured before publishing)
      metrics["video"]["shots_expected"] = len(story.shots)
    per_shot: list[dict] = [{} for _ in story.shots]
    if config.eval.adherence:
      from cinema_jax.eval import adherence

      result = adherence.story_adherence(keyframes, expected, settings=settings)
      metrics["adherence"] = {k: v for k, v in result.items() if k != "per_shot"}
      clip_scores = [
        adherence.clip_presence(clip, names, setting=setting) if names else None
        for clip, names, setting in zip(clips, expected, settings, strict=True)
      ]
      known = [s for s in clip_scores if s is not None]
      metrics["adherence"]["clip_presence"] = float(np.mean(known)) if known else None
      for k, shot_result in enumerate(result["per_shot"]):
        per_shot[k] = {
          "found": ", ".join(shot_result["found"]) or "-",
          "missing": ", ".join(shot_result["missing"]) or "-",
          "clip_presence": clip_scores[k],
        }
    metrics = plain_json(metrics)
    text = json.dumps(metrics, indent=2, allow_nan=False)
    (tmp / "metrics.json").write_text(text + "\n", encoding="utf-8")
    shots = [
      {"caption": shot.caption, "keyframe": keyframes[k], "clip": f"clips/shot_{k + 1:02d}.mp4",
       "duration": frames[k] / fps, "metrics": per_shot[k]}
      for k, shot in enumerate(story.shots)
    ]  # fmt: skip
    report.write_report(tmp / "report.html", title=story.title, shots=shots, metrics=metrics, notes=notes)
  return metrics


def story_main(argv: list[str]) -> int:
  """``cinema-jax story STORY.yaml --out DIR [--config configs/story.py[:variant]] [--config.a.b=v ...]``."""
  import argparse

  from cinema_jax.config import ConfigError
  from cinema_jax.data.embeddings import EmbeddingsError
  from cinema_jax.pipelines.story_file import StoryError, load_story

  p = argparse.ArgumentParser(prog="cinema-jax story", description="Render a story file into a movie and a report.")
  p.add_argument("story", help="story file (YAML): title, characters, shots (caption, duration, seed, control)")
  p.add_argument("--out", required=True, help="output folder (replaced only when the whole story is done)")
  p.add_argument("--config", default="configs/story.py", help="pipeline config[:variant] (default: %(default)s)")
  args, rest = p.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith("--config.")]
  if bad:
    p.error(f"unrecognized arguments: {' '.join(bad)}")
  try:
    config = load_config(args.config, rest)
    story = load_story(args.story)
    models = load_models(config)
    metrics = render_story(story, models, args.out, config)
  except (ConfigError, StoryError, StoryRenderError, EmbeddingsError) as e:
    print(f"cinema-jax story: {e}", file=sys.stderr)
    return 2
  print_summary(args.out, metrics)
  return 0


def print_summary(out_dir: str | os.PathLike, metrics: dict) -> None:
  out = pathlib.Path(out_dir)
  lines = [f"movie:      {out / 'movie.mp4'}", f"clips:      {out / 'clips'}/",
           f"keyframes:  {out / 'keyframes.png'}", f"metrics:    {out / 'metrics.json'}",
           f"report:     {out / 'report.html'}"]  # fmt: skip
  video, adh = metrics.get("video", {}), metrics.get("adherence", {})

  def fmt(value, spec):
    return "n/a" if value is None else format(value, spec)

  if video:
    lines.append(
      f"shots detected {video.get('num_shots')} / {video.get('shots_expected')}, dynamic degree "
      f"{fmt(video.get('dynamic_degree'), '.2f')}, temporal flickering {fmt(video.get('temporal_flickering'), '.3f')}"
    )
  if adh:
    lines.append(
      f"adherence: character present in {fmt(adh.get('presence'), '.0%')} of captioned keyframe slots, colour kept "
      f"in {fmt(adh.get('colour_consistency'), '.0%')} of later appearances"
    )
  print("\n".join(lines))
