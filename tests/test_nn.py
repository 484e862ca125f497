"""cinema_jax.nn against hand-computed values, float64 numpy references and diffusers' timestep embedding."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cinema_jax.nn import (
  MLP,
  AdaLNModulation,
  Dense,
  LayerNorm,
  MLPEmbedder,
  RMSNorm,
  apply_rope,
  flux_timestep_embedding,
  gate,
  modulate,
  rope_angles,
  timestep_embedding,
  wan_axes_dim,
  wan_timestep_embedding,
)
from cinema_jax.parallel.axes import EMBED, IN_FEATURES, MODULATION, NORM
from cinema_jax.parallel.axes import MLP as MLP_AXIS


def gelu_tanh(h):
  return 0.5 * h * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h**3)))


def silu(h):
  return h / (1.0 + np.exp(-h))


def f64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


# ----------------------------------------------------------------------------------------------------------- RoPE


def test_rope_one_axis_integer_and_fractional_positions_by_hand():
  # One axis of width 4, theta 1e4: omega = [1e4^0, 1e4^(-2/4)] = [1, 0.01].
  positions = jnp.array([[[2.0], [1.5]]])  # [1, 2 tokens, 1 axis]
  angles = rope_angles(positions, axes_dim=(4,), theta=10000.0)
  np.testing.assert_allclose(angles, [[[2.0, 0.02], [1.5, 0.015]]], rtol=1e-6)

  x = jnp.array([1.0, 2.0, 3.0, 4.0])
  x = jnp.broadcast_to(x, (1, 2, 1, 4))  # [b, l, h, d]
  out = apply_rope(x, angles)
  # (x0, x1) -> (x0 cos a - x1 sin a, x0 sin a + x1 cos a) on pairs (1, 2) and (3, 4).
  expected = [
    [-2.234741690198506, 0.0770037537313969, 2.919405353226401, 4.05919602674631],  # position 2
    [-1.924252771540406, 1.1389693899394602, 2.9396647563027654, 4.044548320956421],  # position 1.5
  ]
  np.testing.assert_allclose(out[0, :, 0], expected, atol=2e-6)


def test_rope_axes_concatenate_in_order():
  # axes_dim (2, 4) with theta 100: axis 0 has omega [1]; axis 1 has omega [1, 100^(-1/2)] = [1, 0.1].
  positions = jnp.array([[3.0, 5.0]])  # [1 token, 2 axes]
  angles = rope_angles(positions, axes_dim=(2, 4), theta=100.0)
  np.testing.assert_allclose(angles, [[3.0, 5.0, 0.5]], rtol=1e-6)
  # Batch dims before L pass through.
  batched = rope_angles(jnp.broadcast_to(positions, (2, 7, 1, 2)), axes_dim=(2, 4), theta=100.0)
  assert batched.shape == (2, 7, 1, 3)


def test_wan_axes_dim():
  assert wan_axes_dim(128) == (44, 42, 42)
  assert wan_axes_dim(64) == (24, 20, 20)
  assert sum(wan_axes_dim(96)) == 96


def flux_rope_reference(x, positions, axes_dim, theta):
  """BFL flux/math.py ``rope`` + ``apply_rope`` in float64 numpy ([B, L, H, D] layout instead of [B, H, L, D])."""
  mats = []
  for a, dim in enumerate(axes_dim):
    omega = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    out = np.einsum("...n,d->...nd", positions[..., a], omega)
    mats.append(np.stack([np.cos(out), -np.sin(out), np.sin(out), np.cos(out)], -1).reshape(*out.shape, 2, 2))
  freqs = np.concatenate(mats, axis=-3)[:, :, None]  # [b, l, 1, p, 2, 2]
  x_ = x.reshape(*x.shape[:-1], -1, 1, 2)
  return (freqs[..., 0] * x_[..., 0] + freqs[..., 1] * x_[..., 1]).reshape(x.shape)


def test_rope_matches_flux_formula_with_fractional_positions(rng):
  axes_dim, theta = (4, 6, 6), 10000.0
  b, n, h = 2, 5, 3
  d = sum(axes_dim)
  x = rng.standard_normal((b, n, h, d))
  # GoldenMem-style positions: frame index, and rows/cols (i + 0.5) * H/h - 0.5 of a 3x downsampled grid.
  positions = np.stack(
    [np.full((b, n), 4.0), np.broadcast_to((np.arange(n) + 0.5) * 3.0 - 0.5, (b, n)), rng.uniform(0, 30, (b, n))], -1
  )  # [b, n, 3]
  out = apply_rope(jnp.asarray(x, jnp.float32), rope_angles(jnp.asarray(positions, jnp.float32), axes_dim, theta))
  np.testing.assert_allclose(out, flux_rope_reference(x, positions, axes_dim, theta), atol=2e-5)


def test_rope_preserves_pair_norms_and_dtype(rng):
  x = jnp.asarray(rng.standard_normal((2, 6, 2, 8)), jnp.float32)
  positions = jnp.asarray(rng.uniform(-10, 50, (2, 6, 2)), jnp.float32)
  out = apply_rope(x, rope_angles(positions, (4, 4)))
  pair_norm = lambda a: np.linalg.norm(np.asarray(a).reshape(*a.shape[:-1], -1, 2), axis=-1)
  np.testing.assert_allclose(pair_norm(out), pair_norm(x), rtol=1e-5)
  assert apply_rope(x.astype(jnp.bfloat16), rope_angles(positions, (4, 4))).dtype == jnp.bfloat16


def test_rope_scores_depend_only_on_relative_position(rng):
  axes_dim = (4, 4, 4)
  q = jnp.asarray(rng.standard_normal((1, 6, 2, 12)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((1, 6, 2, 12)), jnp.float32)
  positions = jnp.asarray(rng.uniform(0, 8, (1, 6, 3)), jnp.float32)
  shift = jnp.array([2.5, -1.25, 7.0])  # fractional shifts on every axis

  def scores(pos):
    angles = rope_angles(pos, axes_dim)
    # HIGHEST: on GPUs the default float32 matmul is TF32, whose 1e-3 error would hide the 1e-5 being checked.
    return jnp.einsum("blhd,bmhd->bhlm", apply_rope(q, angles), apply_rope(k, angles), precision="highest")

  np.testing.assert_allclose(scores(positions + shift), scores(positions), atol=2e-5)
  # ... and do depend on the relative positions.
  assert not np.allclose(scores(positions.at[:, 0].add(1.0)), scores(positions), atol=1e-3)


# ------------------------------------------------------------------------------------------- timestep embedding


def test_flux_timestep_embedding_by_hand():
  # dim 4: half 2, freqs exp(-ln(1e4) * [0, 1] / 2) = [1, 0.01]; t = 0.5 -> args 500 * [1, 0.01] = [500, 5].
  emb = flux_timestep_embedding(jnp.array([0.5]), 4)
  expected = [-0.883849273431478, 0.28366218546322625, -0.46777180532247614, -0.9589242746631385]  # cos, cos, sin, sin
  np.testing.assert_allclose(emb, [expected], atol=2e-5)


def test_wan_timestep_embedding_per_frame_by_hand():
  # dim 6: half 3, freqs 1e4^(-[0, 1, 2] / 3) = [1, 0.0464159, 0.00215443]; t already in [0, 1000].
  t = jnp.array([[0.0, 250.0]])  # [b=1, f=2] per-frame timesteps
  emb = wan_timestep_embedding(t, 6)
  assert emb.shape == (1, 2, 6) and emb.dtype == jnp.float32
  np.testing.assert_allclose(emb[0, 0], [1, 1, 1, 0, 0, 0], atol=1e-7)
  expected = [
    0.24098830528525864,
    0.5715534824215712,
    0.8584231825001144,  # cos(250 * freqs)
    -0.9705280195418053,
    -0.8205648156798917,
    0.5129421407394554,  # sin(250 * freqs)
  ]
  np.testing.assert_allclose(emb[0, 1], expected, atol=2e-5)


def test_timestep_embedding_options():
  t = jnp.array([0.3, 7.0])
  cos_sin = timestep_embedding(t, 8, time_factor=1.0)
  sin_cos = timestep_embedding(t, 8, time_factor=1.0, flip_sin_to_cos=False)
  np.testing.assert_array_equal(sin_cos, jnp.concatenate([cos_sin[:, 4:], cos_sin[:, :4]], -1))
  odd = timestep_embedding(t, 9, time_factor=1.0)
  assert odd.shape == (2, 9)
  np.testing.assert_array_equal(odd[:, :8], cos_sin)
  np.testing.assert_array_equal(odd[:, 8], 0.0)


@pytest.mark.parity
def test_timestep_embeddings_match_diffusers(rng):
  torch = pytest.importorskip("torch")
  embeddings = pytest.importorskip("diffusers.models.embeddings")
  t01 = np.concatenate([[0.0, 1.0], rng.uniform(0, 1, 30)]).astype(np.float32)
  # torch's float32 exp is not correctly rounded for 2 of the 128 frequencies (ours are); one ulp of a frequency
  # moves an argument near 1000 by one float32 ulp, 6.1e-5 rad. Everything else agrees to float32 rounding.
  atol = 7e-5

  # Flux: diffusers multiplies the [0, 1] timestep by 1000 in the transformer, then Timesteps(256, True, 0).
  t = torch.from_numpy(t01) * 1000
  ref = embeddings.get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
  np.testing.assert_allclose(flux_timestep_embedding(jnp.asarray(t01), 256), ref.numpy(), atol=atol)

  # Wan / SkyReels-V2: t in [0, 1000] straight into Timesteps(freq_dim=256, True, 0).
  t1000 = t01 * 1000
  ref = embeddings.get_timestep_embedding(torch.from_numpy(t1000), 256, flip_sin_to_cos=True, downscale_freq_shift=0)
  np.testing.assert_allclose(wan_timestep_embedding(jnp.asarray(t1000), 256), ref.numpy(), atol=atol)

  # The general function with diffusers' own defaults (sin first, downscale_freq_shift=1), odd width.
  ref = embeddings.get_timestep_embedding(torch.from_numpy(t1000), 33)
  ours = timestep_embedding(jnp.asarray(t1000), 33, time_factor=1.0, flip_sin_to_cos=False, downscale_freq_shift=1.0)
  np.testing.assert_allclose(ours, ref.numpy(), atol=atol)


def test_wan_timestep_embedding_close_to_float64_original():
  # Wan's sinusoidal_embedding_1d runs in float64; the module docstring promises ~1e-4 in float32.
  t = np.linspace(0, 1000, 257)
  half = 128
  args = np.outer(t, np.power(10000.0, -np.arange(half) / half))
  ref = np.concatenate([np.cos(args), np.sin(args)], 1)
  np.testing.assert_allclose(wan_timestep_embedding(jnp.asarray(t, jnp.float32), 256), ref, atol=2e-4)


# ---------------------------------------------------------------------------------------------------------- norms


def test_rmsnorm_float32_math_for_bf16_input(rng):
  x = jnp.asarray(rng.standard_normal((2, 3, 16)) * 30 + 5, jnp.bfloat16)
  module = RMSNorm(dtype=jnp.bfloat16)
  variables = nn.meta.unbox(module.init(jax.random.key(0), x))
  assert variables["params"]["scale"].dtype == jnp.float32
  scale = rng.uniform(0.5, 2.0, 16).astype(np.float32)
  out = module.apply({"params": {"scale": scale}}, x)
  assert out.dtype == jnp.bfloat16

  x64 = np.asarray(x, np.float64)
  ref = x64 / np.sqrt(np.mean(x64**2, -1, keepdims=True) + 1e-6) * scale
  # One bf16 rounding of the float32 result: within half a bf16 ulp (2^-9 relative) of the float64 value.
  np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=2**-8)
  # In float32 end to end the result is the float64 one to float32 precision.
  out32 = RMSNorm().apply({"params": {"scale": scale}}, x.astype(jnp.float32))
  np.testing.assert_allclose(out32, ref, rtol=2e-6, atol=1e-6)


def test_rmsnorm_per_head_and_across_heads():
  x = jax.random.normal(jax.random.key(1), (2, 5, 4, 8))  # [b, l, h, d]
  per_head = RMSNorm().init(jax.random.key(0), x)  # Flux: scale [D]
  assert per_head["params"]["scale"].value.shape == (8,)
  assert nn.get_partition_spec(per_head)["params"]["scale"] == P(NORM)
  out = RMSNorm().apply(per_head, x)
  np.testing.assert_allclose(np.mean(np.square(out), -1), 1.0, rtol=1e-4)
  across = RMSNorm().init(jax.random.key(0), x.reshape(2, 5, 32))  # Wan: scale [E]
  assert across["params"]["scale"].value.shape == (32,)


def test_layernorm_without_and_with_affine(rng):
  x = jnp.asarray(rng.standard_normal((3, 4, 16)) * 3 + 100, jnp.float32)
  x64 = np.asarray(x, np.float64)
  mean, var = x64.mean(-1, keepdims=True), x64.var(-1, keepdims=True)
  ref = (x64 - mean) / np.sqrt(var + 1e-6)

  plain = LayerNorm()
  assert plain.init(jax.random.key(0), x) == {}  # Flux's LayerNorm(elementwise_affine=False): no parameters
  np.testing.assert_allclose(plain.apply({}, x), ref, atol=2e-5)
  assert LayerNorm(dtype=jnp.bfloat16).apply({}, x).dtype == jnp.bfloat16

  affine = LayerNorm(use_scale=True, use_bias=True)
  params = nn.meta.unbox(affine.init(jax.random.key(0), x))["params"]
  np.testing.assert_array_equal(params["scale"], np.ones(16))
  np.testing.assert_array_equal(params["bias"], np.zeros(16))
  scale, bias = rng.standard_normal(16).astype(np.float32), rng.standard_normal(16).astype(np.float32)
  np.testing.assert_allclose(affine.apply({"params": {"scale": scale, "bias": bias}}, x), ref * scale + bias, atol=5e-5)


# ----------------------------------------------------------------------------------------------------- modulation


def test_adaln_modulation_is_silu_dense_chunked(rng):
  b, e_vec, k, e = 2, 6, 3, 4
  vec = jnp.asarray(rng.standard_normal((b, e_vec)), jnp.float32)
  module = AdaLNModulation(num_chunks=k, features=e)
  variables = module.init(jax.random.key(0), vec)
  assert nn.get_partition_spec(variables)["params"]["lin"]["kernel"] == P(EMBED, MODULATION)
  params = f64(nn.meta.unbox(variables))["params"]["lin"]
  out = module.apply(variables, vec)
  assert out.shape == (b, k, e)
  full = silu(np.asarray(vec, np.float64)) @ params["kernel"] + params["bias"]  # [b, k * e]
  for i in range(k):  # torch.chunk(k, dim=-1) order
    np.testing.assert_allclose(out[:, i], full[:, i * e : (i + 1) * e], atol=1e-5)
  # Per-frame vectors [B, F, E] keep their frame axis.
  assert module.apply(variables, jnp.zeros((b, 5, e_vec))).shape == (b, 5, k, e)


def test_modulate_and_gate_granularities_agree_when_repeated(rng):
  b, f, n, e = 2, 3, 4, 8
  x = jnp.asarray(rng.standard_normal((b, f * n, e)), jnp.float32)
  shift, scale, g = (jnp.asarray(rng.standard_normal((b, e)), jnp.float32) for _ in range(3))
  per_frame = lambda v: jnp.repeat(v[:, None], f, axis=1)  # [b, f, e]
  per_token = lambda v: jnp.repeat(v[:, None], f * n, axis=1)  # [b, l, e]

  sample = modulate(x, shift, scale)
  np.testing.assert_allclose(
    sample, np.asarray(x) * (1 + np.asarray(scale)[:, None]) + np.asarray(shift)[:, None], rtol=1e-6, atol=1e-6
  )
  np.testing.assert_array_equal(modulate(x, per_frame(shift), per_frame(scale), tokens_per_frame=n), sample)
  np.testing.assert_array_equal(modulate(x, per_token(shift), per_token(scale)), sample)

  gated = gate(x, g)
  np.testing.assert_allclose(gated, np.asarray(x) * np.asarray(g)[:, None], rtol=1e-6)
  np.testing.assert_array_equal(gate(x, per_frame(g), tokens_per_frame=n), gated)
  np.testing.assert_array_equal(gate(x, per_token(g)), gated)


def test_per_frame_modulation_differs_per_frame(rng):
  b, f, n, e = 2, 3, 4, 8
  x = jnp.asarray(rng.standard_normal((b, f * n, e)), jnp.bfloat16)
  shift = jnp.asarray(rng.standard_normal((b, f, e)), jnp.float32)
  scale = jnp.asarray(rng.standard_normal((b, f, e)), jnp.float32)
  g = jnp.asarray(rng.standard_normal((b, f, e)), jnp.float32)
  out = modulate(x, shift, scale, tokens_per_frame=n)
  gated = gate(x, g, tokens_per_frame=n)
  assert out.dtype == gated.dtype == jnp.bfloat16

  x64 = np.asarray(x, np.float64)
  for fi in range(f):
    tokens = slice(fi * n, (fi + 1) * n)  # frame fi owns tokens [fi*n, (fi+1)*n)
    ref = x64[:, tokens] * (1 + np.asarray(scale)[:, fi, None]) + np.asarray(shift)[:, fi, None]
    np.testing.assert_allclose(np.asarray(out[:, tokens], np.float64), ref, rtol=2**-8, atol=1e-6)
    ref_g = x64[:, tokens] * np.asarray(g)[:, fi, None]
    np.testing.assert_allclose(np.asarray(gated[:, tokens], np.float64), ref_g, rtol=2**-8, atol=1e-6)
  # A frame's tokens use its own conditioning: with x constant, frames differ.
  ones = jnp.ones((b, f * n, e), jnp.float32)
  by_frame = modulate(ones, shift, scale, tokens_per_frame=n).reshape(b, f, n, e)
  assert not np.allclose(by_frame[:, 0], by_frame[:, 1])
  np.testing.assert_array_equal(by_frame[:, 0, 0], by_frame[:, 0, -1])


def test_modulate_rejects_mismatched_layouts():
  x = jnp.zeros((2, 12, 8))
  with pytest.raises(ValueError, match="tokens_per_frame"):
    modulate(x, jnp.zeros((2, 3, 8)), jnp.zeros((2, 3, 8)))  # 3 rows, 12 tokens, no tokens_per_frame
  with pytest.raises(ValueError, match="5 tokens_per_frame"):
    gate(x, jnp.zeros((2, 3, 8)), tokens_per_frame=5)
  with pytest.raises(ValueError, match="width"):
    gate(x, jnp.zeros((2, 4)))


# --------------------------------------------------------------------------------------------- dense, MLP, embedder


def test_dense_logical_axes_dtypes_and_leading_dims(rng):
  x = jnp.asarray(rng.standard_normal((2, 3, 4, 5)), jnp.float32)
  module = Dense(7, kernel_axes=(EMBED, MLP_AXIS), dtype=jnp.bfloat16)
  variables = module.init(jax.random.key(0), x)
  specs = nn.get_partition_spec(variables)["params"]
  assert specs == {"kernel": P(EMBED, MLP_AXIS), "bias": P(MLP_AXIS)}
  params = nn.meta.unbox(variables)["params"]
  assert params["kernel"].shape == (5, 7) and params["bias"].shape == (7,)
  assert params["kernel"].dtype == params["bias"].dtype == jnp.float32
  out = module.apply(variables, x)
  assert out.shape == (2, 3, 4, 7) and out.dtype == jnp.bfloat16

  p64 = f64(params)
  ref = np.asarray(x, np.float64) @ p64["kernel"] + p64["bias"]
  np.testing.assert_allclose(Dense(7, kernel_axes=(EMBED, MLP_AXIS)).apply(variables, x), ref, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=2e-2, atol=2e-2)  # bf16 compute
  no_bias = Dense(7, kernel_axes=(EMBED, MLP_AXIS), use_bias=False).init(jax.random.key(0), x)
  assert set(no_bias["params"]) == {"kernel"}


def test_mlp_matches_numpy(rng):
  x = jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.float32)
  module = MLP(hidden=32)
  variables = module.init(jax.random.key(0), x)
  specs = nn.get_partition_spec(variables)["params"]
  assert specs["in_layer"]["kernel"] == P(EMBED, MLP_AXIS)
  assert specs["out_layer"]["kernel"] == P(MLP_AXIS, EMBED)
  p = f64(nn.meta.unbox(variables))["params"]
  h = gelu_tanh(np.asarray(x, np.float64) @ p["in_layer"]["kernel"] + p["in_layer"]["bias"])
  ref = h @ p["out_layer"]["kernel"] + p["out_layer"]["bias"]
  np.testing.assert_allclose(module.apply(variables, x), ref, atol=2e-6, rtol=1e-5)
  bf16 = MLP(hidden=32, dtype=jnp.bfloat16).apply(variables, x)
  assert bf16.dtype == jnp.bfloat16


def test_mlp_embedder_per_frame_timesteps_to_modulation(rng):
  # Wan's path for diffusion forcing: t [B, F] -> sinusoid [B, F, 256] -> MLPEmbedder -> [B, F, 6, E].
  t = jnp.array([[999.0, 500.0, 0.0]])
  freq = wan_timestep_embedding(t, 16)
  embedder = MLPEmbedder(hidden=8)
  variables = embedder.init(jax.random.key(0), freq)
  specs = nn.get_partition_spec(variables)["params"]
  assert specs["in_layer"]["kernel"] == P(IN_FEATURES, MLP_AXIS)
  assert specs["out_layer"]["kernel"] == P(MLP_AXIS, EMBED)
  p = f64(nn.meta.unbox(variables))["params"]
  vec = embedder.apply(variables, freq)  # [1, 3, 8]
  ref = silu(np.asarray(freq, np.float64) @ p["in_layer"]["kernel"] + p["in_layer"]["bias"])
  ref = ref @ p["out_layer"]["kernel"] + p["out_layer"]["bias"]
  np.testing.assert_allclose(vec, ref, atol=2e-6, rtol=1e-5)

  mod = AdaLNModulation(num_chunks=6, features=8)
  chunks = mod.apply(mod.init(jax.random.key(1), vec), vec)
  assert chunks.shape == (1, 3, 6, 8)
  assert not np.allclose(chunks[:, 0], chunks[:, 1])  # frames at different noise levels are modulated differently
