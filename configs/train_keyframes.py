"""Training the keyframe MM-DiT (rectified flow, interleaved keyframes) with progressive long-context stages.

Variants (``configs/train_keyframes.py:VARIANT``):

  tiny      the tiny MM-DiT (width 64, 2 + 2 blocks, 8 x 8-token frames) on synthetic latents, 8 samples per step,
            stages of 2 then 4 keyframes per sample, float32, a checkpoint every 2 steps: the tests and the CPU
            benchmark (a few seconds per stage on 2 CPU cores).
  story     the demo's keyframe model (configs/keyframes.py:story) on the ingested synthetic films
            (configs/data.py:story): pixels through the pixel codec, captions through its own text encoder,
            samples of 1 -> 3 keyframes; the shipped demo checkpoint comes from this variant (demo/README.md).
  flux_dev  long-context tuning of flux1-dev (Captain Cinema): bf16 compute, FSDP over every device, full remat,
            keyframes per sample 4 -> 8 -> 16 -> 32; load the Flux weights first (``cinema_jax.convert.flux``).

Run: ``cinema-jax train --config configs/train_keyframes.py:tiny --workdir runs/kf`` (resumes when run again).
"""

import ml_collections
from ml_collections import config_dict

from cinema_jax.config import import_config

VARIANTS = ("tiny", "story", "flux_dev")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "tiny"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of configs/train_keyframes.py; choose one of {', '.join(VARIANTS)}")
  c = import_config("keyframes").get_config("flux_dev" if variant == "flux_dev" else variant)
  c.variant = variant

  # The loop (cinema_jax.train.trainer); the keyframe objective's own fields (timestep sampler) are above in train.
  c.train.task = "keyframes"  # keyframes | video (cinema_jax.train.tasks.TASKS)
  c.train.batch_size = 256  # global samples per step, split evenly over processes and the mesh's batch axes
  c.train.grad_accum_steps = 1  # micro-batches per step (gradients averaged); batch_size must divide by it
  # Progressive long context: stage i trains stage_steps[i] steps on samples of stage_lengths[i] keyframe slots;
  # the data pipeline and the compiled step switch at each boundary. Total steps = sum(stage_steps).
  c.train.stage_steps = (4000, 2000, 1000, 500)
  c.train.stage_lengths = (4, 8, 16, 32)
  c.train.log_every = 50  # steps between TensorBoard writes
  c.train.progress = True  # console progress bar (process 0)
  c.train.peak_tflops = config_dict.placeholder(float)  # per-device peak for MFU (H100 SXM bf16 dense: 989)
  c.train.caption_dropout = 0.0  # probability that a keyframe's caption is zeroed (trains the CFG unconditional)

  # AdamW (cinema_jax.train.optimizer) and orbax checkpoints: the shared sections of configs/base.py.
  import_config("base").add_training_sections(c)
  o, k = c.optimizer, c.checkpoint
  o.learning_rate = 1e-5  # peak learning rate, reached at the end of warm-up
  o.warmup_steps = 500  # linear warm-up from 0
  o.schedule = "constant"  # after warm-up: "constant" or "cosine"

  # Training data (cinema_jax.train.data): the shared section of configs/base.py.
  import_config("base").add_data_section(c, c.text.caption_tokens)

  if variant == "tiny":
    c.mesh.data, c.mesh.fsdp = 2, -1  # data x FSDP over the 8 (or 4) CPU devices of the tests
    c.model.global_mask = "block_causal"
    c.attention.implementation = "xla"
    c.train.batch_size = 8
    c.train.stage_steps = (3, 3)
    c.train.stage_lengths = (2, 4)
    c.train.log_every = 1
    o.learning_rate = 1e-3
    o.warmup_steps = 2
    o.schedule = "cosine"
    o.ema_decay = 0.9
    k.every = 2
    k.keep = 2
  elif variant == "story":
    import_config("base").story_training(c, c.text.caption_tokens)
    c.train.batch_size = 16
    # Single keyframes teach caption -> picture (every step's loss is on one keyframe either way, and a 1-slot sample
    # costs a third of a 3-slot one); the 3-slot stage teaches the use of memory; the last stage refines at the
    # floor learning rate (the cosine ends at step 4500).
    c.train.stage_steps = (3500, 1000, 4000)
    c.train.stage_lengths = (1, 3, 1)
    o.decay_steps = 4500
  else:
    c.mesh.data, c.mesh.fsdp = 1, -1  # parameters and Adam state sharded over every device
    c.model.remat_policy = "full"  # 32 keyframes x (1100 image + 512 text) tokens: activations dominate
  return c
