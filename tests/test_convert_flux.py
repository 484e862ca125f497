"""Flux weight conversion: parity with tiny random diffusers FluxTransformer2DModel configs, coverage both ways,
the BFL layout from a safetensors file, bf16."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import jax.numpy as jnp  # noqa: E402
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers  # noqa: E402

from cinema_jax.convert import flux  # noqa: E402

CONFIGS = {
  # Guidance-distilled (flux1-dev-like), 2 double + 2 single blocks.
  "dev-like": dict(
    patch_size=1,
    in_channels=8,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=12,
    pooled_projection_dim=10,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
  ),
  # No guidance embedder (schnell-like), other widths and depths, out_channels != in_channels.
  "schnell-like": dict(
    patch_size=1,
    in_channels=12,
    out_channels=6,
    num_layers=1,
    num_single_layers=3,
    attention_head_dim=8,
    num_attention_heads=3,
    joint_attention_dim=7,
    pooled_projection_dim=5,
    guidance_embeds=False,
    axes_dims_rope=(2, 2, 4),
  ),
}


def build(name: str):
  """A diffusers model with every parameter random (norm scales and zero-initialised layers included)."""
  torch.manual_seed(0)
  model = diffusers.FluxTransformer2DModel(**CONFIGS[name]).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.3)
  return model


def inputs(model, batch=3, side=(3, 4), text=5, seed=1):
  cfg = model.config
  g = torch.Generator().manual_seed(seed)
  n = side[0] * side[1]
  img_ids = torch.zeros(n, 3)
  img_ids[:, 1] = torch.arange(n) // side[1]
  img_ids[:, 2] = torch.arange(n) % side[1]
  kwargs = dict(
    hidden_states=torch.randn(batch, n, cfg.in_channels, generator=g),
    encoder_hidden_states=torch.randn(batch, text, cfg.joint_attention_dim, generator=g),
    pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
    timestep=torch.tensor([0.05, 0.5, 0.95])[:batch],
    img_ids=img_ids,
    txt_ids=torch.zeros(text, 3),
  )
  if cfg.guidance_embeds:
    kwargs["guidance"] = torch.tensor([1.0, 3.5, 7.0])[:batch]
  return kwargs


def reference(model, kwargs):
  with torch.no_grad():
    return model(**kwargs).sample.numpy()


def rel_l2(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request):
  model = build(request.param)
  kwargs = inputs(model)
  return request.param, model, kwargs, reference(model, kwargs)


@pytest.mark.parity
def test_from_diffusers_matches_diffusers(case):
  name, model, kwargs, ref = case
  compat = flux.from_diffusers(model.state_dict(), model.config)
  out = compat(**kwargs)
  assert out.shape == ref.shape
  assert rel_l2(out, ref) < 1e-4, (name, rel_l2(out, ref))
  # Samples differ (several timesteps / guidance values), so a broadcasting mistake would show.
  assert rel_l2(out[0], out[1]) > 1e-2
  # Same result through the configs/keyframes.py-style model section and the tuple return form.
  section = flux.model_config_from_diffusers(model.config)
  (again,) = flux.from_diffusers(model.state_dict(), section)(**kwargs, return_dict=False)
  np.testing.assert_array_equal(np.asarray(again), np.asarray(out))
  assert set(compat.variables) == {"params"} and compat.module.depth == model.config.num_layers


@pytest.mark.parity
def test_bfl_file_from_a_path_matches_diffusers(case, tmp_path):
  """The diffusers tensors renamed to the BFL layout, written to a safetensors file and loaded from its path."""
  name, model, kwargs, ref = case
  bfl = flux.diffusers_to_bfl(model.state_dict())
  path = tmp_path / "flux1-tiny.safetensors"
  # Some exports carry the "model.diffusion_model." prefix; the loader strips it.
  safetensors_torch.save_file({"model.diffusion_model." + k: torch.from_numpy(v) for k, v in bfl.items()}, str(path))
  compat = flux.from_bfl(path, model.config)
  assert rel_l2(compat(**kwargs), ref) < 1e-4


@pytest.mark.parity
def test_bf16_weights_from_a_bf16_file(case, tmp_path):
  name, model, kwargs, ref = case
  bfl = flux.diffusers_to_bfl(model.state_dict())
  path = tmp_path / "flux1-tiny-bf16.safetensors"
  safetensors_torch.save_file({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in bfl.items()}, str(path))
  loaded = flux.load_safetensors(path)
  assert loaded["img_in.weight"].dtype == jnp.bfloat16
  compat = flux.from_bfl(path, model.config, param_dtype=jnp.bfloat16)
  assert compat.variables["params"]["img_in"]["kernel"].dtype == jnp.bfloat16
  # bf16 weights (8 mantissa bits), float32 compute: ~1e-2 relative against the float32 reference.
  assert rel_l2(compat(**kwargs), ref) < 2e-2
  # The same bf16 tensors handed over as torch bf16 tensors of a diffusers state dict.
  sd16 = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
  via_diffusers = flux.from_diffusers(sd16, model.config, param_dtype=jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(via_diffusers(**kwargs)), np.asarray(compat(**kwargs)))
  # bf16 compute as well (norms, modulation, softmax and RoPE stay float32 inside).
  bf16 = flux.from_bfl(path, model.config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  out = bf16(**kwargs)
  assert out.dtype == jnp.bfloat16 and rel_l2(np.asarray(out, np.float32), ref) < 3e-2


def test_bfl_names_agree_with_diffusers_own_bfl_converter():
  """diffusers' single-file converter (BFL -> diffusers) maps our BFL tensors back to the original state dict."""
  model = build("dev-like")
  sd = model.state_dict()
  bfl = flux.diffusers_to_bfl(sd)
  fake = {k: torch.from_numpy(v.copy()) for k, v in bfl.items()}
  # That converter assumes flux1's width 3072 when it splits linear1; give it tensors of those row counts (names
  # are what is checked there; the values of the other tensors are compared below).
  for k in [k for k in fake if ".linear1." in k]:
    fake[k] = torch.zeros((3 * 3072 + 4 * 3072,) + tuple(fake[k].shape[1:]))
  back = convert_flux_transformer_checkpoint_to_diffusers(fake)
  assert set(back) == set(sd)
  split = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
  for k, v in back.items():
    if not (k.startswith("single_transformer_blocks.") and any(s in k for s in split)):
      np.testing.assert_array_equal(v.numpy(), sd[k].numpy(), err_msg=k)


def test_coverage_both_ways_names_the_key():
  model = build("schnell-like")
  sd = dict(model.state_dict())
  cfg = model.config
  # Every diffusers tensor is used and every parameter filled: the inverse map gives the state dict back exactly.
  bfl = flux.diffusers_to_bfl(sd)
  back = flux.bfl_to_diffusers(bfl)
  assert set(back) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k].numpy(), err_msg=k)
  table = flux.param_table(flux.abstract_params(flux._module_from(cfg, None, {})))
  assert set(table) == set(bfl)  # parameters <-> BFL tensors, one to one

  missing = {k: v for k, v in sd.items() if k != "single_transformer_blocks.1.attn.norm_k.weight"}
  with pytest.raises(flux.ConversionError, match=r"missing diffusers tensor\(s\): 'single_transformer_blocks\.1\."):
    flux.from_diffusers(missing, cfg)
  extra = {**sd, "transformer_blocks.0.attn.extra.weight": torch.zeros(3)}
  with pytest.raises(flux.ConversionError, match=r"unused diffusers tensor\(s\).*'transformer_blocks\.0\.attn\.extra"):
    flux.from_diffusers(extra, cfg)
  deeper = {**sd, "single_transformer_blocks.3.proj_out.weight": torch.zeros(3)}  # a block the config lacks
  with pytest.raises(flux.ConversionError, match="single_transformer_blocks.3.proj_out.weight"):
    flux.from_diffusers(deeper, cfg)

  bfl_missing = {k: v for k, v in bfl.items() if k != "double_blocks.0.txt_mlp.2.bias"}
  with pytest.raises(flux.ConversionError, match=r"missing BFL tensor\(s\): 'double_blocks\.0\.txt_mlp\.2\.bias'"):
    flux.from_bfl(bfl_missing, cfg)
  with pytest.raises(flux.ConversionError, match=r"unused BFL tensor\(s\).*'guidance_in\.in_layer\.weight'"):
    flux.from_bfl({**bfl, "guidance_in.in_layer.weight": np.zeros((3, 256), np.float32)}, cfg)
  wrong = {**bfl, "single_blocks.2.linear2.weight": np.zeros((24, 5), np.float32)}
  with pytest.raises(flux.ConversionError, match=r"'single_blocks\.2\.linear2\.weight' has shape \(24, 5\)"):
    flux.from_bfl(wrong, cfg)


def test_safetensors_reader_matches_the_library(tmp_path):
  r = np.random.default_rng(0)
  tensors = {
    "a": torch.from_numpy(r.standard_normal((3, 4)).astype(np.float32)),
    "b": torch.from_numpy(r.standard_normal((5,)).astype(np.float32)).to(torch.bfloat16),
    "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    "d": torch.from_numpy(r.standard_normal((2, 2)).astype(np.float16)),
  }
  path = tmp_path / "x.safetensors"
  safetensors_torch.save_file(tensors, str(path), metadata={"format": "pt"})
  ours = flux.load_safetensors(path)
  assert set(ours) == set(tensors)
  for k, v in tensors.items():
    np.testing.assert_array_equal(np.asarray(ours[k], np.float64), v.to(torch.float64).numpy(), err_msg=k)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    flux.load_safetensors(tmp_path / "nope.safetensors")
  (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 16)
  with pytest.raises(flux.ConversionError, match="not a safetensors file"):
    flux.load_safetensors(tmp_path / "bad.safetensors")
  # A checkpoint cut short (an interrupted download) names the file and the first tensor it cannot hold.
  truncated = tmp_path / "truncated.safetensors"
  truncated.write_bytes(path.read_bytes()[:-8])
  with pytest.raises(flux.ConversionError, match=r"tensor '\w' has byte range .* truncated or corrupt"):
    flux.load_safetensors(truncated)


def test_compat_rejects_what_it_does_not_support():
  model = build("schnell-like")
  compat = flux.from_diffusers(model.state_dict(), model.config)
  kwargs = inputs(model, batch=1)
  with pytest.raises(ValueError, match="no guidance embedder"):
    compat(**kwargs, guidance=torch.tensor([3.5]))
  with pytest.raises(NotImplementedError, match="controlnet_block_samples"):
    compat(**kwargs, controlnet_block_samples=[torch.zeros(1)])
  with pytest.raises(ValueError, match="FluxCompat needs timestep"):
    compat(**{**kwargs, "timestep": None})


@pytest.mark.parity
def test_from_bfl_with_a_keyframes_config(tmp_path):
  """The path flux1-dev takes: a BFL file + configs/keyframes.py (here its tiny variant, same code path)."""
  from cinema_jax.config import load_config

  config = load_config("configs/keyframes.py:tiny")
  m = config.model
  torch.manual_seed(0)
  model = diffusers.FluxTransformer2DModel(
    in_channels=m.in_channels,
    num_layers=m.depth,
    num_single_layers=m.depth_single_blocks,
    attention_head_dim=m.hidden_size // m.num_heads,
    num_attention_heads=m.num_heads,
    joint_attention_dim=m.context_in_dim,
    pooled_projection_dim=m.vec_in_dim,
    guidance_embeds=m.guidance_embed,
    axes_dims_rope=tuple(m.axes_dim),
  ).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.3)
  path = tmp_path / "tiny.safetensors"
  safetensors_torch.save_file(
    {k: torch.from_numpy(v) for k, v in flux.diffusers_to_bfl(model.state_dict()).items()}, str(path)
  )
  compat = flux.from_bfl(path, config)
  assert compat.module.dtype == jnp.float32 and compat.module.global_mask == config.model.global_mask
  kwargs = inputs(model)
  assert rel_l2(compat(**kwargs), reference(model, kwargs)) < 1e-4
