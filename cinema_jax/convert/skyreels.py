"""SkyReels-V2 / Wan 2.1 transformer weights -> ``VideoDiT`` parameters, and a diffusers-compatible wrapper.

Two checkpoint layouts are read, told apart by their keys:

* diffusers ``SkyReelsV2Transformer3DModel`` (and ``WanTransformer3DModel`` without image conditioning):
  ``condition_embedder.*``, ``blocks.N.attn1.to_q``, ``blocks.N.norm2`` (cross-attention norm),
  ``scale_shift_table``, ``proj_out``, ``fps_projection.net.0.proj``;
* the original Wan 2.1 / SkyReels-V2 layout: ``time_embedding.0``, ``blocks.N.self_attn.q``, ``blocks.N.norm3``
  (cross-attention norm), ``blocks.N.modulation``, ``head.head``, ``head.modulation``, ``fps_projection.0``; an
  optional ``model.diffusion_model.`` prefix is stripped.

Every checkpoint key must be used and every parameter of the model filled, with the shape the model expects;
anything else is a ``ConversionError`` naming the key. PyTorch ``Linear.weight`` [out, in] becomes ``kernel``
[in, out]; the Conv3d patch embedding [E, C, pt, ph, pw] becomes a Dense kernel over patches flattened in
(pt, ph, pw, c) order (channels last, as ``VideoDiT`` patchifies).

``from_diffusers(state_dict, config)`` returns a ``SkyReelsCompat``: call it with the diffusers forward keyword
arguments (``hidden_states`` [B, C, F, H, W], ``timestep`` [B] or [B, F], ``encoder_hidden_states``,
``enable_diffusion_forcing``, ``fps``) and get the velocity in diffusers layout [B, C, F, H, W]; ``.module`` and
``.variables`` are the Flax model and its parameters for use without the wrapper.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cinema_jax.convert.common import ConversionError, load_safetensors, to_numpy
from cinema_jax.models.video_dit import VideoDiT, fps_class

PathLike = str | os.PathLike


def load_state_dict(source: PathLike | Iterable[PathLike] | Mapping[str, Any]) -> dict[str, np.ndarray]:
  """A state dict from a mapping (torch tensors or arrays), a ``.safetensors`` file, a list of shards, or a folder.

  A folder is read through its ``*.safetensors.index.json`` weight map when there is one, else every
  ``*.safetensors`` file in it. Torch tensors are converted on the host (bf16 stays bf16, as ``ml_dtypes.bfloat16``).
  """
  if isinstance(source, Mapping):
    return {k: to_numpy(v) for k, v in source.items()}
  if isinstance(source, (str, os.PathLike)):
    path = pathlib.Path(source)
    if path.is_dir():
      indexes = sorted(path.glob("*.safetensors.index.json"))
      if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        files = [path / f for f in sorted(set(weight_map.values()))]
      else:
        files = sorted(path.glob("*.safetensors"))
      if not files:
        raise ConversionError(f"no .safetensors files in {path}")
    elif path.is_file():
      files = [path]
    else:
      raise ConversionError(f"checkpoint path {path} does not exist")
  else:
    files = [pathlib.Path(p) for p in source]
  merged: dict[str, np.ndarray] = {}
  for f in files:
    for k, v in load_safetensors(f).items():
      if k in merged:
        raise ConversionError(f"tensor {k!r} appears in more than one shard (again in {f})")
      merged[k] = v
  return merged


# ----------------------------------------------------------------------------------------------------------------
# configs


def model_from_config(config: Mapping[str, Any] | ml_collections.ConfigDict | PathLike, **module_kwargs) -> VideoDiT:
  """A ``VideoDiT`` from a diffusers transformer config (dict or config.json path) or a ``configs/video.py`` model.

  ``module_kwargs`` (dtype, param_dtype, scan_layers, remat, attention_implementation) pass to the module.
  Image conditioning (``image_dim``, ``added_kv_proj_dim``, ``pos_embed_seq_len``) and QK norms other than
  ``rms_norm_across_heads`` are not part of the diffusion-forcing models and are refused.
  """
  if isinstance(config, (str, os.PathLike)):
    config = json.loads(pathlib.Path(config).read_text())
  if isinstance(config, ml_collections.ConfigDict) or "width" in config:
    from cinema_jax.models.video_dit import from_config

    return from_config(ml_collections.ConfigDict(dict(config)), **module_kwargs)
  cfg = dict(config)
  for key in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
    if cfg.get(key) is not None:
      raise ConversionError(f"config {key}={cfg[key]!r}: image-conditioned (I2V) models are not supported")
  if cfg.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
    raise ConversionError(f"config qk_norm={cfg['qk_norm']!r}: only 'rms_norm_across_heads' is supported")
  heads = int(cfg.get("num_attention_heads", 16))
  head_dim = int(cfg.get("attention_head_dim", 128))
  nfpb = int(cfg.get("num_frame_per_block", 1))
  in_channels = int(cfg.get("in_channels", 16))
  fields = dict(
    width=heads * head_dim,
    heads=heads,
    depth=int(cfg.get("num_layers", 32)),
    ffn_dim=int(cfg.get("ffn_dim", 8192)),
    in_channels=in_channels,
    out_channels=int(cfg.get("out_channels") or in_channels),
    patch_size=tuple(int(p) for p in cfg.get("patch_size", (1, 2, 2))),
    text_dim=int(cfg.get("text_dim", 4096)),
    freq_dim=int(cfg.get("freq_dim", 256)),
    eps=float(cfg.get("eps", 1e-6)),
    cross_attn_norm=bool(cfg.get("cross_attn_norm", True)),
    fps_embedding=bool(cfg.get("inject_sample_info", False)),
    # diffusers turns its block-causal mask on only for more than one frame per block.
    causal_block_size=nfpb if nfpb > 1 else 0,
  )
  fields.update(module_kwargs)
  return VideoDiT(**fields)


# ----------------------------------------------------------------------------------------------------------------
# key mapping

Transform = Callable[[np.ndarray], np.ndarray]


def _linear(w: np.ndarray) -> np.ndarray:
  return np.asarray(w).T


def _same(w: np.ndarray) -> np.ndarray:
  return np.asarray(w)


def _patch_conv(w: np.ndarray) -> np.ndarray:  # [E, C, pt, ph, pw] -> [(pt ph pw c), E]
  w = np.asarray(w)
  return w.transpose(2, 3, 4, 1, 0).reshape(-1, w.shape[0])


def _table(w: np.ndarray) -> np.ndarray:  # [1, K, E] -> [K, E]
  w = np.asarray(w)
  return w.reshape(w.shape[-2], w.shape[-1])


# (our path below the block, transform) for each per-block checkpoint name; "{i}" is the block index.
_DIFFUSERS_BLOCK = {
  "attn1.to_q.weight": ("self_attn/q/kernel", _linear),
  "attn1.to_q.bias": ("self_attn/q/bias", _same),
  "attn1.to_k.weight": ("self_attn/k/kernel", _linear),
  "attn1.to_k.bias": ("self_attn/k/bias", _same),
  "attn1.to_v.weight": ("self_attn/v/kernel", _linear),
  "attn1.to_v.bias": ("self_attn/v/bias", _same),
  "attn1.to_out.0.weight": ("self_attn/out/kernel", _linear),
  "attn1.to_out.0.bias": ("self_attn/out/bias", _same),
  "attn1.norm_q.weight": ("self_attn/q_norm/scale", _same),
  "attn1.norm_k.weight": ("self_attn/k_norm/scale", _same),
  "attn2.to_q.weight": ("cross_attn/q/kernel", _linear),
  "attn2.to_q.bias": ("cross_attn/q/bias", _same),
  "attn2.to_k.weight": ("cross_attn/k/kernel", _linear),
  "attn2.to_k.bias": ("cross_attn/k/bias", _same),
  "attn2.to_v.weight": ("cross_attn/v/kernel", _linear),
  "attn2.to_v.bias": ("cross_attn/v/bias", _same),
  "attn2.to_out.0.weight": ("cross_attn/out/kernel", _linear),
  "attn2.to_out.0.bias": ("cross_attn/out/bias", _same),
  "attn2.norm_q.weight": ("cross_attn/q_norm/scale", _same),
  "attn2.norm_k.weight": ("cross_attn/k_norm/scale", _same),
  "norm2.weight": ("cross_norm/scale", _same),
  "norm2.bias": ("cross_norm/bias", _same),
  "ffn.net.0.proj.weight": ("ffn/in_layer/kernel", _linear),
  "ffn.net.0.proj.bias": ("ffn/in_layer/bias", _same),
  "ffn.net.2.weight": ("ffn/out_layer/kernel", _linear),
  "ffn.net.2.bias": ("ffn/out_layer/bias", _same),
  "scale_shift_table": ("modulation", _table),
}

_DIFFUSERS_TOP = {
  "patch_embedding.weight": ("patch_embed/kernel", _patch_conv),
  "patch_embedding.bias": ("patch_embed/bias", _same),
  "condition_embedder.time_embedder.linear_1.weight": ("time_embed/in_layer/kernel", _linear),
  "condition_embedder.time_embedder.linear_1.bias": ("time_embed/in_layer/bias", _same),
  "condition_embedder.time_embedder.linear_2.weight": ("time_embed/out_layer/kernel", _linear),
  "condition_embedder.time_embedder.linear_2.bias": ("time_embed/out_layer/bias", _same),
  "condition_embedder.time_proj.weight": ("time_proj/lin/kernel", _linear),
  "condition_embedder.time_proj.bias": ("time_proj/lin/bias", _same),
  "condition_embedder.text_embedder.linear_1.weight": ("text_embed/in_layer/kernel", _linear),
  "condition_embedder.text_embedder.linear_1.bias": ("text_embed/in_layer/bias", _same),
  "condition_embedder.text_embedder.linear_2.weight": ("text_embed/out_layer/kernel", _linear),
  "condition_embedder.text_embedder.linear_2.bias": ("text_embed/out_layer/bias", _same),
  "fps_embedding.weight": ("fps_embed/embedding", _same),
  "fps_projection.net.0.proj.weight": ("fps_proj_in/kernel", _linear),
  "fps_projection.net.0.proj.bias": ("fps_proj_in/bias", _same),
  "fps_projection.net.2.weight": ("fps_proj_out/kernel", _linear),
  "fps_projection.net.2.bias": ("fps_proj_out/bias", _same),
  "scale_shift_table": ("head_modulation", _table),
  "proj_out.weight": ("head/kernel", _linear),
  "proj_out.bias": ("head/bias", _same),
}

# The original Wan 2.1 / SkyReels-V2 names of the same tensors (Wan calls the cross-attention norm norm3).
_WAN_BLOCK_NAMES = {
  "attn1.to_q": "self_attn.q",
  "attn1.to_k": "self_attn.k",
  "attn1.to_v": "self_attn.v",
  "attn1.to_out.0": "self_attn.o",
  "attn1.norm_q": "self_attn.norm_q",
  "attn1.norm_k": "self_attn.norm_k",
  "attn2.to_q": "cross_attn.q",
  "attn2.to_k": "cross_attn.k",
  "attn2.to_v": "cross_attn.v",
  "attn2.to_out.0": "cross_attn.o",
  "attn2.norm_q": "cross_attn.norm_q",
  "attn2.norm_k": "cross_attn.norm_k",
  "norm2": "norm3",
  "ffn.net.0.proj": "ffn.0",
  "ffn.net.2": "ffn.2",
  "scale_shift_table": "modulation",
}
_WAN_TOP_NAMES = {
  "condition_embedder.time_embedder.linear_1": "time_embedding.0",
  "condition_embedder.time_embedder.linear_2": "time_embedding.2",
  "condition_embedder.time_proj": "time_projection.1",
  "condition_embedder.text_embedder.linear_1": "text_embedding.0",
  "condition_embedder.text_embedder.linear_2": "text_embedding.2",
  "fps_projection.net.0.proj": "fps_projection.0",
  "fps_projection.net.2": "fps_projection.2",
  "scale_shift_table": "head.modulation",
  "proj_out": "head.head",
}


def _rename(name: str, table: Mapping[str, str]) -> str:
  for old, new in table.items():
    if name == old or name.startswith(old + "."):
      return new + name[len(old) :]
  return name


def _wan_tables() -> tuple[dict, dict]:
  block = {_rename(k, _WAN_BLOCK_NAMES): v for k, v in _DIFFUSERS_BLOCK.items()}
  top = {_rename(k, _WAN_TOP_NAMES): v for k, v in _DIFFUSERS_TOP.items()}
  return block, top


def detect_layout(keys: Iterable[str]) -> str:
  """'diffusers' or 'wan' (original Wan 2.1 / SkyReels-V2) from the checkpoint's key names."""
  keys = list(keys)
  if any(".attn1." in k or k.startswith("condition_embedder.") for k in keys):
    return "diffusers"
  if any(".self_attn." in k or k.startswith(("time_embedding.", "head.")) for k in keys):
    return "wan"
  raise ConversionError(f"cannot tell the checkpoint layout from its keys (first few: {sorted(keys)[:5]})")


_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def convert_state_dict(state_dict: Mapping[str, np.ndarray], module: VideoDiT) -> dict:
  """Checkpoint tensors -> the module's ``params`` tree (numpy, ``param_dtype``), every key accounted for."""
  state_dict = {k.removeprefix("model.diffusion_model."): v for k, v in state_dict.items()}
  layout = detect_layout(state_dict)
  block_table, top_table = (_DIFFUSERS_BLOCK, _DIFFUSERS_TOP) if layout == "diffusers" else _wan_tables()

  expected = _abstract_params(module)  # flat {path: ShapeDtypeStruct}
  depth = module.depth
  filled: dict[str, Any] = {}
  source: dict[str, str] = {}  # our path -> checkpoint key, for error messages
  per_block: dict[str, dict[int, np.ndarray]] = {}
  for key, value in state_dict.items():
    match = _BLOCK_KEY.match(key)
    if match and match.group(2) in block_table:
      index = int(match.group(1))
      if index >= depth:
        raise ConversionError(f"checkpoint key {key!r}: block {index} but the model has depth {depth}")
      path, transform = block_table[match.group(2)]
      per_block.setdefault(path, {})[index] = transform(value)
      source[path] = f"blocks.N.{match.group(2)}"
    elif key in top_table:
      path, transform = top_table[key]
      filled[path] = transform(value)
      source[path] = key
    else:
      raise ConversionError(f"checkpoint key {key!r} ({layout} layout) is not used by the model")

  for path, slices in per_block.items():
    missing = sorted(set(range(depth)) - set(slices))
    if missing:
      raise ConversionError(f"checkpoint lacks {path!r} for blocks {missing}")
    stacked_path = f"blocks/{path}" if module.scan_layers else f"blocks_0/{path}"
    if stacked_path in expected:  # check each block's tensor before stacking, naming its own key
      want = expected[stacked_path].shape[1:] if module.scan_layers else expected[stacked_path].shape
      for i in range(depth):
        if tuple(slices[i].shape) != tuple(want):
          key = source[path].replace(".N.", f".{i}.")
          raise ConversionError(
            f"checkpoint key {key!r} -> parameter {path!r}: shape {tuple(slices[i].shape)} != model shape {tuple(want)}"
          )
    if module.scan_layers:
      filled[f"blocks/{path}"] = np.stack([slices[i] for i in range(depth)])
      source[f"blocks/{path}"] = source[path]
    else:
      for i in range(depth):
        filled[f"blocks_{i}/{path}"] = slices[i]
        source[f"blocks_{i}/{path}"] = source[path].replace(".N.", f".{i}.")

  for path, spec in expected.items():
    if path not in filled:
      raise ConversionError(f"parameter {path!r} of the model has no checkpoint key ({layout} layout)")
    if tuple(filled[path].shape) != tuple(spec.shape):
      raise ConversionError(
        f"checkpoint key {source[path]!r} -> parameter {path!r}: shape {tuple(filled[path].shape)} != model shape "
        f"{tuple(spec.shape)}"
      )
  for path in filled:
    if path not in expected:
      raise ConversionError(
        f"checkpoint key {source[path]!r} is not used by the model (its config has no {path!r}; check the config, "
        "e.g. inject_sample_info for fps keys)"
      )

  tree: dict = {}
  for path, value in filled.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = np.asarray(value, dtype=np.float32).astype(expected[path].dtype)
  return tree


def _example_inputs(module: VideoDiT):
  pt, ph, pw = module.patch_size
  frames = max(1, module.causal_block_size)  # the smallest clip a block-causal model accepts
  x = jax.ShapeDtypeStruct((1, frames * pt, ph, pw, module.in_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1, frames), jnp.float32)
  ctx = jax.ShapeDtypeStruct((1, 1, module.text_dim), jnp.float32)
  fps = jax.ShapeDtypeStruct((1,), jnp.int32) if module.fps_embedding else None
  return x, t, ctx, fps


def _abstract_params(module: VideoDiT) -> dict[str, jax.ShapeDtypeStruct]:
  x, t, ctx, fps = _example_inputs(module)
  shapes = jax.eval_shape(lambda k, *a: module.init(k, *a), jax.random.key(0), x, t, ctx, fps)
  shapes = jax.tree.map(lambda v: v.value if hasattr(v, "value") else v, shapes, is_leaf=lambda v: hasattr(v, "value"))
  flat = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(shapes["params"]):
    flat["/".join(str(getattr(p, "key", p)) for p in path)] = leaf
  return flat


# ----------------------------------------------------------------------------------------------------------------
# the diffusers-compatible wrapper


class SkyReelsCompat:
  """Calls a converted ``VideoDiT`` with diffusers ``SkyReelsV2Transformer3DModel.forward`` arguments.

  Inputs and the output are in diffusers layout ([B, C, F, H, W]); numpy arrays, jax arrays and torch tensors are
  accepted. ``fps`` is the fps class list/array diffusers takes (0 = 16 fps); a plain frame rate (e.g. 24) is mapped
  to its class. Per-frame timesteps [B, F] are used as such (the diffusion-forcing path); [B] gives one timestep per
  video. Returns the array (``return_dict=False``: a 1-tuple, as diffusers).
  """

  def __init__(self, module: VideoDiT, variables: dict):
    self.module = module
    self.variables = variables
    self._apply = jax.jit(module.apply)

  def __call__(
    self,
    hidden_states,
    timestep,
    encoder_hidden_states,
    encoder_hidden_states_image=None,
    enable_diffusion_forcing: bool = False,
    fps=None,
    return_dict: bool = True,
    attention_kwargs=None,
  ):
    if encoder_hidden_states_image is not None:
      raise ValueError("encoder_hidden_states_image: image-conditioned (I2V) cross-attention is not supported")
    if attention_kwargs:
      raise ValueError(f"attention_kwargs {sorted(attention_kwargs)} are not supported (no LoRA scaling here)")
    x = jnp.asarray(to_numpy(hidden_states))
    t = jnp.asarray(to_numpy(timestep), jnp.float32)
    if t.ndim == 0:
      t = jnp.broadcast_to(t, (x.shape[0],))
    if t.ndim == 2 and not enable_diffusion_forcing:
      raise ValueError("per-frame timesteps [B, F] need enable_diffusion_forcing=True (as in diffusers)")
    ctx = jnp.asarray(to_numpy(encoder_hidden_states), self.module.dtype)
    fps_ids = None
    if self.module.fps_embedding:
      if fps is None:
        raise ValueError("this model has an fps embedding: pass fps")
      fps_ids = np.asarray(to_numpy(fps)).reshape(-1).astype(np.int32)
      fps_ids = np.array([v if v in (0, 1) else fps_class(v) for v in fps_ids], np.int32)
      fps_ids = np.broadcast_to(fps_ids, (x.shape[0],))
    latents = jnp.transpose(x, (0, 2, 3, 4, 1)).astype(self.module.dtype)  # [b, f, h, w, c]
    out = self._apply(self.variables, latents, t, ctx, fps_ids)
    out = jnp.transpose(out, (0, 4, 1, 2, 3))  # [b, c, f, h, w]
    return out if return_dict else (out,)


def from_diffusers(
  state_dict: Mapping[str, Any] | PathLike | Iterable[PathLike],
  config: Mapping[str, Any] | ml_collections.ConfigDict | PathLike,
  **module_kwargs,
) -> SkyReelsCompat:
  """Converts a SkyReels-V2 / Wan 2.1 transformer checkpoint; see the module docstring.

  ``state_dict``: a mapping of tensors, a ``.safetensors`` path, a list of shards or a checkpoint folder.
  ``config``: the diffusers transformer config (dict or ``config.json``) or a ``configs/video.py`` model section.
  ``module_kwargs``: dtype, param_dtype, scan_layers, remat, attention_implementation for the ``VideoDiT``.
  """
  module = model_from_config(config, **module_kwargs)
  params = convert_state_dict(load_state_dict(state_dict), module)
  variables = {"params": jax.tree.map(jnp.asarray, params)}
  return SkyReelsCompat(module, variables)
