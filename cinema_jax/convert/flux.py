"""Flux weights -> MMDiT variables: diffusers ``FluxTransformer2DModel`` state dicts and BFL safetensors files.

Legend: S stacked layers (double or single blocks), E width, Q rows of a PyTorch ``Linear.weight`` [out, in].

Two layouts exist for one set of tensors:

* BFL (``flux1-dev.safetensors``): ``double_blocks.{i}.img_attn.qkv.weight`` etc. Our parameter tree has the same
  names (``double_blocks/img_attn/qkv/kernel``), with the block index moved into a leading LAYERS axis, kernels
  transposed to [in, out], MLP layers ``0`` / ``2`` named ``in_layer`` / ``out_layer`` and the final
  ``adaLN_modulation.1`` named ``adaLN_modulation/lin``.
* diffusers: split q/k/v projections, ``ff.net.0.proj`` ... and ``norm_out.linear`` whose two halves are
  (scale, shift) where BFL has (shift, scale).

The path is diffusers -> BFL (concatenations and the swap; ``diffusers_to_bfl``) -> parameters (renames, transposes,
stacking; ``bfl_to_variables``). Coverage is checked both ways at each step: a tensor no rule reads and a parameter no
tensor fills are errors naming the key. The generic pieces (``load_safetensors``, ``check_coverage``, ``to_numpy``,
``ConversionError``) live in ``convert/common.py`` and are re-exported here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cinema_jax.convert.common import ConversionError, check_coverage, load_safetensors, to_numpy
from cinema_jax.models.mmdit import MMDiT

BFL_PREFIXES = ("model.diffusion_model.",)  # prefixes some BFL-layout files carry (ComfyUI-style exports)
STACKED = ("double_blocks", "single_blocks")


# ------------------------------------------------------------------------------------------ diffusers <-> BFL

# (BFL name, diffusers names concatenated along the output rows); every entry has .weight and .bias.
_TOP = [
  ("img_in", ["x_embedder"]),
  ("txt_in", ["context_embedder"]),
  ("time_in.in_layer", ["time_text_embed.timestep_embedder.linear_1"]),
  ("time_in.out_layer", ["time_text_embed.timestep_embedder.linear_2"]),
  ("vector_in.in_layer", ["time_text_embed.text_embedder.linear_1"]),
  ("vector_in.out_layer", ["time_text_embed.text_embedder.linear_2"]),
  ("final_layer.linear", ["proj_out"]),
]
_GUIDANCE = [
  ("guidance_in.in_layer", ["time_text_embed.guidance_embedder.linear_1"]),
  ("guidance_in.out_layer", ["time_text_embed.guidance_embedder.linear_2"]),
]
_DOUBLE = [
  ("img_mod.lin", ["norm1.linear"]),
  ("txt_mod.lin", ["norm1_context.linear"]),
  ("img_attn.qkv", ["attn.to_q", "attn.to_k", "attn.to_v"]),
  ("txt_attn.qkv", ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]),
  ("img_attn.proj", ["attn.to_out.0"]),
  ("txt_attn.proj", ["attn.to_add_out"]),
  ("img_mlp.0", ["ff.net.0.proj"]),
  ("img_mlp.2", ["ff.net.2"]),
  ("txt_mlp.0", ["ff_context.net.0.proj"]),
  ("txt_mlp.2", ["ff_context.net.2"]),
]
_DOUBLE_NORMS = [
  ("img_attn.norm.query_norm.scale", "attn.norm_q.weight"),
  ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
  ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
  ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight"),
]
_SINGLE = [
  ("modulation.lin", ["norm.linear"]),
  ("linear1", ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]),
  ("linear2", ["proj_out"]),
]
_SINGLE_NORMS = [("norm.query_norm.scale", "attn.norm_q.weight"), ("norm.key_norm.scale", "attn.norm_k.weight")]
_FINAL_ADALN = ("final_layer.adaLN_modulation.1", "norm_out.linear")  # (shift, scale) <-> (scale, shift)


def _swap_halves(x: np.ndarray) -> np.ndarray:
  """(a, b) -> (b, a) along the output rows: BFL (shift, scale) <-> diffusers (scale, shift)."""
  first, second = np.split(x, 2, axis=0)
  return np.concatenate([second, first], axis=0)


def _linear_table(num_layers: int, num_single_layers: int, guidance: bool) -> list[tuple[str, list[str]]]:
  table = list(_TOP) + (list(_GUIDANCE) if guidance else [])
  for i in range(num_layers):
    table += [(f"double_blocks.{i}.{b}", [f"transformer_blocks.{i}.{d}" for d in ds]) for b, ds in _DOUBLE]
  for i in range(num_single_layers):
    table += [(f"single_blocks.{i}.{b}", [f"single_transformer_blocks.{i}.{d}" for d in ds]) for b, ds in _SINGLE]
  return table


def _norm_table(num_layers: int, num_single_layers: int) -> list[tuple[str, str]]:
  table = []
  for i in range(num_layers):
    table += [(f"double_blocks.{i}.{b}", f"transformer_blocks.{i}.{d}") for b, d in _DOUBLE_NORMS]
  for i in range(num_single_layers):
    table += [(f"single_blocks.{i}.{b}", f"single_transformer_blocks.{i}.{d}") for b, d in _SINGLE_NORMS]
  return table


def _count_blocks(keys, prefix: str) -> int:
  found = {int(m.group(1)) for k in keys if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))}
  return max(found) + 1 if found else 0


def diffusers_to_bfl(
  state_dict: Mapping[str, Any],
  *,
  num_layers: int | None = None,
  num_single_layers: int | None = None,
  guidance_embeds: bool | None = None,
) -> dict[str, np.ndarray]:
  """A diffusers FluxTransformer2DModel state dict renamed to the BFL layout (numpy, dtypes kept).

  Block counts and the guidance embedder default to what the keys show; a tensor no rule reads or a rule whose
  tensor is absent is a ``ConversionError`` naming the diffusers key.
  """
  keys = set(state_dict)
  num_layers = _count_blocks(keys, "transformer_blocks") if num_layers is None else num_layers
  num_single_layers = (
    _count_blocks(keys, "single_transformer_blocks") if num_single_layers is None else num_single_layers
  )
  if guidance_embeds is None:
    guidance_embeds = any(k.startswith("time_text_embed.guidance_embedder.") for k in keys)
  used: set[str] = set()

  def take(key: str) -> np.ndarray:
    used.add(key)
    return to_numpy(state_dict[key]) if key in state_dict else None

  out: dict[str, np.ndarray] = {}
  for bfl, parts in _linear_table(num_layers, num_single_layers, guidance_embeds):
    for leaf in ("weight", "bias"):
      tensors = [take(f"{p}.{leaf}") for p in parts]
      if all(t is not None for t in tensors):
        out[f"{bfl}.{leaf}"] = tensors[0] if len(tensors) == 1 else np.concatenate(tensors, axis=0)
  for bfl, diff in _norm_table(num_layers, num_single_layers):
    if (t := take(diff)) is not None:
      out[bfl] = t
  for leaf in ("weight", "bias"):
    if (t := take(f"{_FINAL_ADALN[1]}.{leaf}")) is not None:
      out[f"{_FINAL_ADALN[0]}.{leaf}"] = _swap_halves(t)
  check_coverage(keys, used, what="diffusers")
  return out


def bfl_to_diffusers(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The inverse of ``diffusers_to_bfl`` (splits fused q/k/v and linear1 by the diffusers widths)."""
  sd = {_strip_prefix(k): to_numpy(v) for k, v in state_dict.items()}
  num_layers, num_single = _count_blocks(sd, "double_blocks"), _count_blocks(sd, "single_blocks")
  guidance = any(k.startswith("guidance_in.") for k in sd)
  used: set[str] = set()
  out: dict[str, np.ndarray] = {}
  width = sd["img_in.weight"].shape[0] if "img_in.weight" in sd else None

  for bfl, parts in _linear_table(num_layers, num_single, guidance):
    for leaf in ("weight", "bias"):
      key = f"{bfl}.{leaf}"
      used.add(key)
      if key not in sd:
        continue
      t = sd[key]
      if len(parts) == 1:
        pieces = [t]
      elif len(parts) == 3:
        pieces = np.split(t, 3, axis=0)
      else:  # linear1: q, k, v of width E each, then the MLP rows
        pieces = [t[:width], t[width : 2 * width], t[2 * width : 3 * width], t[3 * width :]]
      out.update({f"{p}.{leaf}": piece for p, piece in zip(parts, pieces, strict=True)})
  for bfl, diff in _norm_table(num_layers, num_single):
    used.add(bfl)
    if bfl in sd:
      out[diff] = sd[bfl]
  for leaf in ("weight", "bias"):
    key = f"{_FINAL_ADALN[0]}.{leaf}"
    used.add(key)
    if key in sd:
      out[f"{_FINAL_ADALN[1]}.{leaf}"] = _swap_halves(sd[key])
  check_coverage(set(sd), used, what="BFL")
  return out


def _strip_prefix(key: str) -> str:
  for prefix in BFL_PREFIXES:
    if key.startswith(prefix):
      return key[len(prefix) :]
  return key


# ------------------------------------------------------------------------------------------ BFL <-> parameters


def bfl_name(path: tuple[str, ...], layer: int | None = None) -> str:
  """The BFL tensor name of parameter ``path`` (e.g. ('double_blocks', 'img_mlp', 'in_layer', 'kernel'), layer 3
  -> 'double_blocks.3.img_mlp.0.weight')."""
  parts = list(path[:-1])
  leaf = {"kernel": "weight", "bias": "bias", "scale": "scale"}[path[-1]]
  for i, part in enumerate(parts):
    if i and parts[i - 1] in ("img_mlp", "txt_mlp"):
      parts[i] = {"in_layer": "0", "out_layer": "2"}[part]
  if parts[-2:] == ["adaLN_modulation", "lin"]:
    parts[-1] = "1"
  if parts[0] in STACKED:
    parts.insert(1, str(layer))
  return ".".join(parts + [leaf])


def param_table(params_shape: Mapping[str, Any]) -> dict[str, tuple[tuple[str, ...], int | None, tuple[int, ...]]]:
  """BFL name -> (parameter path, layer index or None, per-layer shape in our [in, out] layout)."""
  table = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params_shape):
    names = tuple(str(p.key) for p in path)
    shape = tuple(leaf.shape)
    if names[0] in STACKED:
      for layer in range(shape[0]):
        table[bfl_name(names, layer)] = (names, layer, shape[1:])
    else:
      table[bfl_name(names)] = (names, None, shape)
  return table


def abstract_params(module: MMDiT) -> Any:
  """Shapes of the module's parameters (unboxed ShapeDtypeStructs), from ``jax.eval_shape`` on dummy inputs."""
  args = _dummy_inputs(module)
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))
  return nn.meta.unbox(variables)["params"]


def _dummy_inputs(module: MMDiT):
  f32 = np.float32
  return (
    np.zeros((1, 1, module.in_channels), f32),
    np.zeros((1, 1, module.context_in_dim), f32),
    np.zeros((1, module.vec_in_dim), f32),
    np.zeros((1,), f32),
    np.zeros((1, 3), f32),
    np.zeros((1, 3), f32),
    np.zeros((1,), f32) if module.guidance_embed else None,
  )


def bfl_to_variables(state_dict: Mapping[str, Any], module: MMDiT, *, param_dtype: Any = jnp.float32) -> dict[str, Any]:
  """``{"params": ...}`` for ``module`` from a BFL-layout state dict (numpy/torch values; prefixes stripped).

  Every tensor must fill exactly one parameter slice of the same shape, and every parameter slice must be filled.
  """
  sd = {_strip_prefix(k): v for k, v in state_dict.items()}
  shapes = abstract_params(module)
  table = param_table(shapes)
  check_coverage(set(sd), set(table), what="BFL")
  param_dtype = np.dtype(param_dtype)
  buffers: dict[tuple[str, ...], np.ndarray] = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
    buffers[tuple(str(p.key) for p in path)] = np.empty(leaf.shape, param_dtype)
  for name, (path, layer, shape) in table.items():
    t = to_numpy(sd[name])
    if path[-1] == "kernel":
      t = t.T  # PyTorch Linear [out, in] -> Dense [in, out]
    if tuple(t.shape) != shape:
      raise ConversionError(
        f"tensor {name!r} has shape {tuple(to_numpy(sd[name]).shape)}, but parameter {'/'.join(path)} needs "
        f"{shape if path[-1] != 'kernel' else shape[::-1]} (PyTorch layout)"
      )
    target = buffers[path] if layer is None else buffers[path][layer]
    target[...] = t.astype(param_dtype)
  params: dict[str, Any] = {}
  for path, value in buffers.items():
    node = params
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = jnp.asarray(value)
  return {"params": params}


# ---------------------------------------------------------------------------------------------- entry points


def model_config_from_diffusers(config: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """The ``model`` section of configs/keyframes.py for a diffusers FluxTransformer2DModel config."""
  if config.get("patch_size", 1) != 1:
    raise ConversionError(f"patch_size={config['patch_size']} is not Flux (patchify happens outside, patch_size=1)")
  heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
  return ml_collections.ConfigDict(
    dict(
      in_channels=config["in_channels"],
      out_channels=config.get("out_channels") or config["in_channels"],
      vec_in_dim=config["pooled_projection_dim"],
      context_in_dim=config["joint_attention_dim"],
      hidden_size=heads * head_dim,
      mlp_ratio=4.0,
      num_heads=heads,
      depth=config["num_layers"],
      depth_single_blocks=config["num_single_layers"],
      axes_dim=tuple(config["axes_dims_rope"]),
      theta=10000.0,
      qkv_bias=True,
      guidance_embed=bool(config["guidance_embeds"]),
    )
  )


def _module_from(config: Any, dtype: Any, overrides: Mapping[str, Any]) -> MMDiT:
  """The MMDiT for ``config``; ``dtype`` None keeps a full config's compute dtype (float32 otherwise)."""
  overrides = dict(overrides)
  if dtype is not None:
    overrides["dtype"] = jnp.dtype(dtype)
  if isinstance(config, ml_collections.ConfigDict) and "model" in config:
    return MMDiT.from_config(config, **overrides)
  if isinstance(config, ml_collections.ConfigDict):
    fields = config.to_dict()
  elif isinstance(config, Mapping) and "num_attention_heads" in config:
    fields = model_config_from_diffusers(config).to_dict()
  elif isinstance(config, Mapping):
    fields = dict(config)
  else:
    raise TypeError(
      f"config must be a diffusers FluxTransformer2DModel config, a configs/keyframes.py config or its model "
      f"section, got {type(config).__name__}"
    )
  fields["axes_dim"] = tuple(fields["axes_dim"])
  fields.update(overrides)
  return MMDiT(**fields)


class FluxCompat:
  """An MMDiT with converted weights, called like diffusers' ``FluxTransformer2DModel.forward``.

  ``compat(hidden_states=..., encoder_hidden_states=..., pooled_projections=..., timestep=..., img_ids=...,
  txt_ids=..., guidance=...)`` returns the predicted velocity [B, N, C_out] as a jax array (a 1-tuple with
  ``return_dict=False``, as diffusers' tuple form). Inputs may be torch tensors or arrays. ``.module`` and
  ``.variables`` are the Flax model and its parameters.
  """

  def __init__(self, module: MMDiT, variables: dict[str, Any]):
    self.module = module
    self.variables = variables
    self._apply = jax.jit(module.apply)

  def __call__(
    self,
    hidden_states: Any,
    encoder_hidden_states: Any = None,
    pooled_projections: Any = None,
    timestep: Any = None,
    img_ids: Any = None,
    txt_ids: Any = None,
    guidance: Any = None,
    joint_attention_kwargs: dict | None = None,
    controlnet_block_samples: Any = None,
    controlnet_single_block_samples: Any = None,
    return_dict: bool = True,
    controlnet_blocks_repeat: bool = False,
  ):
    for name, value in (
      ("controlnet_block_samples", controlnet_block_samples),
      ("controlnet_single_block_samples", controlnet_single_block_samples),
      ("joint_attention_kwargs", joint_attention_kwargs or None),
    ):
      if value is not None:
        raise NotImplementedError(f"FluxCompat does not support {name}")
    for name, value in (
      ("encoder_hidden_states", encoder_hidden_states),
      ("pooled_projections", pooled_projections),
      ("timestep", timestep),
      ("img_ids", img_ids),
      ("txt_ids", txt_ids),
    ):
      if value is None:
        raise ValueError(f"FluxCompat needs {name}")
    if guidance is not None and not self.module.guidance_embed:
      raise ValueError("guidance was given but this model has no guidance embedder (guidance_embeds=False)")

    def f32(x):
      x = to_numpy(x)
      return x.astype(np.float32) if x.dtype != np.float32 else x

    img = f32(hidden_states)
    batch = img.shape[0]
    ids = [f32(i) for i in (img_ids, txt_ids)]
    ids = [i[0] if i.ndim == 3 else i for i in ids]  # diffusers' deprecated batched ids: first sample
    t = np.broadcast_to(f32(timestep).reshape(-1), (batch,))
    g = None if guidance is None else np.broadcast_to(f32(guidance).reshape(-1), (batch,))
    out = self._apply(self.variables, img, f32(encoder_hidden_states), f32(pooled_projections), t, ids[0], ids[1], g)
    return out if return_dict else (out,)


def from_diffusers(
  state_dict: Mapping[str, Any],
  config: Any,
  *,
  dtype: Any = None,
  param_dtype: Any = jnp.float32,
  **module_overrides,
) -> FluxCompat:
  """A diffusers FluxTransformer2DModel state dict + its config (or a configs/keyframes.py config) -> FluxCompat.

  ``param_dtype`` float32 or bfloat16 (stored weights); ``dtype`` the compute dtype (None: a configs/keyframes.py
  config's ``dtype``, else float32); ``module_overrides`` set MMDiT fields such as ``num_local_blocks`` or
  ``remat_policy``.
  """
  module = _module_from(config, dtype, {"param_dtype": jnp.dtype(param_dtype), **module_overrides})
  bfl = diffusers_to_bfl(
    state_dict,
    num_layers=module.depth,
    num_single_layers=module.depth_single_blocks,
    guidance_embeds=module.guidance_embed,
  )
  return FluxCompat(module, bfl_to_variables(bfl, module, param_dtype=param_dtype))


def from_bfl(
  checkpoint: str | os.PathLike | Mapping[str, Any],
  config: Any,
  *,
  dtype: Any = None,
  param_dtype: Any = jnp.float32,
  **module_overrides,
) -> FluxCompat:
  """A BFL-layout checkpoint (a ``flux1-dev.safetensors`` path or a state dict) + config -> FluxCompat."""
  sd = load_safetensors(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
  module = _module_from(config, dtype, {"param_dtype": jnp.dtype(param_dtype), **module_overrides})
  return FluxCompat(module, bfl_to_variables(sd, module, param_dtype=param_dtype))
