"""Weight conversion: every key mapped both ways, the Wan 2.1 layout, safetensors files, the diffusers wrapper."""

import json

import jax
import numpy as np
import pytest
import torch
from diffusers import SkyReelsV2Transformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import save_file

from cinema_jax.convert import skyreels
from tests import test_video_dit

# The tiny diffusers config of the model tests, with the fps embedding and causal blocks the converter must map.
TINY = dict(test_video_dit.TINY, inject_sample_info=True, num_frame_per_block=2)

# The original Wan 2.1 / SkyReels-V2 names, written out independently of the converter's own tables.
WAN_NAMES = [
  ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
  ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
  ("condition_embedder.time_proj", "time_projection.1"),
  ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
  ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
  ("fps_projection.net.0.proj", "fps_projection.0"),
  ("fps_projection.net.2", "fps_projection.2"),
  ("attn1.to_out.0", "self_attn.o"),
  ("attn2.to_out.0", "cross_attn.o"),
  ("attn1.to_", "self_attn."),
  ("attn2.to_", "cross_attn."),
  ("attn1.", "self_attn."),
  ("attn2.", "cross_attn."),
  ("ffn.net.0.proj", "ffn.0"),
  ("ffn.net.2", "ffn.2"),
  (".norm2.", ".norm3."),
  (".scale_shift_table", ".modulation"),
  ("proj_out", "head.head"),
]


def to_wan(name: str) -> str:
  if name == "scale_shift_table":
    return "head.modulation"
  for old, new in WAN_NAMES:
    if old in name:
      name = name.replace(old, new)
  return name


@pytest.fixture(scope="module")
def model():
  torch.manual_seed(0)
  m = SkyReelsV2Transformer3DModel(**TINY).eval()
  with torch.no_grad():
    for p in m.parameters():
      p.copy_(torch.randn_like(p) * 0.3)
  return m


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 4, 4, 6, 8)).astype(np.float32)
  t = np.array([[0, 250, 600, 999]])
  ctx = rng.standard_normal((1, 5, 24)).astype(np.float32)
  return x, t, ctx


@pytest.fixture(scope="module")
def reference(model, inputs):
  x, t, ctx = inputs
  with torch.no_grad():
    return model(
      hidden_states=torch.from_numpy(x),
      timestep=torch.from_numpy(t),
      encoder_hidden_states=torch.from_numpy(ctx),
      enable_diffusion_forcing=True,
      fps=[1],
      return_dict=False,
    )[0].numpy()


def run(compat, inputs):
  x, t, ctx = inputs
  return np.asarray(
    compat(hidden_states=x, timestep=t, encoder_hidden_states=ctx, enable_diffusion_forcing=True, fps=[1])
  )


def rel_l2(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_every_key_maps_and_every_parameter_is_filled(model, inputs, reference):
  sd = model.state_dict()
  compat = skyreels.from_diffusers(sd, model.config)
  n_params = sum(np.asarray(v).size for v in jax.tree.leaves(compat.variables))
  assert n_params == sum(v.numel() for v in sd.values())  # nothing dropped, nothing invented
  assert rel_l2(run(compat, inputs), reference) < 1e-4
  unrolled = skyreels.from_diffusers(sd, model.config, scan_layers=False)
  assert set(unrolled.variables["params"]) >= {"blocks_0", "blocks_1"}
  assert rel_l2(run(unrolled, inputs), reference) < 1e-4


@pytest.mark.parametrize("layout", ["diffusers", "wan"])
def test_missing_unused_and_misshaped_keys_are_named(model, layout):
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  if layout == "wan":
    sd = {to_wan(k): v for k, v in sd.items()}
  q = "blocks.1.attn1.to_q.weight" if layout == "diffusers" else "blocks.1.self_attn.q.weight"
  missing = dict(sd)
  del missing[q]
  with pytest.raises(skyreels.ConversionError, match=r"lacks 'self_attn/q/kernel' for blocks \[1\]"):
    skyreels.from_diffusers(missing, model.config)
  top = "condition_embedder.time_proj.bias" if layout == "diffusers" else "time_projection.1.bias"
  missing_top = dict(sd)
  del missing_top[top]
  with pytest.raises(skyreels.ConversionError, match=r"parameter 'time_proj/lin/bias' of the model has no checkpoint"):
    skyreels.from_diffusers(missing_top, model.config)
  extra = dict(sd, **{"blocks.0.mystery.weight": np.zeros(3, np.float32)})
  with pytest.raises(skyreels.ConversionError, match=r"checkpoint key 'blocks.0.mystery.weight' .* is not used"):
    skyreels.from_diffusers(extra, model.config)
  deep = dict(sd, **{q.replace("blocks.1", "blocks.2"): sd[q]})
  with pytest.raises(skyreels.ConversionError, match=r"block 2 but the model has depth 2"):
    skyreels.from_diffusers(deep, model.config)
  bad = dict(sd, **{q: sd[q][:, :-1]})
  with pytest.raises(
    skyreels.ConversionError,
    match=r"key .blocks.1.(attn1.to_q|self_attn.q).weight. -> parameter .self_attn/q/kernel.: shape \(31, 32\) "
    r"!= model shape \(32, 32\)",
  ):
    skyreels.from_diffusers(bad, model.config)
  no_fps = dict(model.config, inject_sample_info=False)
  with pytest.raises(
    skyreels.ConversionError, match=r"checkpoint key '(fps_embedding|fps_projection)[^']*' is not used"
  ):
    skyreels.from_diffusers(sd, no_fps)


def test_wan_layout_is_what_diffusers_converts_and_gives_the_same_model(model, inputs, reference):
  sd = {k: v.clone() for k, v in model.state_dict().items()}
  wan = {"model.diffusion_model." + to_wan(k): v.clone() for k, v in sd.items()}
  assert "blocks.0.norm3.weight" in {k.removeprefix("model.diffusion_model.") for k in wan}
  # diffusers' own single-file converter maps this layout back to its names (fps keys are SkyReels-only additions).
  back = convert_wan_transformer_to_diffusers({k: v for k, v in wan.items() if "fps_" not in k})
  assert set(back) == {k for k in sd if not k.startswith("fps_")}
  for k, v in back.items():
    assert torch.equal(v, sd[k]), k
  compat = skyreels.from_diffusers(wan, model.config)
  assert rel_l2(run(compat, inputs), reference) < 1e-4


def test_safetensors_file_shards_and_bf16(model, inputs, reference, tmp_path):
  sd = {k: v.contiguous() for k, v in model.state_dict().items()}
  save_file(sd, tmp_path / "one.safetensors")
  (tmp_path / "config.json").write_text(json.dumps(dict(model.config)))
  one = skyreels.from_diffusers(tmp_path / "one.safetensors", tmp_path / "config.json")
  assert rel_l2(run(one, inputs), reference) < 1e-4

  shard_dir = tmp_path / "sharded"
  shard_dir.mkdir()
  keys = sorted(sd)
  parts = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2 :]}
  for name, ks in parts.items():
    save_file({k: sd[k] for k in ks}, shard_dir / name)
  index = {"weight_map": {k: name for name, ks in parts.items() for k in ks}}
  (shard_dir / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
  sharded = skyreels.from_diffusers(shard_dir, model.config)
  for a, b in zip(jax.tree.leaves(one.variables), jax.tree.leaves(sharded.variables), strict=True):
    np.testing.assert_array_equal(a, b)

  bf16 = {k: v.to(torch.bfloat16) for k, v in sd.items()}
  save_file(bf16, tmp_path / "bf16.safetensors")
  loaded = skyreels.load_state_dict(tmp_path / "bf16.safetensors")
  for k, v in bf16.items():
    np.testing.assert_array_equal(loaded[k].astype(np.float32), v.float().numpy())
  half = skyreels.from_diffusers(tmp_path / "bf16.safetensors", model.config)
  assert rel_l2(run(half, inputs), reference) < 5e-2  # bf16 weights, float32 compute


def test_compat_layout_and_errors(model, inputs, reference):
  compat = skyreels.from_diffusers(model.state_dict(), model.config)
  x, t, ctx = inputs
  (out,) = compat(x, t, ctx, enable_diffusion_forcing=True, fps=[1], return_dict=False)
  assert out.shape == x.shape  # [B, C, F, H, W]
  np.testing.assert_allclose(np.asarray(compat(x, t, ctx, enable_diffusion_forcing=True, fps=24)), out, rtol=1e-6)
  with pytest.raises(ValueError, match="need enable_diffusion_forcing=True"):
    compat(x, t, ctx, fps=[1])
  with pytest.raises(ValueError, match="pass fps"):
    compat(x, t, ctx, enable_diffusion_forcing=True)
  with pytest.raises(ValueError, match="I2V"):
    compat(x, t, ctx, encoder_hidden_states_image=ctx, enable_diffusion_forcing=True, fps=[1])
  with pytest.raises(skyreels.ConversionError, match="image_dim=1280"):
    skyreels.from_diffusers(model.state_dict(), dict(model.config, image_dim=1280))
  with pytest.raises(skyreels.ConversionError, match="cannot tell the checkpoint layout"):
    skyreels.convert_state_dict({"foo.weight": np.zeros(2)}, compat.module)
  assert compat.module.causal_block_size == 2 and compat.module.fps_embedding
