"""Settings every experiment starts from: mesh, sharding rules, attention and numerics.

Model configs (keyframes, video, control) import ``get_config`` from here and add their own sections, so a mesh or
rule change is made once. Variants (``configs/base.py:VARIANT``):

  default  all devices data-parallel; bf16 compute, float32 parameters.
  fsdp     parameters and optimiser state sharded over all devices (large models on one host or a pod slice).
  cpu8     8 fake CPU devices as data 2 x fsdp 2 x tensor 2, float32: the layout the tests and the demo use
           (XLA_FLAGS=--xla_force_host_platform_device_count=8).

Check it: ``cinema-jax config configs/base.py:fsdp --config.mesh.tensor=2`` prints the resolved config.
"""

import ml_collections
from ml_collections import config_dict

from cinema_jax.config import import_config
from cinema_jax.parallel import axes

VARIANTS = ("default", "fsdp", "cpu8")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "default"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of configs/base.py; choose one of {', '.join(VARIANTS)}")
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.seed = 0  # parameter init and data order derive from it

  # Device mesh: one size per axis of parallel.axes.MESH_AXES; -1 takes all devices left over (at most one -1).
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # pure data parallel replicas
  c.mesh.fsdp = 1  # data parallel with parameters/optimiser state sharded (ZeRO-3 style)
  c.mesh.sequence = 1  # tokens of one sample split across devices
  c.mesh.tensor = 1  # heads and MLP columns split across devices
  # Logical axis -> mesh axes (see cinema_jax/parallel/axes.py for the names). First matching free rule wins.
  c.sharding_rules = tuple((name, mesh_axes) for name, mesh_axes in axes.DEFAULT_RULES)

  # Numerics: compute dtype of activations and matmuls, storage dtype of parameters (and optimiser state).
  c.dtype = "bfloat16"
  c.param_dtype = "float32"

  # Attention: implementation None = best available (cuDNN on GPUs for unmasked attention, XLA otherwise).
  c.attention = ml_collections.ConfigDict()
  c.attention.implementation = config_dict.placeholder(str)  # "xla" | "cudnn" | "pallas" | None
  # Pallas kernel tiles: models built from this config trace their Pallas attention with them (config_tiles ->
  # the model's attention_tiles); None = each backend's table in kernels/blocks.py (e.g. Hopper 128 x 128 forward
  # and backward; TPU 256 x 512 forward).
  c.attention.block_q = config_dict.placeholder(int)  # query rows per tile
  c.attention.block_kv = config_dict.placeholder(int)  # key columns per tile
  c.attention.block_q_bwd = config_dict.placeholder(int)  # backward tiles; None = the forward sizes
  c.attention.block_kv_bwd = config_dict.placeholder(int)

  if variant == "fsdp":
    c.mesh.data = 1
    c.mesh.fsdp = -1
  elif variant == "cpu8":
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    c.dtype = "float32"
    c.attention.block_q = c.attention.block_kv = 16
  return c


def add_training_sections(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds the ``optimizer`` and ``checkpoint`` sections every training config starts from; edit them after."""
  # AdamW (cinema_jax.train.optimizer).
  o = c.optimizer = ml_collections.ConfigDict()
  o.learning_rate = 1e-5  # peak learning rate, reached at the end of warm-up
  o.warmup_steps = 500  # linear warm-up from 0
  o.schedule = "constant"  # after warm-up: "constant" or "cosine" (decay to learning_rate * end_factor)
  o.decay_steps = 0  # cosine end step; 0 = the total step count
  o.end_factor = 0.1  # cosine floor as a fraction of the peak
  o.b1 = 0.9  # Adam first-moment decay
  o.b2 = 0.999  # Adam second-moment decay
  o.eps = 1e-8  # Adam epsilon
  o.weight_decay = 0.01  # decoupled decay, matrices only
  o.clip_norm = 1.0  # global L2 clipping of the trainable gradients; 0 = off
  o.frozen = ()  # regexes (re.search on "a/b/kernel" paths) of parameters that get exactly zero updates
  o.ema_decay = 0.9999  # EMA of the parameters kept in the checkpoint; 0 = none

  # Orbax checkpoints in workdir/checkpoints (cinema_jax.train.checkpoint).
  k = c.checkpoint = ml_collections.ConfigDict()
  k.enabled = True  # write checkpoints and resume from the newest readable one
  k.every = 500  # steps between checkpoints (the last step and preemption notices always save)
  k.keep = 3  # newest checkpoints kept on disk
  k.use_async = True  # write in the background while training continues
  return c


def add_text_and_codec_sections(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds ``text.encoder`` and ``codec`` to a model config that has ``text.caption_tokens``; both off by default."""
  # A small text encoder trained jointly with the model (cinema_jax.models.text.TextEncoder). Disabled, the model
  # reads precomputed text states (frozen T5 / CLIP / umT5) from its data.
  e = c.text.encoder = ml_collections.ConfigDict()
  e.enabled = False
  e.tokenizer = "words"  # cinema_jax.data.text tokenizer of the captions (words | bytes)
  e.vocab_size = 2048  # token ids (words: hash buckets + 3 special ids)
  e.width = 64  # encoder width
  e.depth = 2  # transformer blocks
  e.heads = 4  # attention heads
  # Pixels <-> latents (cinema_jax.models.codecs). "none": the data are latents already (autoencoder outside).
  k = c.codec = ml_collections.ConfigDict()
  k.kind = "none"  # none | pixels (the latent is the picture in [-1, 1], resized: 3 channels)
  k.height = 0  # pixels: latent rows
  k.width = 0  # pixels: latent cols
  k.out_height = 0  # pixels: decoded rows (0 = the latent's; larger = bicubic upsampling, the intended use)
  k.out_width = 0  # pixels: decoded cols
  return c


def add_data_section(c: ml_collections.ConfigDict, caption_tokens: int) -> ml_collections.ConfigDict:
  """Adds the ``data`` section of a training config (cinema_jax.train.data); the synthetic source by default."""
  d = c.data = ml_collections.ConfigDict()
  d.source = "synthetic"  # synthetic: seeded random model inputs | films: an ingested data set
  d.seed = 0  # data order and contents (films: the loader's shuffle seed, plus the stage index)
  d.root = ""  # films: the ingested data set (cinema-jax ingest ... --out DIR)
  # films, models without text.encoder: a store of precomputed caption states (cinema_jax.data.embeddings); "" = a
  # fixed seeded stand-in table.
  d.text_embeddings = ""
  # films: the grain loader's settings (configs/data.py documents each); keyframe samples take the stage length as
  # max_keyframes, clips are cut to it.
  d.loader = import_config("data").get_config("default").loader
  d.loader.caption_tokens = caption_tokens  # the loader's caption length is the model's
  return c


def story_training(c: ml_collections.ConfigDict, caption_tokens: int) -> ml_collections.ConfigDict:
  """The training settings both story demo models share (configs/train_keyframes.py and train_video.py :story)."""
  c.mesh.data, c.mesh.fsdp = -1, 1  # data parallel over whatever devices there are (one CPU is enough)
  c.train.log_every = 25
  c.train.caption_dropout = 0.1
  o, k, d = c.optimizer, c.checkpoint, c.data
  o.learning_rate = 1e-3
  o.warmup_steps = 100
  o.schedule = "cosine"
  o.ema_decay = 0.995
  k.every = 250
  k.keep = 2
  d.source = "films"
  d.root = "runs/story/data"  # where `make demo` ingests the synthetic films (configs/story.py)
  d.loader = import_config("data").get_config("story").loader
  d.loader.caption_tokens = caption_tokens  # the loader's caption length is the model's
  return c
