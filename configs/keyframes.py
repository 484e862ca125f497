"""Keyframe MM-DiT (Captain Cinema top-down): Flux architecture, interleaved keyframes, hybrid masks, GoldenMem.

Variants (``configs/keyframes.py:VARIANT``):

  tiny        width 64, 2 double + 2 single blocks, 8 x 8-token frames, float32: tests and the CPU benchmark
              (``cinema-jax bench keyframes`` runs it; well under 3 minutes on 2 CPU cores).
  story       the demo's keyframe model: width 128, 2 + 2 blocks, 64 x 96-pixel keyframes through the pixel codec
              (half size: 8 x 12 tokens of 4 x 4 pixels), its own small text encoder trained with it, CFG.
  flux_dev    flux1-dev exactly (19 double + 38 single blocks, width 3072, 24 heads, guidance embedding): load
              ``flux1-dev.safetensors`` with ``cinema_jax.convert.flux.from_bfl(path, config)``; bf16 compute.
  flux_2p56b  the Flux architecture at width 3072 with 4 double + 8 single blocks (2.56 B parameters), the
              whole-model anchor of docs/performance (4096 image + 512 text tokens, 39.3 ms diffusers forward on H100).

Check it: ``cinema-jax config configs/keyframes.py:flux_dev --config.goldenmem.max_memory=5``.
"""

import ml_collections
from ml_collections import config_dict

from cinema_jax.config import import_config

VARIANTS = ("tiny", "story", "flux_dev", "flux_2p56b")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "tiny"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of configs/keyframes.py; choose one of {', '.join(VARIANTS)}")
  c = import_config("base").get_config("default")
  c.variant = variant

  # The MM-DiT; field names are cinema_jax.models.mmdit.MMDiT's (BFL FluxParams names where they exist).
  c.model = ml_collections.ConfigDict()
  c.model.in_channels = 64  # channels per image token: latent channels x patch^2 (Flux AE z16 x 2 x 2)
  c.model.out_channels = 64  # predicted velocity channels per token (= in_channels)
  c.model.vec_in_dim = 768  # pooled text width (CLIP-L)
  c.model.context_in_dim = 4096  # text-encoder token width (T5-XXL)
  c.model.hidden_size = 3072  # E
  c.model.mlp_ratio = 4.0  # MLP width M = E * mlp_ratio
  c.model.num_heads = 24  # H; head dim D = E / H = 128
  c.model.depth = 19  # double-stream blocks
  c.model.depth_single_blocks = 38  # single-stream blocks
  c.model.axes_dim = (16, 56, 56)  # RoPE head-dim split over (keyframe, row, col); sums to D
  c.model.theta = 10000.0  # RoPE base
  c.model.qkv_bias = True  # bias on the fused q/k/v projections
  c.model.guidance_embed = True  # distilled-guidance embedder (flux1-dev); False for schnell-like models
  # Hybrid masking: the first num_local_blocks blocks (double, then single) attend within a keyframe
  # (caption_k with image_k); the rest globally. None = depth: local in double-stream, global in single-stream.
  c.model.num_local_blocks = config_dict.placeholder(int)
  c.model.global_mask = "block_causal"  # "full" | "block_causal" (keyframe k sees keyframes <= k)
  c.model.remat_policy = "none"  # none | full | dots | attention | qkv_attention (see mmdit.REMAT_POLICIES)

  # Latent space of one keyframe: a channels-last [H * patch, W * patch, channels] latent, packed to H x W tokens.
  c.latent = ml_collections.ConfigDict()
  c.latent.channels = 16  # autoencoder latent channels (Flux AE: 16)
  c.latent.patch = 2  # tokens are patch x patch latent pixels (Flux: 2)
  c.frame = ml_collections.ConfigDict()
  c.frame.height = 25  # tokens per column of a keyframe (400 px short side / 8 / 2)
  c.frame.width = 44  # tokens per row (16:9)
  c.text = ml_collections.ConfigDict()
  c.text.caption_tokens = 512  # text tokens per keyframe caption (T5 length)
  # text.encoder (a small jointly trained text encoder) and codec (pixels <-> latents), off by default.
  import_config("base").add_text_and_codec_sections(c)

  # GoldenMem: how earlier keyframes condition the next one.
  c.goldenmem = ml_collections.ConfigDict()
  c.goldenmem.enabled = True  # False: every chosen frame at full size (no pyramid)
  c.goldenmem.max_memory = 7  # memory slots; with base side 25 the pyramid is 25, 15, 9, 5, 3, 2, 1
  c.goldenmem.pyramid = True  # older slots on the Fibonacci pyramid; False: every chosen slot at full size
  c.goldenmem.selection = "recency"  # "recency" | "similarity" (caption-embedding cosine similarity)
  c.goldenmem.keep_latest = True  # with similarity: the newest keyframe always takes the full-size slot
  c.goldenmem.frame_position = "slot"  # RoPE frame index of a slot: "slot" (0..S) | "story" (its keyframe number)

  # Sampling (rectified flow, Euler on the Flux schedule).
  c.sampling = ml_collections.ConfigDict()
  c.sampling.num_steps = 50  # Euler steps (flux1-dev default)
  c.sampling.guidance = 3.5  # distilled guidance scale fed to guidance_in (models with guidance_embed)
  c.sampling.cfg_scale = 1.0  # classifier-free guidance on the current caption; 1.0 = off (one forward per step)
  c.sampling.shift = True  # shift the schedule by mu(image tokens); False = plain linspace (schnell)
  c.sampling.base_shift = 0.5  # mu at 256 image tokens
  c.sampling.max_shift = 1.15  # mu at 4096 image tokens

  # Training objective (rectified flow): per-keyframe times, memory keyframes clean.
  c.train = ml_collections.ConfigDict()
  c.train.timestep_sampling = "logit_normal"  # "uniform" | "logit_normal"
  c.train.logit_mean = 0.0  # logit-normal location
  c.train.logit_std = 1.0  # logit-normal scale

  if variant == "tiny":
    c.dtype = "float32"
    c.model.update(
      in_channels=16,  # 4 latent channels x 2 x 2
      out_channels=16,
      vec_in_dim=16,
      context_in_dim=32,
      hidden_size=64,
      num_heads=4,  # D = 16
      depth=2,
      depth_single_blocks=2,
      axes_dim=(4, 6, 6),
    )
    c.latent.channels = 4
    c.frame.height = c.frame.width = 8  # pyramid 8, 4, 3, 1, 1 (then 0: five memory slots)
    c.text.caption_tokens = 4
    c.sampling.num_steps = 4
  elif variant == "story":
    c.dtype = "float32"
    c.model.update(
      in_channels=48,  # 3 colour channels x 4 x 4 pixels (fewer values than the width: see models/codecs.py)
      out_channels=48,
      vec_in_dim=64,
      context_in_dim=64,
      hidden_size=128,
      num_heads=4,  # D = 32
      depth=2,
      depth_single_blocks=2,
      axes_dim=(8, 12, 12),
      guidance_embed=False,
    )
    c.latent.channels, c.latent.patch = 3, 4
    c.frame.height, c.frame.width = 8, 12  # 32 x 48 latent pixels, decoded to 64 x 96
    c.text.caption_tokens = 40  # the synthetic captions take at most 35 words and marks, + BOS and EOS
    c.text.encoder.enabled = True
    c.codec.kind, c.codec.height, c.codec.width = "pixels", 32, 48
    c.codec.out_height, c.codec.out_width = 64, 96
    # Trained on samples of up to 3 full-size keyframes (2 memory + the new one), so it samples the same way: the 2
    # slots GoldenMem chooses (recency or caption similarity), at full size.
    c.goldenmem.max_memory, c.goldenmem.pyramid = 2, False
    c.sampling.num_steps = 24
    c.sampling.cfg_scale = 3.0  # the model is trained with caption dropout (train.caption_dropout)
  elif variant == "flux_2p56b":
    c.model.depth = 4
    c.model.depth_single_blocks = 8
    c.frame.height = c.frame.width = 64  # 4096 image tokens, the performance anchor's shape
  return c
