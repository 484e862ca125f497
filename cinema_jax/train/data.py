"""Training batches: one grain dataset per training stage, sharded per process, with a checkpointable position.

``synthetic`` (the only source whose samples are already model inputs): record ``i`` of stage ``s`` is
``task.synthetic_sample(default_rng([seed, s, i]), length)``. Global batch ``n`` holds records
``n * B .. n * B + B - 1``; process ``p`` of ``P`` builds records ``n * B + p * B / P ..`` of it, so the global batch
assembled in process order (``cinema_jax.data.loader.global_batch``) is the same whatever the number of processes,
and a 2-process run sees exactly the batches of a 1-process run.

``films`` (keyframe task): the grain loader of ``cinema_jax.data.loader`` over the ingested data set at
``data.root`` (``data.loader`` settings, ``max_keyframes`` = the stage length, shuffled per host with
``ShardByJaxProcess``, seed ``data.seed + stage``). The data set holds pixels and words, and the autoencoder and text
encoders are not part of the project yet, so ``films_to_keyframes`` stands in for them: pixels in [-1, 1]
area-resized to the latent grid and patchified (the model takes 3 x patch^2 channels), caption token ids looked up
in a fixed seeded table (hashed into ``STANDIN_ROWS`` rows), pooled text = the masked mean through a fixed
projection. Every keyframe but the last of a sample is clean memory (the generation setting: the next keyframe
from the earlier ones).

The iterator's ``get_state()`` (synthetic: ``{"next_index": n}``; films: grain's JSON text) is saved with each
checkpoint and restored on resume.
"""

from __future__ import annotations

import einops
import grain
import ml_collections
import numpy as np

from cinema_jax.models.goldenmem import area_resize

SOURCES = ("synthetic", "films")
STANDIN_ROWS = 4096  # rows of the stand-in text table (token ids are hashed into it)
_ENDLESS = 2**40  # batches per stage; the stage's step count decides how many are read


class StageData:
  """Batches of one stage for this process."""

  def __init__(self, task, config, *, stage: int, length: int, process_index: int, process_count: int):
    source = config.data.source
    if source not in SOURCES:
      raise ValueError(
        f"data.source={source!r} is not a training source; choose one of {', '.join(SOURCES)} (film data sets "
        "give pixels and words, which need the autoencoder and text encoder to become model inputs)"
      )
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
    from cinema_jax.train.tasks import KeyframeTask

    if not isinstance(task, KeyframeTask):
      raise ValueError(f"data.source='films' feeds the keyframe task only, not {type(task).__name__}")
    settings = ml_collections.ConfigDict(config.data.loader.to_dict())
    settings.max_keyframes = length
    settings.min_keyframes = min(settings.min_keyframes, length)
    ld = loader.make_loader(
      config.data.root, "keyframes", settings, batch_size=config.train.batch_size, seed=config.data.seed + stage
    )
    self.iterator = iter(ld)
    self.convert = FilmsToKeyframes(task.config, seed=config.data.seed)

  def __next__(self) -> dict:
    batch = next(self.iterator)
    return batch if self.convert is None else self.convert(batch)

  def get_state(self) -> dict:
    state = self.iterator.get_state()
    return {"grain": state.decode()} if isinstance(state, bytes) else state

  def set_state(self, state: dict) -> None:
    self.iterator.set_state(state["grain"].encode() if "grain" in state else state)


class FilmsToKeyframes:
  """Loader keyframe batch (pixels, token ids) -> the keyframe task's inputs, through the stand-in encoders."""

  def __init__(self, config, *, seed: int):
    c = config
    self.patch, self.height, self.width = c.latent.patch, c.frame.height, c.frame.width
    self.caption_tokens = c.text.caption_tokens
    if c.model.in_channels != 3 * self.patch**2:
      raise ValueError(
        f"data.source='films' trains on pixels (3 channels x patch {self.patch}^2 = {3 * self.patch**2} per token), "
        f"but model.in_channels={c.model.in_channels}; set model.in_channels and model.out_channels to it"
      )
    rng = np.random.default_rng([seed, 7])
    width = c.model.context_in_dim
    self.table = (rng.normal(size=(STANDIN_ROWS, width)) / np.sqrt(width)).astype(np.float32)
    self.pool = (rng.normal(size=(width, c.model.vec_in_dim)) / np.sqrt(width)).astype(np.float32)

  def __call__(self, batch: dict) -> dict:
    tokens, mask = batch["caption_tokens"], batch["caption_mask"]  # [b, k, t]
    if tokens.shape[-1] != self.caption_tokens:
      raise ValueError(
        f"the loader gives {tokens.shape[-1]} caption tokens, the model takes text.caption_tokens="
        f"{self.caption_tokens}; set data.loader.caption_tokens to match"
      )
    pixels = batch["images"].astype(np.float32) / 127.5 - 1.0  # [b, k, h, w, 3]
    size = (self.height * self.patch, self.width * self.patch)
    latents = np.stack([[area_resize(frame, *size) for frame in sample] for sample in pixels])  # [b, k, H, W, 3]
    img = einops.rearrange(
      latents, "b k (h p1) (w p2) c -> b (k h w) (c p1 p2)", p1=self.patch, p2=self.patch
    )  # [b, k*n, 3*p*p]
    states = self.table[tokens % STANDIN_ROWS] * mask[..., None]  # [b, k, t, e_txt]
    pooled = states.sum(2) / np.maximum(mask.sum(2, keepdims=True), 1)  # [b, k, e_txt]
    num = batch["num_keyframes"].astype(np.int32)
    return {
      "img": img.astype(np.float32),
      "txt": einops.rearrange(states, "b k t e -> b (k t) e"),
      "y": (pooled @ self.pool).astype(np.float32),
      "num_keyframes": num,
      "num_memory": num - 1,
    }
