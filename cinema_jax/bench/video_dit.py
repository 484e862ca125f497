"""``cinema-jax bench video-dit``: one forward of the diffusion-forcing video DiT, optionally beside diffusers.

Times our ``VideoDiT`` forward (jitted, per-frame timesteps [B, F]) at a config, and with ``--diffusers`` also the
diffusers ``SkyReelsV2Transformer3DModel`` (PyTorch eager) holding the same random weights, in the same process,
and reports our time as a ratio to it (performance.md: <= 0.8 x diffusers bidirectional at the 1.3B config; the
block-causal forward <= 0.8 x our bidirectional one). FLOPs are counted densely (matmuls + attention as if unmasked),
as performance.md does.

  CPU (default, tiny):   cinema-jax bench video-dit --diffusers
  GPU anchor (H100):     cinema-jax bench video-dit --config configs/video.py:skyreels_1p3b --frames 9 --height 68 \
                           --width 120 --dtype bfloat16 --diffusers [--causal-block-size 3]

Options: --config FILE[:variant] plus --config.a.b=v overrides; --frames/--height/--width (latent), --text-len,
--batch, --dtype (float32 | bfloat16), --causal-block-size (0 = bidirectional), --iters, --warmup, --seed.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from cinema_jax import config as config_lib


def dense_flops(model, batch: int, frames: int, rows: int, cols: int, text_len: int) -> float:
  """Forward FLOPs of the blocks (2 per multiply-add), attention counted as unmasked."""
  pt, ph, pw = model.patch_size
  tokens = (frames // pt) * (rows // ph) * (cols // pw)
  e, m = model.width, model.ffn_dim
  per_layer = 2 * tokens * (6 * e * e + 2 * e * m)  # self q,k,v,o + cross q,o + FFN
  per_layer += 2 * text_len * 2 * e * e  # cross k, v on the text
  per_layer += 4 * tokens * tokens * e + 4 * tokens * text_len * e  # QK^T and PV, self and cross
  return float(batch * model.depth * per_layer)


def diffusers_config(model) -> dict:
  """The diffusers SkyReelsV2Transformer3DModel config of a VideoDiT."""
  return dict(
    patch_size=tuple(model.patch_size),
    num_attention_heads=model.heads,
    attention_head_dim=model.width // model.heads,
    in_channels=model.in_channels,
    out_channels=model.out_channels,
    text_dim=model.text_dim,
    freq_dim=model.freq_dim,
    ffn_dim=model.ffn_dim,
    num_layers=model.depth,
    cross_attn_norm=model.cross_attn_norm,
    eps=model.eps,
    inject_sample_info=model.fps_embedding,
    num_frame_per_block=max(1, model.causal_block_size),
  )


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="cinema-jax bench video-dit", description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/video.py:tiny", help="config file[:variant]")
  parser.add_argument("--frames", type=int, default=None, help="latent frames (default: sampling.base_num_frames)")
  parser.add_argument("--height", type=int, default=None, help="latent rows (default: sampling.latent_height)")
  parser.add_argument("--width", type=int, default=None, help="latent cols (default: sampling.latent_width)")
  parser.add_argument("--text-len", type=int, default=None, help="text tokens (default: sampling.text_len)")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default: the config's dtype")
  parser.add_argument("--causal-block-size", type=int, default=None, help="0 = bidirectional (default: config)")
  parser.add_argument("--diffusers", action="store_true", help="also time diffusers with the same weights")
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--seed", type=int, default=0)
  args, overrides = parser.parse_known_args(argv)
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    parser.error(f"unrecognized arguments: {' '.join(bad)}")
  if args.diffusers:
    # PyTorch shares the accelerator: JAX must not grab most of its memory up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

  import jax
  import jax.numpy as jnp

  from cinema_jax.bench.timing import device_description, format_table, time_call
  from cinema_jax.convert import skyreels
  from cinema_jax.models import video_dit

  config = config_lib.load_config(args.config, overrides)
  s, m = config.sampling, config.model
  frames = args.frames or s.base_num_frames
  rows, cols = args.height or s.latent_height, args.width or s.latent_width
  text_len = args.text_len or s.text_len
  dtype = jnp.dtype(args.dtype or config.dtype)
  cbs = m.causal_block_size if args.causal_block_size is None else args.causal_block_size
  model = video_dit.from_config(
    m,
    dtype=dtype,
    param_dtype=jnp.float32,
    causal_block_size=cbs,
    attention=config.attention,
  )

  rng = np.random.default_rng(args.seed)
  x = rng.standard_normal((args.batch, frames, rows, cols, m.in_channels)).astype(np.float32)
  t = rng.integers(0, 1000, (args.batch, frames)).astype(np.float32)
  ctx = rng.standard_normal((args.batch, text_len, m.text_dim)).astype(np.float32)
  fps = np.ones((args.batch,), np.int32) if m.fps_embedding else None

  print(f"device: {device_description()}")
  tokens = frames * rows * cols // int(np.prod(m.patch_size))
  print(
    f"config: {args.config} {' '.join(overrides)} | {m.depth} layers, width {m.width}, {frames} latent frames x "
    f"{rows}x{cols} ({tokens} tokens) + {text_len} text, batch {args.batch}, {dtype.name}, "
    f"{'block-causal over ' + str(cbs) + ' frames' if cbs else 'bidirectional'}"
  )

  torch_model = None
  if args.diffusers:
    import torch
    from diffusers import SkyReelsV2Transformer3DModel

    torch.manual_seed(args.seed)
    torch_model = SkyReelsV2Transformer3DModel(**diffusers_config(model)).eval()
    compat = skyreels.from_diffusers(torch_model.state_dict(), torch_model.config, dtype=dtype)
    variables = compat.variables
  else:
    variables = jax.jit(model.init)(jax.random.key(args.seed), x, t, ctx, fps)
  if dtype == jnp.bfloat16:
    # Inference weights in bf16 (matrices only; modulation tables and norms stay float32, as diffusers keeps them).
    variables = jax.tree_util.tree_map_with_path(
      lambda p, v: v.astype(jnp.bfloat16) if str(getattr(p[-1], "key", "")) == "kernel" else v, variables
    )

  forward = jax.jit(model.apply)
  args_j = (variables, jnp.asarray(x, dtype), jnp.asarray(t), jnp.asarray(ctx, dtype), fps)
  ours = time_call(forward, *args_j, warmup=args.warmup, iters=args.iters)
  flops = dense_flops(model, args.batch, frames, rows, cols, text_len)
  table = [["ours (jax.jit)", ours * 1e3, flops / ours / 1e12]]

  if torch_model is not None:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = torch.bfloat16 if dtype == jnp.bfloat16 else torch.float32
    torch_model = torch_model.to(device=device, dtype=tdtype)
    if tdtype == torch.bfloat16:  # what from_pretrained(torch_dtype=bf16) does: these modules stay float32
      keep = tuple(torch_model._keep_in_fp32_modules)
      for name, module in torch_model.named_modules():
        if any(k in name.split(".") for k in keep):
          module.float()
      for name, param in torch_model.named_parameters():
        if any(k in name.split(".") for k in keep):
          param.data = param.data.float()
    tx = torch.from_numpy(x).permute(0, 4, 1, 2, 3).to(device, tdtype)
    tt = torch.from_numpy(t).long().to(device)
    tc = torch.from_numpy(ctx).to(device, tdtype)
    kwargs = dict(
      hidden_states=tx, timestep=tt, encoder_hidden_states=tc, enable_diffusion_forcing=True, return_dict=False
    )
    if m.fps_embedding:
      kwargs["fps"] = [1] * args.batch

    def run_torch():
      with torch.no_grad():
        out = torch_model(**kwargs)[0]
      if device == "cuda":
        torch.cuda.synchronize()
      return out

    for _ in range(args.warmup):
      run_torch()
    samples = []
    for _ in range(args.iters):
      start = time.perf_counter()
      ref = run_torch()
      samples.append(time.perf_counter() - start)
    theirs = float(np.median(samples))
    table[0].append(ours / theirs)
    table.append(["diffusers (PyTorch eager)", theirs * 1e3, flops / theirs / 1e12, 1.0])
    if args.batch == 1 or not m.fps_embedding:  # diffusers' fps path broadcasts only batch 1 with per-frame steps
      out = np.asarray(forward(*args_j), np.float32)
      ref_np = ref.float().permute(0, 2, 3, 4, 1).cpu().numpy()
      rel = np.linalg.norm(out - ref_np) / np.linalg.norm(ref_np)
      print(f"same weights, same inputs: relative L2 difference ours vs diffusers = {rel:.2e}")
  header = ["forward", "ms", "TFLOP/s (dense count)"] + (["time / diffusers"] if torch_model is not None else [])
  print(format_table(header, table))
  return 0
