"""The models run on the block-sparse kernel without a code change: ``attention_implementation="pallas"`` equals
``"xla"`` in outputs and parameter gradients (float32, CPU interpret mode, tiny configs)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import cinema_kernels as ck
from cinema_jax.models import keyframes_layout as kl
from cinema_jax.models import video_dit
from cinema_jax.models.mmdit import MMDiT


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _compare(make, args, params):
  """Outputs and parameter gradients of the xla and pallas models on the same parameters."""
  results = {}
  for impl in ("xla", "pallas"):
    model = make(impl)

    def loss(p, model=model):
      out = model.apply(p, *args)
      return jnp.sum(out * jnp.sin(out)), out

    with ck.use_block_sizes(16, 16):  # several tiles per sequence, so masks skip and mask partial tiles
      (_, out), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    results[impl] = (out, g)
  (out_x, g_x), (out_p, g_p) = results["xla"], results["pallas"]
  assert rel_err(out_p, out_x) < 1e-5
  flat_x, flat_p = jax.tree.leaves(g_x), jax.tree.leaves(g_p)
  assert len(flat_x) == len(flat_p) > 0
  for a, b in zip(flat_p, flat_x, strict=True):
    assert rel_err(a, b) < 1e-4
  return out_x


def test_mmdit_hybrid_masks_pallas_equals_xla():
  """Local (per-keyframe segment) double block, global block-causal single block, a padded keyframe slot."""
  fields = dict(
    in_channels=8,
    vec_in_dim=6,
    context_in_dim=10,
    hidden_size=32,
    num_heads=2,
    depth=1,
    depth_single_blocks=1,
    axes_dim=(4, 6, 6),
    guidance_embed=False,
    num_local_blocks=1,
    global_mask="block_causal",
  )
  layout, txt_ids, img_ids = kl.interleaved_layout([2, 1], max_keyframes=2, caption_tokens=4, frame_shape=(4, 4))
  r = np.random.default_rng(0)
  img = r.standard_normal((2, 32, 8)).astype(np.float32)
  txt = r.standard_normal((2, 8, 10)).astype(np.float32)
  y = r.standard_normal((2, 2, 6)).astype(np.float32)
  t = np.array([[0.0, 0.7], [0.4, 0.9]], np.float32)  # per keyframe: a clean memory keyframe beside a noisy one
  args = (img, txt, y, t, img_ids, txt_ids, None, layout)
  make = lambda impl: MMDiT(**fields, attention_implementation=impl)  # noqa: E731
  params = nn.meta.unbox(make("xla").init(jax.random.key(0), *args))
  out = _compare(make, args, params)
  assert np.isfinite(np.asarray(out)).all()


def test_video_dit_block_causal_pallas_equals_xla():
  """Diffusion forcing: frame block-causal self-attention (skips later frames) and unmasked cross-attention."""
  fields = dict(width=32, heads=2, depth=1, ffn_dim=48, in_channels=4, out_channels=4, text_dim=24, freq_dim=16)
  r = np.random.default_rng(1)
  x = jnp.asarray(r.standard_normal((2, 4, 8, 8, 4)), jnp.float32)  # 4 frames x 16 tokens
  t = jnp.asarray(r.integers(0, 1000, (2, 4)), jnp.float32)  # per-frame noise levels
  ctx = jnp.asarray(r.standard_normal((2, 3, 24)), jnp.float32)
  make = lambda impl: video_dit.VideoDiT(**fields, causal_block_size=1, attention_implementation=impl)  # noqa: E731
  params = nn.meta.unbox(make("xla").init(jax.random.key(0), x, t, ctx))
  _compare(make, (x, t, ctx), params)


def test_config_tiles_reach_the_kernel_through_the_model(monkeypatch):
  """``attention.block_*`` of a config -> the model's ``attention_tiles`` -> every Pallas call the model traces."""
  import ml_collections
  import pytest

  from cinema_jax.attention import config_tiles
  from cinema_kernels import metadata

  section = ml_collections.ConfigDict(dict(block_q=None, block_kv=None, block_q_bwd=None, block_kv_bwd=None))
  assert config_tiles(section) is None  # the backend's defaults
  section.block_kv = 32
  with pytest.raises(ValueError, match="attention.block_q is unset"):
    config_tiles(section)
  section.block_q, section.block_kv_bwd = 16, 12
  with pytest.raises(ValueError, match="block_kv_bwd must be a positive multiple of 8"):
    config_tiles(section)
  section.block_q_bwd, section.block_kv_bwd = 16, 16
  tiles = config_tiles(section)
  assert tiles == (16, 32, 16, 16)

  seen = []
  real = metadata.prepare
  monkeypatch.setattr(metadata, "prepare", lambda *a, **kw: seen.append(a[4]) or real(*a, **kw))
  fields = dict(width=32, heads=2, depth=1, ffn_dim=48, in_channels=4, out_channels=4, text_dim=24, freq_dim=16)
  r = np.random.default_rng(2)
  x = jnp.asarray(r.standard_normal((1, 2, 8, 8, 4)), jnp.float32)
  t = jnp.asarray(r.integers(0, 1000, (1, 2)), jnp.float32)
  ctx = jnp.asarray(r.standard_normal((1, 3, 24)), jnp.float32)
  model = video_dit.VideoDiT(**fields, causal_block_size=1, attention_implementation="pallas", attention_tiles=tiles)
  jax.eval_shape(model.init, jax.random.key(0), x, t, ctx)
  assert seen and all(sizes == ck.BlockSizes(16, 32, 16, 16) for sizes in seen)
  assert ck.default_block_sizes("mosaic_tpu") == ck.DEFAULT_BLOCK_SIZES["mosaic_tpu"]  # nothing leaks out
