"""The diffusion-forcing video DiT (SkyReels-V2 / Wan 2.1 architecture): model, sampling, rollout and training noise.

Variants (``configs/video.py:VARIANT``):

  tiny           a few-layer model on 8 x 8 latents: tests, the rollout benchmark, CPU runs (seconds per window).
  story          the demo's clip model: width 128, 4 layers, 64 x 96-pixel frames through the pixel codec (half
                 size, 4 x 4 pixels per token), its own small text encoder, windows of 8 frames with 1 carried over,
                 the shot's keyframe as the first window's image prefix.
  skyreels_1p3b  SkyReels-V2-DF-1.3B-540P: width 1536, 12 heads x 128, 30 layers, FFN 8960, fps embedding;
                 25 latent frames x 68 x 120 latents (97 video frames, 544 x 960), 30 UniPC steps, shift 8.
  skyreels_14b   SkyReels-V2-DF-14B-540P: width 5120, 40 heads x 128, 40 layers, FFN 13824, no fps embedding.

Check a variant: ``cinema-jax config configs/video.py:skyreels_1p3b``. Benchmarks that read it:
``cinema-jax bench video-dit --config configs/video.py:skyreels_1p3b`` (a forward, optionally beside diffusers) and
``cinema-jax bench rollout`` (tiny, CPU: memory and time per window for 4 vs 16 windows).
Frame counts below are latent frames (the Wan VAE packs 4 video frames into one latent frame, plus the first).
"""

import ml_collections

from cinema_jax.config import import_config

VARIANTS = ("tiny", "story", "skyreels_1p3b", "skyreels_14b")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "tiny"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of configs/video.py; choose one of {', '.join(VARIANTS)}")
  c = import_config("base").get_config("default")
  c.variant = variant

  # The network (cinema_jax.models.video_dit.VideoDiT). Names follow the diffusers SkyReelsV2Transformer3DModel
  # config where one exists (in parentheses).
  m = c.model = ml_collections.ConfigDict()
  m.width = 1536  # E = heads x head_dim (num_attention_heads * attention_head_dim)
  m.heads = 12  # H (num_attention_heads)
  m.depth = 30  # transformer blocks (num_layers)
  m.ffn_dim = 8960  # feed-forward hidden width (ffn_dim)
  m.in_channels = 16  # latent channels in (in_channels; the Wan VAE's z_dim)
  m.out_channels = 16  # latent channels out (out_channels)
  m.patch_size = (1, 2, 2)  # (frames, rows, cols) per token (patch_size); per-frame timesteps need frames = 1
  m.text_dim = 4096  # width of the text encoder's states (text_dim; umT5-XXL)
  m.freq_dim = 256  # sinusoidal timestep channels (freq_dim)
  m.eps = 1e-6  # LayerNorm / RMSNorm epsilon (eps)
  m.cross_attn_norm = True  # affine LayerNorm before cross-attention (cross_attn_norm)
  m.fps_embedding = True  # fps class embedding added to the modulation (inject_sample_info); index 0 = 16 fps
  m.rope_theta = 10000.0  # RoPE base; head dim split (t, h, w) = (d - 4(d//6), 2(d//6), 2(d//6))
  m.causal_block_size = 0  # 0 = bidirectional attention; n >= 1 = block-causal over blocks of n latent frames
  m.scan_layers = True  # stack the blocks with nn.scan (one compiled block, parameters with a leading layer axis)
  m.remat = "none"  # activation checkpointing policy per block: none | full | dots | attention (see video_dit.py)

  # Inference (cinema_jax.diffusion.forcing, cinema_jax.diffusion.unipc, cinema_jax.pipelines.long_video).
  s = c.sampling = ml_collections.ConfigDict()
  s.solver = "unipc"  # per-frame solver: unipc (order 2, bh2, x0 prediction) | euler
  s.num_steps = 30  # denoising steps per frame (the step template's length)
  s.shift = 8.0  # flow shift s: sigma' = s sigma / (1 + (s - 1) sigma); SkyReels: 8 for T2V, 5 for I2V
  s.guidance_scale = 6.0  # classifier-free guidance g: v = v_u + g (v_c - v_u); <= 1 disables the second pass
  s.ar_step = 0  # 0 = synchronous; > 0 = block i lags block i-1 by ar_step steps (asynchronous diffusion forcing)
  s.causal_block_size = 1  # frames per block of the timestep matrix (SkyReels uses 5 with ar_step 5)
  s.addnoise_condition = 20.0  # a: prefix frames re-noised to sigma = a / 1000 and fed with timestep a (0 = clean)
  s.base_num_frames = 25  # latent frames per window (97 video frames at 540P)
  s.overlap_history = 5  # latent frames carried from one window to the next as its clean prefix (17 video frames)
  s.latent_height = 68  # latent rows (544 / 8)
  s.latent_width = 120  # latent cols (960 / 8)
  s.text_len = 512  # text tokens per prompt (umT5 padded length)
  s.fps = 24  # frame rate told to the model through the fps embedding (16 -> class 0, otherwise class 1)

  # Text: precomputed states (umT5) by default, or a small encoder trained with the model (models/text.py).
  c.text = ml_collections.ConfigDict()
  c.text.caption_tokens = s.text_len  # tokens per caption (must equal sampling.text_len)
  # text.encoder (a small jointly trained text encoder) and codec (pixels <-> latents), off by default.
  import_config("base").add_text_and_codec_sections(c)

  # Diffusion-forcing training noise (cinema_jax.diffusion.forcing.sample_noise_levels / flow_matching_loss).
  t = c.training = ml_collections.ConfigDict()
  t.noise_mode = "non_decreasing"  # synchronous | independent | non_decreasing (earlier frames never noisier)
  t.spread = 0.3  # non_decreasing: lag bound; each frame's level density stays within [1/(1+spread), 1/(1-spread)]
  t.num_levels = 1000  # discrete noise levels; sigma = shift((level + 1) / num_levels)
  t.shift = 1.0  # flow shift applied to training sigmas
  t.causal_block_size = 1  # frames sharing one noise level (match the model's causal_block_size when block-causal)
  t.num_prefix_frames = 0  # leading frames kept clean (sigma 0) as conditioning
  t.exclude_prefix = True  # clean prefix frames carry no loss

  if variant == "tiny":
    c.dtype = "float32"
    m.width, m.heads, m.depth, m.ffn_dim = 64, 4, 2, 128
    m.in_channels = m.out_channels = 4
    m.text_dim, m.freq_dim = 32, 32
    s.num_steps, s.base_num_frames, s.overlap_history = 4, 8, 2
    s.latent_height = s.latent_width = 8
    s.text_len = 8
    s.guidance_scale = 3.0
  elif variant == "story":
    c.dtype = "float32"
    m.width, m.heads, m.depth, m.ffn_dim = 128, 4, 4, 512
    m.in_channels = m.out_channels = 3
    m.patch_size = (1, 4, 4)
    m.text_dim, m.freq_dim = 64, 64
    m.fps_embedding = False
    s.num_steps, s.shift, s.guidance_scale = 12, 3.0, 3.0
    s.addnoise_condition = 0.0  # trained with a clean prefix frame (training.num_prefix_frames)
    # One carried frame: the model was trained with exactly one clean leading frame (training.num_prefix_frames).
    s.base_num_frames, s.overlap_history = 8, 1
    s.latent_height, s.latent_width = 32, 48  # the picture at half size (models/codecs.py says why)
    s.text_len = c.text.caption_tokens = 40
    s.fps = 12
    c.text.encoder.enabled = True
    c.codec.kind, c.codec.height, c.codec.width = "pixels", 32, 48
    c.codec.out_height, c.codec.out_width = 64, 96
    t.num_prefix_frames = 1  # the first frame clean: the shot's keyframe, or the frame carried into a window
  elif variant == "skyreels_14b":
    m.width, m.heads, m.depth, m.ffn_dim = 5120, 40, 40, 13824
    m.fps_embedding = False
    m.remat = "full"
  c.text.caption_tokens = s.text_len
  return c
