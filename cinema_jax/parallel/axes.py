"""The one vocabulary of logical axis names.

Every parameter (through ``nn.with_logical_partitioning``) and every activation at a block boundary (through
``nn.with_logical_constraint``) names its dimensions with these constants. Which mesh axis each name maps to is not
decided here but by the ``sharding_rules`` of the config (``configs/base.py``), so that one model runs data-parallel
on a laptop and FSDP x tensor x sequence parallel on a pod without an edit.

Mesh axes (``MESH_AXES``): ``data`` (pure replicas), ``fsdp`` (data parallel with parameters and optimiser state
sharded), ``sequence`` (tokens of one sample split across devices), ``tensor`` (heads and MLP columns split).
"""

from __future__ import annotations

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "sequence", "tensor")

# Parameter dimensions.
EMBED = "embed"  # model width E
MLP = "mlp"  # hidden width of a feed-forward layer
HEADS = "heads"  # attention heads H
HEAD_DIM = "head_dim"  # per-head width D
QKV = "qkv"  # fused q/k/v output columns (3 x H x D), Flux's qkv and linear1 layout
MODULATION = "modulation"  # AdaLN output columns (k x E)
NORM = "norm"  # scale vector of a norm; never sharded
IN_FEATURES = "in_features"  # input channels of an embedding (patch, text, time frequencies)
OUT_FEATURES = "out_features"  # output channels of a head (latent channels x patch)
LAYERS = "layers"  # stacked-block axis added by nn.scan

# Activation dimensions.
ACT_BATCH = "activation_batch"
ACT_LENGTH = "activation_length"  # tokens L (image, text or both)
ACT_FRAMES = "activation_frames"  # frames F of a video, or keyframes K of a sample
ACT_EMBED = "activation_embed"
ACT_MLP = "activation_mlp"
ACT_HEADS = "activation_heads"
ACT_HEAD_DIM = "activation_head_dim"

PARAM_AXES = (EMBED, MLP, HEADS, HEAD_DIM, QKV, MODULATION, NORM, IN_FEATURES, OUT_FEATURES, LAYERS)
ACTIVATION_AXES = (ACT_BATCH, ACT_LENGTH, ACT_FRAMES, ACT_EMBED, ACT_MLP, ACT_HEADS, ACT_HEAD_DIM)
ALL_AXES = PARAM_AXES + ACTIVATION_AXES

# The default logical -> mesh rules; configs copy and edit them. Flax takes the first rule of a name whose mesh axes
# are still free in the spec, so a name may appear twice (a fallback when an earlier dimension took the axis).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
  (ACT_BATCH, ("data", "fsdp")),
  (ACT_LENGTH, "sequence"),
  (ACT_FRAMES, None),
  (ACT_EMBED, None),
  (ACT_MLP, "tensor"),
  (ACT_HEADS, "tensor"),
  (ACT_HEAD_DIM, None),
  (EMBED, "fsdp"),
  (MLP, "tensor"),
  (HEADS, "tensor"),
  (HEAD_DIM, None),
  (QKV, "tensor"),
  (MODULATION, "tensor"),
  (NORM, None),
  (IN_FEATURES, None),
  (OUT_FEATURES, None),
  (LAYERS, None),
)
