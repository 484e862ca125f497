"""What `make demo` runs: the end-to-end path the project has so far, at toy size on CPU.

The story -> movie demo (synthetic films, trained keyframe and video models, a rendered movie) needs the model, data
and training packages, which are not built yet. Until then the demo runs the foundation end to end: a batch of
interleaved keyframe samples (K keyframes + K captions, a different K per sample through padding) goes through a
two-layer block stack built from cinema_jax.nn (per-keyframe AdaLN timesteps, 3-axis RoPE with the keyframe index on
the frame axis, QK RMSNorm), the first layer with the local (per-keyframe segment) mask and the second with the
global block-causal mask over keyframes; parameters are created sharded over the mesh, a few jitted training steps
run sharded, and the sharded forward is checked against a single-device forward.

Command: `make demo` (= `cinema-jax demo --config configs/demo.py`); 8 fake CPU devices, well under a minute on two
cores. Expected: a mask table, a parameter sharding table, a falling loss and "sharded == single-device".
"""

import ml_collections

from cinema_jax.config import import_config

VARIANTS = ("default",)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if (arg or "default") not in VARIANTS:
    raise ValueError(f"unknown variant {arg!r} of configs/demo.py; choose one of {', '.join(VARIANTS)}")
  c = import_config("base").get_config("cpu8")
  c.variant = arg or "default"

  c.data = ml_collections.ConfigDict()
  c.data.batch_size = 8  # global batch, split over data x fsdp
  c.data.max_keyframes = 4  # K slots per sample; sample i uses max(1, K - i % K) of them, the rest is padding
  c.data.caption_tokens = 8  # text tokens per keyframe caption
  c.data.image_side = 6  # latent tokens per side of one keyframe (after patchify)

  c.model = ml_collections.ConfigDict()
  c.model.width = 64  # E
  c.model.heads = 4  # H
  c.model.head_dim = 16  # D; RoPE splits it over (keyframe, row, col) as axes_dim
  c.model.axes_dim = (4, 6, 6)
  c.model.mlp_ratio = 4
  c.model.time_dim = 32  # sinusoidal timestep features before the embedder MLP
  c.model.layer_masks = ("local", "global")  # one entry per layer: local = within keyframe, global = block-causal

  c.train = ml_collections.ConfigDict()
  c.train.steps = 30
  c.train.learning_rate = 3e-3
  return c
