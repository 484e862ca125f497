"""The video DiT against diffusers' SkyReelsV2Transformer3DModel, and its structural promises.

Parity: tiny random diffusers models (float32, CPU, seeded; every parameter re-drawn so zero-initialised layers
count too) with per-frame timesteps [B, F], bidirectional and block-causal; our output within 1e-4 relative L2.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import SkyReelsV2Transformer3DModel

from cinema_jax import config as config_lib
from cinema_jax import parallel
from cinema_jax.convert import skyreels
from cinema_jax.models import video_dit

TINY = dict(
  patch_size=(1, 2, 2),
  num_attention_heads=2,
  attention_head_dim=16,
  in_channels=4,
  out_channels=4,
  text_dim=24,
  freq_dim=16,
  ffn_dim=48,
  num_layers=2,
)


def diffusers_model(seed=0, **overrides):
  torch.manual_seed(seed)
  model = SkyReelsV2Transformer3DModel(**{**TINY, **overrides}).eval()
  with torch.no_grad():
    for p in model.parameters():  # default init zeroes some layers; random values exercise every weight
      p.copy_(torch.randn_like(p) * 0.3)
  return model


def rel_l2(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


CASES = {
  # name: (diffusers overrides, batch, frames, per-frame timesteps, fps)
  "bidirectional_per_frame": (dict(), 2, 4, True, None),
  "block_causal_2_per_frame": (dict(num_frame_per_block=2), 2, 4, True, None),
  "block_causal_3_fps": (dict(num_frame_per_block=3, inject_sample_info=True), 1, 6, True, [1]),
  "per_sample_timestep_fps16": (dict(inject_sample_info=True), 2, 3, False, [0, 0]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_diffusers(name):
  overrides, b, f, per_frame, fps = CASES[name]
  model = diffusers_model(**overrides)
  rng = np.random.default_rng(1)
  x = torch.from_numpy(rng.standard_normal((b, 4, f, 8, 6)).astype(np.float32))
  if per_frame:
    t = torch.from_numpy(rng.integers(0, 1000, (b, f)))
    t[0, 0] = 0  # a clean frame and a pure-noise frame in the same video
    t[0, -1] = 999
  else:
    t = torch.from_numpy(rng.integers(0, 1000, (b,)))
  ctx = torch.from_numpy(rng.standard_normal((b, 5, 24)).astype(np.float32))
  kwargs = dict(hidden_states=x, timestep=t, encoder_hidden_states=ctx, enable_diffusion_forcing=per_frame)
  if fps is not None:
    kwargs["fps"] = fps
  with torch.no_grad():
    ref = model(**kwargs, return_dict=False)[0].numpy()
  compat = skyreels.from_diffusers(model.state_dict(), model.config)
  out = compat(**kwargs)
  assert out.shape == ref.shape
  assert rel_l2(out, ref) < 1e-4
  if overrides.get("num_frame_per_block", 1) > 1:
    assert compat.module.causal_block_size == overrides["num_frame_per_block"]


def test_per_frame_batch_with_fps_equals_per_sample_runs():
  """diffusers broadcasts the fps projection only for batch 1 with per-frame steps; ours takes any batch."""
  model = diffusers_model(inject_sample_info=True, num_frame_per_block=2)
  compat = skyreels.from_diffusers(model.state_dict(), model.config)
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 4, 4, 4, 4)).astype(np.float32)
  t = rng.integers(0, 1000, (2, 4))
  ctx = rng.standard_normal((2, 3, 24)).astype(np.float32)
  both = np.asarray(compat(x, t, ctx, enable_diffusion_forcing=True, fps=[0, 1]))
  for i in range(2):
    with torch.no_grad():
      ref = model(
        hidden_states=torch.from_numpy(x[i : i + 1]),
        timestep=torch.from_numpy(t[i : i + 1]),
        encoder_hidden_states=torch.from_numpy(ctx[i : i + 1]),
        enable_diffusion_forcing=True,
        fps=[i],
        return_dict=False,
      )[0].numpy()
    assert rel_l2(both[i : i + 1], ref) < 1e-4


def tiny_model(**kw):
  fields = dict(width=32, heads=2, depth=2, ffn_dim=48, in_channels=4, out_channels=4, text_dim=24, freq_dim=16)
  return video_dit.VideoDiT(**{**fields, **kw})


def random_variables(model, x, t, ctx, fps=None, seed=0):
  """Random parameters with the model's shapes, drawn on the host (no compiled init)."""
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), x, t, ctx, fps))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape) * 0.3, a.dtype), shapes)


def tiny_inputs(b=2, f=4, h=4, w=4, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((b, f, h, w, 4)), jnp.float32)
  t = jnp.asarray(rng.integers(0, 1000, (b, f)), jnp.float32)
  ctx = jnp.asarray(rng.standard_normal((b, 3, 24)), jnp.float32)
  return x, t, ctx


def _all_shapes(jaxpr):
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      yield tuple(v.aval.shape)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _all_shapes(sub)


def test_modulation_is_per_frame_never_per_token():
  """The forward never builds [B, L, 6, E] (or its transposes / flattening): modulation stays [B, F, 6, E]."""
  model = tiny_model(causal_block_size=2)
  x, t, ctx = tiny_inputs(b=2, f=4, h=4, w=6)
  variables = random_variables(model, x, t, ctx)
  jaxpr = jax.make_jaxpr(model.apply)(variables, x, t, ctx).jaxpr
  b, length, e = 2, 4 * 2 * 3, 32
  shapes = set(_all_shapes(jaxpr))
  assert (b, 4, 6, e) in shapes  # the per-frame table exists
  for bad in [(b, length, 6, e), (b, 6, length, e), (b, length, 6 * e), (6, b, length, e)]:
    assert bad not in shapes, bad
  _, state = jax.jit(lambda v: model.apply(v, x, t, ctx, mutable=["intermediates"]))(variables)
  assert state["intermediates"]["modulation"][0].shape == (b, 4, 6, e)


def test_block_causal_attention_hides_later_blocks():
  """With blocks of 2 frames, changing frames 2-3 leaves the output of frames 0-1 exactly unchanged."""
  x, t, ctx = tiny_inputs(f=4)
  x2 = x.at[:, 2:].add(1.0)
  t2 = t.at[:, 2:].set(500.0)
  for cbs, expect_same in ((2, True), (0, False)):
    model = tiny_model(causal_block_size=cbs)
    v = random_variables(model, x, t, ctx)
    apply = jax.jit(model.apply)
    a, b = apply(v, x, t, ctx), apply(v, x2, t2, ctx)
    same = np.allclose(a[:, :2], b[:, :2], atol=1e-6)
    assert same == expect_same, cbs
    assert not np.allclose(a[:, 2:], b[:, 2:], atol=1e-3)


def test_block_ids_and_frame_count_errors():
  np.testing.assert_array_equal(video_dit.frame_block_ids(4, 2, 2), [0, 0, 0, 0, 1, 1, 1, 1])
  model = tiny_model(causal_block_size=3)
  x, t, ctx = tiny_inputs(f=4)
  with pytest.raises(ValueError, match=r"latent frames \(4\) to be divisible by causal_block_size \(3\)"):
    jax.eval_shape(model.init, jax.random.key(0), x, t, ctx)
  with pytest.raises(ValueError, match="pass fps"):
    jax.eval_shape(tiny_model(fps_embedding=True).init, jax.random.key(0), x, t, ctx)
  with pytest.raises(ValueError, match=r"timesteps must be \[B=2\] or \[B, F=4\]"):
    jax.eval_shape(tiny_model().init, jax.random.key(0), x, t[:, :3], ctx)
  with pytest.raises(ValueError, match="not divisible by the patch size"):
    jax.eval_shape(tiny_model().init, jax.random.key(0), x[:, :, :3], t, ctx)


def test_per_sample_timestep_equals_repeated_per_frame():
  model = tiny_model()
  x, t, ctx = tiny_inputs()
  v = random_variables(model, x, t, ctx)
  a = jax.jit(model.apply)(v, x, t[:, 0], ctx)
  b = jax.jit(model.apply)(v, x, jnp.repeat(t[:, :1], 4, axis=1), ctx)
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def _unstack(params, depth):
  out = {k: v for k, v in params.items() if k != "blocks"}
  for i in range(depth):
    out[f"blocks_{i}"] = jax.tree.map(lambda a, i=i: a[i], params["blocks"])
  return out


def test_scan_unrolled_and_remat_agree():
  """nn.scan vs unrolled layers: same output; remat policies: same loss and gradients."""
  x, t, ctx = tiny_inputs()
  scanned = tiny_model()
  v = random_variables(scanned, x, t, ctx)
  unrolled = tiny_model(scan_layers=False)
  v_unrolled = {"params": _unstack(v["params"], 2)}
  np.testing.assert_allclose(
    jax.jit(scanned.apply)(v, x, t, ctx), jax.jit(unrolled.apply)(v_unrolled, x, t, ctx), atol=1e-5
  )

  def loss(model, params):
    return jnp.mean(model.apply({"params": params}, x, t, ctx) ** 2)

  ref_loss, ref_grad = jax.jit(jax.value_and_grad(lambda p: loss(scanned, p)))(v["params"])
  for policy in ("full", "dots", "attention"):
    m = tiny_model(remat=policy)
    val, grad = jax.jit(jax.value_and_grad(lambda p, m=m: loss(m, p)))(v["params"])
    np.testing.assert_allclose(val, ref_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grad, ref_grad)
  with pytest.raises(ValueError, match="unknown remat policy 'some'"):
    jax.eval_shape(tiny_model(remat="some").init, jax.random.key(0), x, t, ctx)


def test_sharded_forward_matches_single_device():
  """Parameters created sharded over data 2 x fsdp 2 x tensor 2 (logical axes on every parameter)."""
  config = config_lib.load_config("configs/base.py:cpu8")
  mesh = parallel.make_mesh(dict(config.mesh))
  rules = tuple(tuple(r) for r in config.sharding_rules)
  model = tiny_model(causal_block_size=2)
  x, t, ctx = tiny_inputs(b=4)
  variables, shardings = parallel.sharded_init(model.init, mesh, rules, jax.random.key(0), x, t, ctx)
  kernel = variables["params"]["blocks"]["self_attn"]["q"]["kernel"]
  assert kernel.shape == (2, 32, 32)
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  with parallel.mesh_context(mesh, rules):
    sharded = jax.jit(model.apply)(variables, x, t, ctx)
  local = jax.tree.map(np.asarray, variables)
  single = jax.jit(model.apply)(local, x, t, ctx)
  np.testing.assert_allclose(sharded, single, atol=2e-5)


def test_bf16_forward_close_to_float32():
  model32 = tiny_model()
  model16 = tiny_model(dtype=jnp.bfloat16)
  x, t, ctx = tiny_inputs()
  v = random_variables(model32, x, t, ctx)
  a = jax.jit(model32.apply)(v, x, t, ctx)
  b = jax.jit(model16.apply)(v, x.astype(jnp.bfloat16), t, ctx.astype(jnp.bfloat16))
  assert b.dtype == jnp.bfloat16
  assert rel_l2(np.asarray(b, np.float32), a) < 2e-2


def test_config_variants_build_the_published_shapes():
  c = config_lib.load_config("configs/video.py:skyreels_1p3b")
  model = video_dit.from_config(c.model)
  assert (model.width, model.heads, model.depth, model.ffn_dim, model.fps_embedding) == (1536, 12, 30, 8960, True)
  assert model.head_dim == 128
  c14 = config_lib.load_config("configs/video.py:skyreels_14b")
  assert (c14.model.width, c14.model.heads, c14.model.depth, c14.model.ffn_dim) == (5120, 40, 40, 13824)
  assert not c14.model.fps_embedding
