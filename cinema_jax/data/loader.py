"""grain loaders over an ingested data set: keyframe samples, clips, clips with control maps.

Letters: B batch (per process), K keyframe slots, T frames of a clip or text tokens, h x w pixels.

``make_loader(root, kind, config)`` returns a ``grain.DataLoader``: an ArrayRecord source over the data set's
record files (manifest order), an ``IndexSampler`` (seeded shuffle, epochs, per-host shard), a per-record transform
and a batch. Iterating it gives dicts of numpy arrays; ``iter(loader)`` has ``get_state()`` / ``set_state(state)``
(bytes), so a training job saves the position with its checkpoint and resumes the exact stream. All randomness
(keyframe windows, degradations) comes from grain's per-record generator, seeded from the loader seed and the
record's position in the sampler order, so the same seed gives the same batches on every run and after a resume.

Per-host sharding: by default ``ShardByJaxProcess(drop_remainder=True)``, so process i of n reads records
i, i + n, ... of the (shuffled) order: disjoint, and together the whole data set except up to n - 1 records
dropped so that every process takes the same number of steps (``drop_remainder=False`` keeps them, at the cost of
uneven shards). Each process loads ``batch_size / n`` samples; ``global_batch`` assembles the per-process batches
into global jax.Arrays sharded over the mesh's batch axes (``ACT_BATCH`` under the config's rules).

Samples (``kind``):

* ``keyframes``: up to K consecutive shots of one film (1..K, drawn per sample, so K varies) padded to K slots:
  ``images`` uint8 [K, h, w, 3]; ``segment_ids`` int32 [K] = 0..k-1 then -1 (padding, as the attention masks
  expect); ``captions`` str [K] ('' when padded); ``caption_tokens`` int32 [K, T]; ``caption_mask`` bool [K, T]
  (all False for padded slots); ``synopsis`` str; ``synopsis_tokens`` / ``synopsis_mask`` [T']; ``video`` str;
  ``first_shot`` int32; ``num_keyframes`` int32.
* ``clips``: ``frames`` uint8 [T, h, w, 3]; ``caption`` str; ``caption_tokens`` int32 [T'];
  ``caption_mask`` bool [T']; ``video`` str; ``clip``, ``shot`` int32.
* ``control``: a clip plus ``depth`` float32 [T, h, w, 1] in [0, 1] (near = 0) and ``points`` float32
  [T, h, w, 3] in [0, 1]; each map independently degraded with probability ``degrade_prob`` (LongVie).
"""

from __future__ import annotations

import pathlib
from typing import Any

import grain
import jax
import numpy as np

from cinema_jax.data import control, shards, text
from cinema_jax.parallel import axes
from cinema_jax.parallel.sharding import LogicalRules, named_sharding

KINDS = ("keyframes", "clips", "control")
_RECORD_KIND = {"keyframes": "films", "clips": "clips", "control": "control"}


class _Arrays:
  """Zarr arrays of the data set, opened on first use in each process (handles are not picklable)."""

  def __init__(self, root: str | pathlib.Path):
    self.root = pathlib.Path(root)
    self._open: dict[tuple[str, str], Any] = {}

  def read(self, video: str, name: str, index) -> np.ndarray:
    key = (video, name)
    if key not in self._open:
      self._open[key] = shards.open_array(shards.videos_dir(self.root) / video / f"{name}.zarr")
    return np.asarray(self._open[key][index].read().result())

  def __getstate__(self):
    return {"root": self.root, "_open": {}}


class KeyframeSamples(grain.transforms.RandomMap):
  """Film record -> one padded keyframe sample (a random window of 1..max_keyframes consecutive shots)."""

  def __init__(self, root, *, max_keyframes, min_keyframes, tokenizer, caption_tokens, synopsis_tokens):
    if not 1 <= min_keyframes <= max_keyframes:
      raise ValueError(f"need 1 <= min_keyframes <= max_keyframes, got {min_keyframes}, {max_keyframes}")
    self.arrays = _Arrays(root)
    self.max_k, self.min_k = max_keyframes, min_keyframes
    self.tokenizer, self.caption_tokens, self.synopsis_tokens = tokenizer, caption_tokens, synopsis_tokens

  def random_map(self, element: bytes, rng: np.random.Generator) -> dict:
    film = shards.decode_record(element)
    shots = len(film["captions"])
    hi = min(self.max_k, shots)
    k = int(rng.integers(min(self.min_k, hi), hi + 1))
    first = int(rng.integers(0, shots - k + 1))
    images = self.arrays.read(film["video"], "keyframes", slice(first, first + k))
    padded = np.zeros((self.max_k, *images.shape[1:]), np.uint8)
    padded[:k] = images
    caps = film["captions"][first : first + k] + [""] * (self.max_k - k)
    tokens, mask = self.tokenizer(caps, self.caption_tokens)
    tokens[k:], mask[k:] = 0, False
    syn_tokens, syn_mask = self.tokenizer([film["synopsis"]], self.synopsis_tokens)
    return {
      "images": padded,
      "segment_ids": np.where(np.arange(self.max_k) < k, np.arange(self.max_k), -1).astype(np.int32),
      "captions": np.array(caps),
      "caption_tokens": tokens,
      "caption_mask": mask,
      "synopsis": np.array(film["synopsis"]),
      "synopsis_tokens": syn_tokens[0],
      "synopsis_mask": syn_mask[0],
      "video": np.array(film["video"]),
      "first_shot": np.int32(first),
      "num_keyframes": np.int32(k),
    }


class ClipSamples(grain.transforms.RandomMap):
  """Clip record -> frames + caption (+ degraded control maps when ``with_control``)."""

  def __init__(self, root, *, tokenizer, caption_tokens, with_control=False, degrade=None):
    self.arrays = _Arrays(root)
    self.tokenizer, self.caption_tokens = tokenizer, caption_tokens
    self.with_control, self.degrade = with_control, dict(degrade or {})

  def random_map(self, element: bytes, rng: np.random.Generator) -> dict:
    clip = shards.decode_record(element)
    video, i = clip["video"], clip["clip"]
    tokens, mask = self.tokenizer([clip["caption"]], self.caption_tokens)
    out = {
      "frames": self.arrays.read(video, "frames", i),
      "caption": np.array(clip["caption"]),
      "caption_tokens": tokens[0],
      "caption_mask": mask[0],
      "video": np.array(video),
      "clip": np.int32(i),
      "shot": np.int32(clip["shot"]),
    }
    if self.with_control:
      depth = self.arrays.read(video, "depth", i).astype(np.float32)[..., None]
      points = self.arrays.read(video, "points", i).astype(np.float32) / 255.0
      out["depth"] = control.degrade(depth, rng, **self.degrade)
      out["points"] = control.degrade(points, rng, **self.degrade)
    return out


def make_loader(
  root: str | pathlib.Path,
  kind: str,
  config,
  *,
  shard_options: grain.sharding.ShardOptions | None = None,
  batch_size: int | None = None,
  seed: int | None = None,
  num_epochs: int | None = None,
  drop_remainder: bool = True,
) -> grain.DataLoader:
  """A grain DataLoader of ``kind`` (keyframes | clips | control) over the data set at ``root``.

  ``config`` is the ``loader`` section of configs/data.py; keyword arguments override its batch size (global),
  seed and epochs (-1 or None in the config = endless). ``shard_options`` default: ShardByJaxProcess.
  """
  if kind not in KINDS:
    raise KeyError(f"unknown loader kind {kind!r}; choose one of {', '.join(KINDS)}")
  root = pathlib.Path(root)
  files = shards.record_files(root, _RECORD_KIND[kind])
  if not files:
    raise ValueError(f"the data set at {root} has no {kind} samples (manifest lists none)")
  source = grain.sources.ArrayRecordDataSource([str(f) for f in files])
  shard_options = shard_options or grain.sharding.ShardByJaxProcess(drop_remainder=True)
  global_size = config.batch_size if batch_size is None else batch_size
  if global_size % shard_options.shard_count:
    raise ValueError(f"global batch {global_size} does not split over {shard_options.shard_count} processes")
  epochs = config.num_epochs if num_epochs is None else num_epochs
  sampler = grain.samplers.IndexSampler(
    num_records=len(source),
    shard_options=shard_options,
    shuffle=config.shuffle,
    num_epochs=None if epochs is None or epochs < 0 else epochs,
    seed=config.seed if seed is None else seed,
  )
  options = {"vocab_size": config.vocab_size} if config.tokenizer == "words" else {}
  tokenizer = text.get_tokenizer(config.tokenizer, **options)
  if kind == "keyframes":
    transform = KeyframeSamples(
      root, max_keyframes=config.max_keyframes, min_keyframes=config.min_keyframes, tokenizer=tokenizer,
      caption_tokens=config.caption_tokens, synopsis_tokens=config.synopsis_tokens,
    )  # fmt: skip
  else:
    degrade = {
      "prob": config.degrade_prob,
      "scales": tuple(config.degrade_scales),
      "kernels": tuple(config.degrade_kernels),
      "reference_side": config.degrade_reference_side,
    }
    transform = ClipSamples(
      root, tokenizer=tokenizer, caption_tokens=config.caption_tokens, with_control=kind == "control", degrade=degrade
    )
  if config.worker_count > 0:
    # grain's worker processes read absl flags; outside an absl app nobody parsed them, so mark them parsed.
    from absl import flags

    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
  return grain.DataLoader(
    data_source=source,
    sampler=sampler,
    operations=[transform, grain.transforms.Batch(global_size // shard_options.shard_count, drop_remainder)],
    worker_count=config.worker_count,
  )


def global_batch(batch: dict, mesh: jax.sharding.Mesh, rules: LogicalRules | None = None) -> dict:
  """Per-process numpy batch -> global jax.Arrays with the leading (batch) axis sharded as ``ACT_BATCH``.

  Every process passes its own part (``make_loader`` gives each a disjoint one); the global batch is the
  concatenation in process order. String fields (captions, video ids) stay per-process numpy arrays.
  """
  rules = tuple(axes.DEFAULT_RULES if rules is None else rules)
  out = {}
  for name, value in batch.items():
    value = np.asarray(value)
    if value.dtype.kind in "biuf":
      sharding = named_sharding((axes.ACT_BATCH,) + (None,) * (value.ndim - 1), mesh, rules)
      out[name] = jax.make_array_from_process_local_data(sharding, value)
    else:
      out[name] = value
  return out
