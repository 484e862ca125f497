"""Training the diffusion-forcing video DiT (SkyReels-V2 / Wan 2.1) with progressive clip lengths.

Variants (``configs/train_video.py:VARIANT``):

  tiny           the tiny video DiT on synthetic 8 x 8 latents, 8 clips per step, stages of 2 then 4 latent frames,
                 float32: tests and the CPU benchmark.
  story          the demo's clip model (configs/video.py:story) on clips of the ingested synthetic films
                 (configs/data.py:story): 8 frames at 64 x 96 pixels, captions through its own text encoder.
  skyreels_1p3b  SkyReels-V2-DF-1.3B-540P: bf16 compute, FSDP, dots remat, 68 x 120 latents, clips of
                 9 -> 17 -> 25 latent frames (33 -> 65 -> 97 video frames).

Run: ``cinema-jax train --config configs/train_video.py:tiny --workdir runs/video``.
"""

import ml_collections
from ml_collections import config_dict

from cinema_jax.config import import_config

VARIANTS = ("tiny", "story", "skyreels_1p3b")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "tiny"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of configs/train_video.py; choose one of {', '.join(VARIANTS)}")
  c = import_config("video").get_config(variant)
  c.variant = variant

  # The loop (cinema_jax.train.trainer); the noise of diffusion forcing is configured in `training` above.
  t = c.train = ml_collections.ConfigDict()
  t.task = "video"  # keyframes | video (cinema_jax.train.tasks.TASKS)
  t.batch_size = 64  # global clips per step, split evenly over processes and the mesh's batch axes
  t.grad_accum_steps = 1  # micro-batches per step (gradients averaged)
  # Progressive long context: stage i trains stage_steps[i] steps on clips of stage_lengths[i] latent frames
  # (latent height x width from sampling.latent_height / latent_width, text from sampling.text_len).
  t.stage_steps = (4000, 2000, 2000)
  t.stage_lengths = (9, 17, 25)
  t.log_every = 50  # steps between TensorBoard writes
  t.progress = True  # console progress bar (process 0)
  t.peak_tflops = config_dict.placeholder(float)  # per-device peak for MFU (H100 SXM bf16 dense: 989)
  t.caption_dropout = 0.0  # probability that a clip's caption is zeroed (trains the CFG unconditional)

  # AdamW (cinema_jax.train.optimizer) and orbax checkpoints: the shared sections of configs/base.py.
  import_config("base").add_training_sections(c)
  o, k = c.optimizer, c.checkpoint
  o.learning_rate = 2e-5  # peak learning rate, reached at the end of warm-up
  o.warmup_steps = 1000  # linear warm-up from 0
  o.schedule = "cosine"  # after warm-up: "constant" or "cosine"

  # Training data (cinema_jax.train.data): the shared section of configs/base.py.
  import_config("base").add_data_section(c, c.sampling.text_len)

  if variant == "tiny":
    c.mesh.data, c.mesh.fsdp = 2, -1
    c.attention.implementation = "xla"
    t.batch_size = 8
    t.stage_steps = (3, 3)
    t.stage_lengths = (2, 4)
    t.log_every = 1
    o.learning_rate = 1e-3
    o.warmup_steps = 2
    o.ema_decay = 0.9
    k.every = 2
    k.keep = 2
  elif variant == "story":
    import_config("base").story_training(c, c.sampling.text_len)
    t.batch_size = 8
    t.stage_steps = (1500,)
    t.stage_lengths = (8,)
  else:
    c.mesh.data, c.mesh.fsdp = 1, -1
    c.model.remat = "dots"
  return c
