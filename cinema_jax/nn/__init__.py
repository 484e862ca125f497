"""Building blocks shared by the Flux (MM-DiT) and Wan (video DiT) models: layers, norms, modulation, embeddings."""

from cinema_jax.nn.embeddings import MLPEmbedder, flux_timestep_embedding, timestep_embedding, wan_timestep_embedding
from cinema_jax.nn.linear import Dense
from cinema_jax.nn.mlp import MLP
from cinema_jax.nn.modulation import AdaLNModulation, gate, modulate
from cinema_jax.nn.norms import LayerNorm, RMSNorm
from cinema_jax.nn.rope import apply_rope, rope_angles, rope_frequencies, wan_axes_dim

__all__ = [
  "AdaLNModulation",
  "Dense",
  "LayerNorm",
  "MLP",
  "MLPEmbedder",
  "RMSNorm",
  "apply_rope",
  "flux_timestep_embedding",
  "gate",
  "modulate",
  "rope_angles",
  "rope_frequencies",
  "timestep_embedding",
  "wan_axes_dim",
  "wan_timestep_embedding",
]
