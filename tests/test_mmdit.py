"""Keyframe MM-DiT: hybrid masks by hand, segment isolation, per-keyframe modulation, scanned mixed stacks, remat,
logical axes and sharding (diffusers parity lives in test_convert_flux.py)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cinema_jax import parallel
from cinema_jax.models import keyframes_layout as kl
from cinema_jax.models.mmdit import DoubleStreamBlock, MMDiT, SingleStreamBlock, block_context
from cinema_jax.parallel import axes

TINY = dict(
  in_channels=8,
  vec_in_dim=6,
  context_in_dim=10,
  hidden_size=32,
  num_heads=2,
  depth=2,
  depth_single_blocks=2,
  axes_dim=(4, 6, 6),
  guidance_embed=True,
)


def make_model(**overrides) -> MMDiT:
  return MMDiT(**{**TINY, **overrides})


def jit_apply(model: MMDiT, **kwargs):
  """``model.apply`` jitted (eager op-by-op dispatch of a scanned model is far slower than one compile)."""
  return jax.jit(lambda v, *a, layout=None: model.apply(v, *a, layout=layout, **kwargs))


def random_params(model: MMDiT, seed: int = 0) -> tuple[dict, dict]:
  """(abstract boxed variables, random unboxed variables) without compiling an init: kernels ~ N(0, 1/fan_in),
  biases ~ N(0, 0.1^2), norm scales ~ 1 + N(0, 0.1^2), so that every parameter (norms included) matters."""
  args = (
    np.zeros((1, 4, model.in_channels), np.float32),
    np.zeros((1, 3, model.context_in_dim), np.float32),
    np.zeros((1, model.vec_in_dim), np.float32),
    np.zeros((1,), np.float32),
    np.zeros((4, 3), np.float32),
    np.zeros((3, 3), np.float32),
    np.ones((1,), np.float32) if model.guidance_embed else None,
  )
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *args))
  r = np.random.default_rng(seed)

  def fill(path, leaf):
    name = str(path[-1].key)
    if name == "kernel":
      return (r.standard_normal(leaf.shape) / np.sqrt(leaf.shape[-2])).astype(np.float32)
    if name == "scale":
      return (1.0 + 0.1 * r.standard_normal(leaf.shape)).astype(np.float32)
    return (0.1 * r.standard_normal(leaf.shape)).astype(np.float32)

  return boxed, jax.tree_util.tree_map_with_path(fill, nn.meta.unbox(boxed))


@pytest.fixture(scope="module")
def variables():
  boxed, params = random_params(make_model())
  return {"boxed": boxed, "params": params}


def rand(r, *shape):
  return r.standard_normal(shape).astype(np.float32)


# ------------------------------------------------------------------------------------------------ masks by hand


def test_hybrid_masks_by_hand_for_three_interleaved_keyframes():
  # K = 3 keyframes, 1 caption token and a 1 x 2 image each: [c0 c1 c2 ; i0 i0 i1 i1 i2 i2].
  layout, txt_ids, img_ids = kl.interleaved_layout([3], max_keyframes=3, caption_tokens=1, frame_shape=(1, 2))
  np.testing.assert_array_equal(layout.joint_segment()[0], [0, 1, 2, 0, 0, 1, 1, 2, 2])
  local = [
    [1, 0, 0, 1, 1, 0, 0, 0, 0],
    [0, 1, 0, 0, 0, 1, 1, 0, 0],
    [0, 0, 1, 0, 0, 0, 0, 1, 1],
    [1, 0, 0, 1, 1, 0, 0, 0, 0],
    [1, 0, 0, 1, 1, 0, 0, 0, 0],
    [0, 1, 0, 0, 0, 1, 1, 0, 0],
    [0, 1, 0, 0, 0, 1, 1, 0, 0],
    [0, 0, 1, 0, 0, 0, 0, 1, 1],
    [0, 0, 1, 0, 0, 0, 0, 1, 1],
  ]
  causal = [  # keyframe k sees keyframes <= k
    [1, 0, 0, 1, 1, 0, 0, 0, 0],
    [1, 1, 0, 1, 1, 1, 1, 0, 0],
    [1, 1, 1, 1, 1, 1, 1, 1, 1],
    [1, 0, 0, 1, 1, 0, 0, 0, 0],
    [1, 0, 0, 1, 1, 0, 0, 0, 0],
    [1, 1, 0, 1, 1, 1, 1, 0, 0],
    [1, 1, 0, 1, 1, 1, 1, 0, 0],
    [1, 1, 1, 1, 1, 1, 1, 1, 1],
    [1, 1, 1, 1, 1, 1, 1, 1, 1],
  ]
  blocks = kl.block_masks(layout, num_blocks=4, num_local_blocks=2, global_kind="block_causal")
  np.testing.assert_array_equal(blocks[0].to_dense()[0], np.array(local, bool))
  np.testing.assert_array_equal(blocks[1].to_dense()[0], np.array(local, bool))
  np.testing.assert_array_equal(blocks[2].to_dense()[0], np.array(causal, bool))
  np.testing.assert_array_equal(blocks[3].to_dense()[0], np.array(causal, bool))
  full = kl.block_masks(layout, num_blocks=2, num_local_blocks=0, global_kind="full")
  np.testing.assert_array_equal(full[0].to_dense()[0], np.ones((9, 9), bool))
  # Positions: caption k at (k, 0, 0), image k at (k, 0, col).
  np.testing.assert_array_equal(txt_ids[0], [[0, 0, 0], [1, 0, 0], [2, 0, 0]])
  np.testing.assert_array_equal(img_ids[0, :, 0], [0, 0, 1, 1, 2, 2])
  np.testing.assert_array_equal(img_ids[0, :, 2], [0, 1, 0, 1, 0, 1])


def test_masks_with_a_padded_keyframe_slot_by_hand():
  # The same sample using 2 of its 3 slots: slot 2's caption and image tokens are padding (-1).
  layout, _, _ = kl.interleaved_layout([2], max_keyframes=3, caption_tokens=1, frame_shape=(1, 2))
  np.testing.assert_array_equal(layout.joint_segment()[0], [0, 1, -1, 0, 0, 1, 1, -1, -1])
  local = np.array(
    [
      [1, 0, 0, 1, 1, 0, 0, 0, 0],
      [0, 1, 0, 0, 0, 1, 1, 0, 0],
      [0, 0, 0, 0, 0, 0, 0, 0, 0],
      [1, 0, 0, 1, 1, 0, 0, 0, 0],
      [1, 0, 0, 1, 1, 0, 0, 0, 0],
      [0, 1, 0, 0, 0, 1, 1, 0, 0],
      [0, 1, 0, 0, 0, 1, 1, 0, 0],
      [0, 0, 0, 0, 0, 0, 0, 0, 0],
      [0, 0, 0, 0, 0, 0, 0, 0, 0],
    ],
    bool,
  )
  full = np.array([[1, 1, 0, 1, 1, 1, 1, 0, 0]] * 2 + [[0] * 9] + [[1, 1, 0, 1, 1, 1, 1, 0, 0]] * 4 + [[0] * 9] * 2)
  seg = layout.joint_segment()
  np.testing.assert_array_equal(kl.local_mask(seg).to_dense()[0], local)
  np.testing.assert_array_equal(kl.global_mask(seg, "full").to_dense()[0], full.astype(bool))
  # Block summaries work on the same ids (concrete), for the block-sparse kernel.
  summary = kl.local_mask(seg).block_summary(3, 3)
  assert summary.shape == (1, 3, 3)


def test_block_masks_reject_bad_counts():
  layout, _, _ = kl.interleaved_layout([1], max_keyframes=1, caption_tokens=1, frame_shape=(1, 1))
  with pytest.raises(ValueError, match="num_local_blocks=5"):
    kl.block_masks(layout, num_blocks=4, num_local_blocks=5, global_kind="full")
  with pytest.raises(ValueError, match="unknown global mask 'nope'"):
    kl.global_mask(layout.joint_segment(), "nope")


# ------------------------------------------------------------------------------------------- segment isolation


def _frames_layout(shapes, caption_tokens, used=None):
  """A one-sample layout whose keyframe k has an image of shapes[k] tokens (sizes may differ, as with GoldenMem)."""
  used = len(shapes) if used is None else used
  txt_seg = np.repeat(np.arange(len(shapes)), caption_tokens)
  img_seg = np.concatenate([np.full(h * w, k) for k, (h, w) in enumerate(shapes)])
  txt_seg = np.where(txt_seg < used, txt_seg, -1)[None].astype(np.int32)
  img_seg = np.where(img_seg < used, img_seg, -1)[None].astype(np.int32)
  txt_ids = np.concatenate([kl.caption_positions(caption_tokens, frame=k) for k in range(len(shapes))])
  img_ids = np.concatenate([kl.frame_positions(h, w, frame=k) for k, (h, w) in enumerate(shapes)])
  uniform = len(set(shapes)) == 1
  n_img = shapes[0][0] * shapes[0][1]
  layout = kl.KeyframeLayout(txt_seg, img_seg, caption_tokens, n_img if uniform else None)
  return layout, txt_ids, img_ids


@pytest.mark.parametrize("shapes", [[(2, 2)] * 3, [(2, 3), (1, 2), (2, 2)]], ids=["uniform", "goldenmem-sizes"])
def test_all_local_model_isolates_each_keyframe(variables, shapes):
  """With every block local, keyframe k's output equals running caption_k + image_k alone (its own t and pooled)."""
  model = make_model(num_local_blocks=4)
  r = np.random.default_rng(1)
  t_len = 2
  layout, txt_ids, img_ids = _frames_layout(shapes, t_len)
  sizes = [h * w for h, w in shapes]
  img = rand(r, 1, sum(sizes), 8)
  txt = rand(r, 1, len(shapes) * t_len, 10)
  pooled = rand(r, 1, len(shapes), 6)
  times = np.array([[0.0, 0.4, 0.9]], np.float32)  # a clean memory keyframe beside noisy ones
  guidance = np.array([3.5], np.float32)
  apply = jit_apply(model)
  joint = apply(variables["params"], img, txt, pooled, times, img_ids, txt_ids, guidance, layout=layout)
  starts = np.cumsum([0] + sizes)
  for k, (h, w) in enumerate(shapes):
    alone_layout, alone_txt_ids, alone_img_ids = _frames_layout([(h, w)], t_len)
    alone = apply(
      variables["params"],
      img[:, starts[k] : starts[k + 1]],
      txt[:, k * t_len : (k + 1) * t_len],
      pooled[:, k : k + 1],
      times[:, k : k + 1],
      alone_img_ids,
      alone_txt_ids,
      guidance,
      layout=alone_layout,
    )
    np.testing.assert_allclose(joint[:, starts[k] : starts[k + 1]], alone, atol=2e-5, rtol=1e-5)


def test_global_blocks_mix_keyframes_and_block_causal_keeps_order(variables):
  r = np.random.default_rng(2)
  layout, txt_ids, img_ids = _frames_layout([(2, 2)] * 3, 2)
  args = [rand(r, 1, 12, 8), rand(r, 1, 6, 10), rand(r, 1, 3, 6), np.array([[0.0, 0.3, 0.8]], np.float32)]
  changed = [a.copy() for a in args]
  changed[0][:, 8:] += 1.0  # perturb keyframe 2's image

  def run(model, a):
    return np.asarray(
      jit_apply(model)(variables["params"], *a, img_ids, txt_ids, np.ones(1, np.float32), layout=layout)
    )

  causal = make_model(num_local_blocks=0, global_mask="block_causal")
  base, moved = run(causal, args), run(causal, changed)
  np.testing.assert_allclose(base[:, :8], moved[:, :8], atol=1e-6)  # keyframes 0 and 1 never see keyframe 2
  assert np.abs(base[:, 8:] - moved[:, 8:]).max() > 1e-3
  local_double = make_model()  # local double-stream blocks, then full attention
  assert np.abs(run(local_double, args)[:, :4] - run(local_double, changed)[:, :4]).max() > 1e-4


def test_padding_slots_do_not_change_real_keyframes(variables):
  """A sample padded to 3 slots equals the same 2 keyframes unpadded."""
  model = make_model(global_mask="full")
  r = np.random.default_rng(3)
  layout3, txt_ids3, img_ids3 = _frames_layout([(2, 2)] * 3, 2, used=2)
  layout2, txt_ids2, img_ids2 = _frames_layout([(2, 2)] * 2, 2)
  img, txt, pooled = rand(r, 1, 12, 8), rand(r, 1, 6, 10), rand(r, 1, 3, 6)
  times = np.array([[0.2, 0.7, 0.5]], np.float32)
  g = np.ones(1, np.float32)
  apply = jit_apply(model)
  padded = apply(variables["params"], img, txt, pooled, times, img_ids3, txt_ids3, g, layout=layout3)
  plain = apply(
    variables["params"], img[:, :8], txt[:, :4], pooled[:, :2], times[:, :2], img_ids2, txt_ids2, g, layout=layout2
  )
  np.testing.assert_allclose(padded[:, :8], plain, atol=2e-5, rtol=1e-5)
  assert np.isfinite(np.asarray(padded)).all()


def test_per_keyframe_times_equal_to_per_sample_time_match_the_sample_path(variables):
  model = make_model(num_local_blocks=1, global_mask="full")  # mixed double stack: one local, one global
  r = np.random.default_rng(4)
  layout, txt_ids, img_ids = _frames_layout([(2, 2), (1, 3)], 3)  # non-uniform images: per-token gathers
  img, txt, pooled = rand(r, 2, 7, 8), rand(r, 2, 6, 10), rand(r, 2, 6)
  layout = kl.KeyframeLayout(np.repeat(layout.txt_segment, 2, 0), np.repeat(layout.img_segment, 2, 0), 3, None)
  t = np.array([0.25, 0.75], np.float32)
  g = np.array([1.0, 4.0], np.float32)
  apply = jit_apply(model)
  per_sample = apply(variables["params"], img, txt, pooled, t, img_ids, txt_ids, g, layout=layout)
  per_keyframe = apply(
    variables["params"],
    img,
    txt,
    np.repeat(pooled[:, None], 2, 1),
    np.stack([t, t], 1),
    img_ids,
    txt_ids,
    g,
    layout=layout,
  )
  np.testing.assert_allclose(per_keyframe, per_sample, atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------------------- scanned stacks, mixed masks


@pytest.mark.parametrize("num_local", [1, 3], ids=["mixed-double", "mixed-single"])
def test_scanned_mixed_stack_equals_blocks_applied_one_by_one(variables, num_local):
  """A stack mixing local and global blocks (lax.cond on the scanned flag) equals applying each block in turn with
  its own mask, from the stacked parameters sliced per layer."""
  model = make_model(num_local_blocks=num_local, global_mask="block_causal")
  r = np.random.default_rng(5)
  layout, txt_ids, img_ids = _frames_layout([(2, 2), (1, 2), (2, 1)], 2)
  args = (rand(r, 1, 8, 8), rand(r, 1, 6, 10), rand(r, 1, 3, 6), np.array([[0.0, 0.5, 0.9]], np.float32))
  _, inter = jit_apply(model, mutable=["intermediates"])(
    variables["params"], *args, img_ids, txt_ids, np.ones(1, np.float32), layout=layout
  )
  inter = inter["intermediates"]
  ctx = block_context(inter["vec"][0], txt_ids, img_ids, layout, model.axes_dim, model.theta)
  params = variables["params"]["params"]
  common = dict(hidden_size=32, num_heads=2, mlp_ratio=4.0, global_mask="block_causal", txt_tokens_per_keyframe=2)
  txt, img = inter["double_blocks_in"][0]
  for i in range(2):
    kind = "local" if i < num_local else "global"
    block = DoubleStreamBlock(mask_kind=kind, **common)
    p = jax.tree.map(lambda x, i=i: x[i], params["double_blocks"])
    (txt, img), _ = jax.jit(block.apply)({"params": p}, (txt, img), None, ctx)
  np.testing.assert_allclose(img, inter["double_blocks_out"][0][1], atol=1e-5, rtol=1e-5)
  x = jnp.concatenate([txt, img], axis=1)
  for i in range(2):
    kind = "local" if 2 + i < num_local else "global"
    block = SingleStreamBlock(mask_kind=kind, **common)
    p = jax.tree.map(lambda x, i=i: x[i], params["single_blocks"])
    x, _ = jax.jit(block.apply)({"params": p}, x, None, ctx)
  np.testing.assert_allclose(x[:, 6:], inter["single_blocks_out"][0], atol=1e-5, rtol=1e-5)


def test_remat_policies_keep_the_gradients():
  small = dict(depth=1, depth_single_blocks=1)
  _, params = random_params(make_model(**small), seed=6)
  r = np.random.default_rng(6)
  layout, txt_ids, img_ids = _frames_layout([(2, 2)] * 2, 2)
  args = (rand(r, 1, 8, 8), rand(r, 1, 4, 10), rand(r, 1, 2, 6), np.array([[0.0, 0.6]], np.float32))

  def grads(model):
    def loss(p):
      out = model.apply(p, *args, img_ids, txt_ids, np.ones(1, np.float32), layout=layout)
      return jnp.mean(out**2)

    return jax.jit(jax.grad(loss))(params)

  # A named policy (keep only the q/k/v/attention tags, recompute the rest) leaves the gradients unchanged.
  ref = grads(make_model(**small))
  got = grads(make_model(remat_policy="qkv_attention", **small))
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------- parameters and their axes


def test_parameter_tree_is_bfl_shaped_with_logical_axes(variables):
  boxed = variables["boxed"]["params"]
  assert set(boxed) == {
    "img_in",
    "txt_in",
    "time_in",
    "vector_in",
    "guidance_in",
    "double_blocks",
    "single_blocks",
    "final_layer",
  }
  assert set(boxed["double_blocks"]) == {"img_mod", "img_attn", "img_mlp", "txt_mod", "txt_attn", "txt_mlp"}
  assert set(boxed["single_blocks"]) == {"linear1", "linear2", "norm", "modulation"}
  assert set(boxed["final_layer"]) == {"adaLN_modulation", "linear"}
  leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  for path, leaf in leaves:
    name = "/".join(str(p.key) for p in path)
    assert isinstance(leaf, nn.LogicallyPartitioned), name
    assert len(leaf.names) == leaf.value.ndim, name
    assert all(n in axes.ALL_AXES for n in leaf.names), (name, leaf.names)
    assert (leaf.names[0] == axes.LAYERS) == name.startswith(("double_blocks", "single_blocks")), (name, leaf.names)
  # BFL shapes: fused qkv [E, 3E], linear1 [E, 3E + 4E], linear2 [E + 4E, E] (stacked over 2 layers).
  assert boxed["double_blocks"]["img_attn"]["qkv"]["kernel"].value.shape == (2, 32, 96)
  assert boxed["single_blocks"]["linear1"]["kernel"].value.shape == (2, 32, 96 + 128)
  assert boxed["single_blocks"]["linear2"]["kernel"].value.shape == (2, 160, 32)


def test_sharded_forward_matches_single_device(variables):
  """Parameters placed over data 2 x fsdp 2 x tensor 2 by their logical axes; the sharded forward is the same."""
  model = make_model(num_local_blocks=1)
  r = np.random.default_rng(7)
  layout, txt_ids, img_ids = kl.interleaved_layout([2, 1], max_keyframes=2, caption_tokens=2, frame_shape=(2, 2))
  args = (rand(r, 2, 8, 8), rand(r, 2, 4, 10), rand(r, 2, 2, 6), np.array([[0.0, 0.5], [0.3, 0.9]], np.float32))
  g = np.array([1.0, 2.0], np.float32)
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "sequence": 1, "tensor": 2})
  rules = axes.DEFAULT_RULES

  boxed, params = random_params(model, seed=7)
  shardings = parallel.logical_shardings(boxed, mesh, rules)
  sharded = jax.device_put(params, shardings)
  spec = shardings["params"]["double_blocks"]["img_attn"]["qkv"]["kernel"].spec
  assert tuple(spec) == (None, "fsdp", "tensor")
  assert sharded["params"]["double_blocks"]["img_attn"]["qkv"]["kernel"].sharding.spec == spec
  with parallel.mesh_context(mesh, rules):
    out = jax.jit(lambda v: model.apply(v, *args, img_ids, txt_ids, g, layout=layout))(sharded)
  ref = jit_apply(model)(params, *args, img_ids, txt_ids, g, layout=layout)
  np.testing.assert_allclose(out, ref, atol=1e-5)


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_model_settings_and_inputs_are_named(variables):
  with pytest.raises(ValueError, match=r"axes_dim=\(4, 6, 8\) must sum to the head dim 16"):
    make_model(axes_dim=(4, 6, 8))
  with pytest.raises(ValueError, match="unknown global_mask 'causal'"):
    make_model(global_mask="causal")
  with pytest.raises(ValueError, match="unknown remat_policy 'some'"):
    make_model(remat_policy="some")
  with pytest.raises(ValueError, match="num_local_blocks=9"):
    make_model(num_local_blocks=9)
  r = np.random.default_rng(8)
  args = (rand(r, 1, 4, 8), rand(r, 1, 3, 10), rand(r, 1, 6))
  ids = (np.zeros((4, 3), np.float32), np.zeros((3, 3), np.float32))
  model = make_model()
  with pytest.raises(ValueError, match="need a KeyframeLayout"):
    model.apply(variables["params"], *args, np.zeros((1, 2), np.float32), *ids, np.ones(1, np.float32))
  with pytest.raises(ValueError, match=r"txt has 7 channels \(shape \(1, 3, 7\)\), the model takes 10"):
    model.apply(variables["params"], args[0], rand(r, 1, 3, 7), args[2], np.zeros(1, np.float32), *ids, None)
  with pytest.raises(ValueError, match="guidance_embed=True: pass guidance"):
    model.apply(variables["params"], *args, np.zeros((1,), np.float32), *ids)
  with pytest.raises(ValueError, match="num_keyframes"):
    kl.interleaved_layout([0], max_keyframes=2, caption_tokens=1, frame_shape=(1, 1))


def test_config_variants_build_the_documented_models():
  from cinema_jax.config import load_config

  dev = MMDiT.from_config(load_config("configs/keyframes.py:flux_dev"))
  assert (dev.depth, dev.depth_single_blocks, dev.hidden_size, dev.num_heads) == (19, 38, 3072, 24)
  assert dev.local_blocks == 19 and dev.dtype == jnp.bfloat16 and dev.param_dtype == jnp.float32
  big = MMDiT.from_config(load_config("configs/keyframes.py:flux_2p56b"))
  # 2.56 B parameters: count them abstractly.
  from cinema_jax.convert.flux import abstract_params

  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params(big)))
  assert abs(count - 2.56e9) < 0.01e9, count
  tiny = MMDiT.from_config(load_config("configs/keyframes.py:tiny"))
  assert dataclasses.asdict(tiny)["hidden_size"] == 64
