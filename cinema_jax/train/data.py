"""Training batches: one grain dataset per training stage, sharded per process, with a checkpointable position.

``synthetic`` (the only source whose samples are already model inputs): record ``i`` of stage ``s`` is
``task.synthetic_sample(default_rng([seed, s, i]), length)``. Global batch ``n`` holds records
``n * B .. n * B + B - 1``; process ``p`` of ``P`` builds records ``n * B + p * B / P ..`` of it, so the global batch
assembled in process order (``cinema_jax.data.loader.global_batch``) is the same whatever the number of processes,
and a 2-process run sees exactly the batches of a 1-process run.

``films``: the grain loaders of ``cinema_jax.data.loader`` over the ingested data set at ``data.root``
(``data.loader`` settings, shuffled per host with ``ShardByJaxProcess``, seed ``data.seed + stage``): keyframe
samples for the keyframe task (``max_keyframes`` = the stage length), clips for the video task (the first
``length`` frames of each clip). The data set holds pixels and words. Pixels become latents through the pixel codec
(``cinema_jax.models.codecs.PixelCodec``: [-1, 1] at the model's latent size; keyframes are then patchified, the
MM-DiT takes 3 x patch^2 channels per token). Words: with ``text.encoder`` enabled the token ids go to the model,
whose text encoder trains with it; otherwise the captions' precomputed states are read from ``data.text_embeddings``
(a store of frozen-encoder outputs, ``cinema_jax.data.embeddings``), or, without one, a fixed seeded table stands in
for a frozen encoder (ids hashed into ``STANDIN_ROWS`` rows; pooled text = the masked mean through a fixed
projection). Every keyframe but the last of a
sample is clean memory (the generation setting: the next keyframe from the earlier ones).

The iterator's ``get_state()`` (synthetic: ``{"next_index": n}``; films: grain's JSON text) is saved with each
checkpoint and restored on resume.
"""

from __future__ import annotations

import einops
import grain
import ml_collections
import numpy as np

from cinema_jax.models.codecs import PixelCodec

SOURCES = ("synthetic", "films")
STANDIN_ROWS = 4096  # rows of the stand-in text table (token ids are hashed into it)
_ENDLESS = 2**40  # batches per stage; the stage's step count decides how many are read


class StageData:
  """Batches of one stage for this process."""

  def __init__(self, task, config, *, stage: int, length: int, process_index: int, process_count: int):
    source = config.data.source
    if source not in SOURCES:
      raise ValueError(f"data.source={source!r} is not a training source; choose one of {', '.join(SOURCES)}")
    global_batch = config.train.batch_size
    if global_batch % process_count:
      raise ValueError(f"train.batch_size={global_batch} does not split over {process_count} processes")
    local = global_batch // process_count
    seed = config.data.seed
    self.convert = None
    if source == "films":
      self._films(task, config, stage=stage, length=length)
      return

    def make(n: int) -> dict:
      first = n * global_batch + process_index * local
      samples = [task.synthetic_record(seed, stage, first + j, length) for j in range(local)]
      return {name: np.stack([s[name] for s in samples]) for name in samples[0]}

    self.dataset = grain.MapDataset.range(_ENDLESS).map(make)
    self.iterator = iter(self.dataset.to_iter_dataset())

  def _films(self, task, config, *, stage: int, length: int) -> None:
    from cinema_jax.data import loader
    from cinema_jax.train.tasks import KeyframeTask, VideoTask

    if not isinstance(task, KeyframeTask | VideoTask):
      raise ValueError(f"data.source='films' feeds the keyframe and video tasks, not {type(task).__name__}")
    if not config.data.root:
      raise ValueError("data.source='films' needs data.root: an ingested data set (cinema-jax ingest ... --out DIR)")
    settings = ml_collections.ConfigDict(config.data.loader.to_dict())
    _check_tokenizer(config, settings)
    kind = "keyframes" if isinstance(task, KeyframeTask) else "clips"
    if kind == "keyframes":
      settings.max_keyframes = length
      settings.min_keyframes = min(settings.min_keyframes, length)
    ld = loader.make_loader(
      config.data.root, kind, settings, batch_size=config.train.batch_size, seed=config.data.seed + stage
    )
    self.iterator = iter(ld)
    if kind == "keyframes":
      self.convert = FilmsToKeyframes(task.config, seed=config.data.seed)
    else:
      self.convert = FilmsToClips(task.config, length=length, seed=config.data.seed)

  def __next__(self) -> dict:
    batch = next(self.iterator)
    return batch if self.convert is None else self.convert(batch)

  def get_state(self) -> dict:
    state = self.iterator.get_state()
    return {"grain": state.decode()} if isinstance(state, bytes) else state

  def set_state(self, state: dict) -> None:
    self.iterator.set_state(state["grain"].encode() if "grain" in state else state)


class _StandInText:
  """A frozen stand-in text encoder: token ids -> rows of a fixed seeded table; pooled = masked mean @ projection."""

  def __init__(self, width: int, pooled_width: int, *, seed: int):
    rng = np.random.default_rng([seed, 7])
    self.table = (rng.normal(size=(STANDIN_ROWS, width)) / np.sqrt(width)).astype(np.float32)
    self.pool = (rng.normal(size=(width, max(pooled_width, 1))) / np.sqrt(width)).astype(np.float32)

  def __call__(self, tokens: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # [..., t]
    states = self.table[tokens % STANDIN_ROWS] * mask[..., None]  # [..., t, e_txt]
    pooled = states.sum(-2) / np.maximum(mask.sum(-1, keepdims=True), 1)  # [..., e_txt]
    return states.astype(np.float32), (pooled @ self.pool).astype(np.float32)


class _StoredText:
  """Precomputed states of each caption string, from a text-embedding store."""

  def __init__(self, path: str, tokens: int, width: int, pooled_width: int):
    from cinema_jax.data.embeddings import TextEmbeddings

    self.store = TextEmbeddings.load(path)
    states, pooled = self.store.states, self.store.pooled
    if states.shape[1:] != (tokens, width):
      raise ValueError(
        f"text-embedding store {path} holds states of {states.shape[1]} tokens x {states.shape[2]}, the model takes "
        f"{tokens} x {width}"
      )
    if pooled_width and (pooled is None or pooled.shape[1] != pooled_width):
      got = "none" if pooled is None else pooled.shape[1]
      raise ValueError(
        f"text-embedding store {path} holds pooled vectors of width {got}, the model takes {pooled_width}"
      )

  def __call__(self, captions: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:  # [...] strings
    states, _, pooled = self.store.lookup([str(c) for c in captions.reshape(-1)])
    lead = captions.shape
    return states.reshape(lead + states.shape[1:]), None if pooled is None else pooled.reshape(lead + (-1,))


def _frozen_text(config, width: int, pooled_width: int, *, seed: int):
  """The frozen text source of a model without its own encoder: a store when ``data.text_embeddings`` names one."""
  data = config.get("data")
  path = data.get("text_embeddings", "") if data is not None else ""
  if path:
    return _StoredText(path, config.text.caption_tokens, width, pooled_width)
  return _StandInText(width, pooled_width, seed=seed)


def _check_tokenizer(config, loader) -> None:
  """A jointly trained text encoder must see the ids the story pipeline will give it: the same tokenizer."""
  from cinema_jax.train.tasks import uses_text_encoder

  if not uses_text_encoder(config):
    return
  e = config.text.encoder
  if loader.tokenizer != e.tokenizer or (e.tokenizer == "words" and loader.vocab_size != e.vocab_size):
    raise ValueError(
      f"data.loader tokenizes with {loader.tokenizer} (vocab_size {loader.vocab_size}) but text.encoder expects "
      f"{e.tokenizer} (vocab_size {e.vocab_size}); set data.loader.tokenizer / vocab_size to match"
    )


def _pixel_codec(config, height: int, width: int) -> PixelCodec:
  """The model's pixel codec; a ``codec`` section of kind pixels must agree with the model's latent size."""
  codec = config.get("codec")
  if codec is not None and codec.kind == "pixels" and (codec.height, codec.width) != (height, width):
    raise ValueError(f"codec.height x width = {codec.height} x {codec.width}, but the model takes {height} x {width}")
  return PixelCodec(height, width)


def _check_tokens(tokens: np.ndarray, expected: int) -> None:
  if tokens.shape[-1] != expected:
    raise ValueError(
      f"the loader gives {tokens.shape[-1]} caption tokens, the model takes text.caption_tokens={expected}; "
      "set data.loader.caption_tokens to match"
    )


class FilmsToKeyframes:
  """Loader keyframe batch (pixels, token ids) -> the keyframe task's inputs (pixel codec; text ids or stand-in)."""

  def __init__(self, config, *, seed: int):
    from cinema_jax.train.tasks import uses_text_encoder

    c = config
    self.patch, self.height, self.width = c.latent.patch, c.frame.height, c.frame.width
    self.caption_tokens = c.text.caption_tokens
    if c.model.in_channels != 3 * self.patch**2:
      raise ValueError(
        f"data.source='films' trains on pixels (3 channels x patch {self.patch}^2 = {3 * self.patch**2} per token), "
        f"but model.in_channels={c.model.in_channels}; set model.in_channels and model.out_channels to it"
      )
    self.codec = _pixel_codec(c, self.height * self.patch, self.width * self.patch)
    self.text = None if uses_text_encoder(c) else _frozen_text(c, c.model.context_in_dim, c.model.vec_in_dim, seed=seed)

  def __call__(self, batch: dict) -> dict:
    tokens, mask = batch["caption_tokens"], batch["caption_mask"]  # [b, k, t]
    _check_tokens(tokens, self.caption_tokens)
    latents = self.codec.encode(batch["images"])  # [b, k, H, W, 3]
    img = einops.rearrange(
      latents, "b k (h p1) (w p2) c -> b (k h w) (c p1 p2)", p1=self.patch, p2=self.patch
    )  # [b, k*n, 3*p*p]
    num = batch["num_keyframes"].astype(np.int32)
    out = {"img": img.astype(np.float32), "num_keyframes": num, "num_memory": num - 1}
    if self.text is None:
      out["caption_ids"], out["caption_mask"] = tokens.astype(np.int32), mask.astype(bool)
    else:
      states, pooled = self.text(batch["captions"]) if isinstance(self.text, _StoredText) else self.text(tokens, mask)
      out["txt"], out["y"] = einops.rearrange(states, "b k t e -> b (k t) e"), pooled
    return out


class FilmsToClips:
  """Loader clip batch (frames [b, T, H, W, 3], token ids) -> the video task's inputs (first ``length`` frames)."""

  def __init__(self, config, *, length: int, seed: int):
    from cinema_jax.train.tasks import uses_text_encoder

    c = config
    if tuple(c.model.patch_size)[0] != 1:
      raise ValueError(
        f"data.source='films' needs model.patch_size[0] = 1 (one latent frame per frame), got {c.model.patch_size}"
      )
    if c.model.in_channels != 3:
      raise ValueError(
        f"data.source='films' trains the video DiT on pixels (3 channels), but model.in_channels={c.model.in_channels}"
      )
    self.length = length
    self.codec = _pixel_codec(c, c.sampling.latent_height, c.sampling.latent_width)
    self.text_len = c.sampling.text_len
    self.text = None if uses_text_encoder(c) else _frozen_text(c, c.model.text_dim, 0, seed=seed)

  def __call__(self, batch: dict) -> dict:
    frames, tokens, mask = batch["frames"], batch["caption_tokens"], batch["caption_mask"]
    _check_tokens(tokens, self.text_len)
    if frames.shape[1] < self.length:
      raise ValueError(
        f"the data set's clips have {frames.shape[1]} frames, the training stage asks for {self.length}; ingest "
        "longer clips (ingest.clip_frames) or shorten train.stage_lengths"
      )
    out = {"latents": self.codec.encode(frames[:, : self.length])}
    if self.text is None:
      out["caption_ids"], out["caption_mask"] = tokens.astype(np.int32), mask.astype(bool)
    else:
      stored = isinstance(self.text, _StoredText)
      out["context"] = self.text(batch["caption"])[0] if stored else self.text(tokens, mask)[0]
    return out
