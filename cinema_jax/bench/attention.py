"""``cinema-jax bench attention``: the block-sparse Pallas kernel beside cuDNN and XLA on the masks of the models.

Letters: B batch, L length, H heads, D head dim.

Masks (at every length L): ``dense`` (no mask), ``causal`` (token-causal), ``8-segment`` (block-diagonal, 8 equal
segments: 12.5% dense), ``frame-causal`` (diffusion forcing: 16 frames of L/16 tokens, block-causal over frames) and
``goldenmem`` (the newest keyframe being generated after its memory frames packed at Fibonacci-pyramid sizes,
oldest first, block-causal over frames).

Implementations, all in one process on the same inputs: ``pallas`` (ours: ``dot_product_attention(...,
implementation="pallas")``, tile lists built once on the host; on Hopper the Mosaic GPU forward), ``pallas-triton``
(ours, the Triton flavour: the fallback for older GPUs, GPU only), ``cudnn`` (``jax.nn.dot_product_attention(
implementation="cudnn")``: ``is_causal`` for the causal mask, the mask given densely otherwise, as an application
would), ``xla`` (``jax.nn.dot_product_attention(implementation="xla")`` with the dense mask) and ``splash`` (JAX's
block-sparse TPU kernel with the same mask: the TPU reference, see ``bench.splash``; TPU only, interpreted on the
CPU). Each is timed forward and forward+backward (``jax.grad`` of the float32 sum w.r.t. q, k, v), median of
``--iters`` runs after warm-up, each call waited for. Two more figures tell the host's share of a short call from the
device's: ``--queue N`` times N calls queued back to back, and ``--device-time`` reads what the device itself spent
per call, per kernel, from a profiler trace; the header gives a trivial jitted call's time, the floor under every
per-call figure. Each block-sparse forward (ours, splash) is also checked: its output on the first two heads against
XLA's in float32 with the same mask (``err vs XLA``, relative), marked WRONG above the dtype's tolerance (2e-2 for
16-bit inputs, 1e-4 for float32), which also makes the exit status 1.

Figures are reported the way the peer anchor scripts report them: B=1, H=24, D=128, bf16; FLOPs = 4 B L^2 H D x
density (useful work only) for the forward and 3.5 x that for forward+backward; and every time also as a ratio to
cuDNN dense measured in the same run at the same length and direction (XLA dense where cuDNN is unavailable, e.g. on
TPU, or on the CPU, where ``--quick`` runs the kernels in interpret mode at tiny sizes as a smoke test); where splash
ran, ours is also given as a ratio to splash with the same mask.

  cinema-jax bench attention                       # L = 4096 and 16384 on the GPU/TPU
  cinema-jax bench attention --lengths 4096 --json out.json
  cinema-jax bench attention --quick               # CPU smoke test (interpret mode)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import pathlib
import sys
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cinema_jax.attention import dot_product_attention, masks
from cinema_jax.bench import timing
from cinema_jax.bench.splash import splash_attention_fn
from cinema_jax.files import write_atomic

MASK_NAMES = ("dense", "causal", "8-segment", "frame-causal", "goldenmem")
IMPLEMENTATIONS = ("pallas", "pallas-triton", "cudnn", "xla", "splash")
PHI = (1.0 + math.sqrt(5.0)) / 2.0


def goldenmem_frame_ids(length: int) -> np.ndarray:
  """Frame index of every token of a GoldenMem context of ``length`` tokens, oldest memory frame first.

  Memory frame k (k = 1 newest) is a square of side ``floor(base / phi^k)`` tokens with ``base = sqrt(L / 1.6)``
  (the context costs at most phi ~ 1.6 frames); the frame being generated takes the remaining tokens and comes last.
  """
  base = max(int(math.sqrt(length / 1.6)), 1)
  sides = []
  for k in range(1, 64):
    side = int(math.floor(base / PHI**k))
    if side < 1:
      break
    sides.append(side)
  sizes = [s * s for s in reversed(sides)]  # oldest (smallest) first
  while sizes and sum(sizes) >= length:
    sizes.pop(0)
  sizes.append(length - sum(sizes))  # the frame being generated
  return np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)


def benchmark_mask(name: str, length: int) -> masks.Mask | None:
  """The mask called ``name`` at ``length`` tokens (None = dense)."""
  if name == "dense":
    return None
  if name == "causal":
    return masks.BlockCausalMask(np.arange(length, dtype=np.int32))
  if name == "8-segment":
    return masks.SegmentMask(np.arange(length, dtype=np.int32) * 8 // length)
  if name == "frame-causal":
    return masks.BlockCausalMask(np.arange(length, dtype=np.int32) * 16 // length)
  if name == "goldenmem":
    return masks.BlockCausalMask(goldenmem_frame_ids(length))
  raise ValueError(f"unknown benchmark mask {name!r}; choose one of {MASK_NAMES}")


def attention_flops(length: int, heads: int, head_dim: int, batch: int, density: float, backward: bool) -> float:
  """Useful FLOPs: 4 B L^2 H D x density forward; forward+backward = 3.5 x forward."""
  fwd = 4.0 * batch * length * length * heads * head_dim * density
  return fwd * (3.5 if backward else 1.0)


def _attention_fn(impl: str, mask: masks.Mask | None, name: str, length: int) -> Callable[..., jax.Array]:
  if impl == "pallas":
    return lambda q, k, v: dot_product_attention(q, k, v, mask=mask, implementation="pallas")
  if impl == "splash":
    return splash_attention_fn(mask, name, length, interpret=jax.default_backend() != "tpu")
  if impl == "pallas-triton":
    from cinema_kernels import block_sparse_attention

    return lambda q, k, v: block_sparse_attention(q, k, v, mask, flavour="triton")
  if name == "causal":
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
  if mask is None:
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=impl)
  dense = jnp.asarray(mask.to_dense(length, length))[None, None]  # [1, 1, l, l]
  return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=dense, implementation=impl)


def _grad_fn(fn: Callable[..., jax.Array]) -> Callable[..., Any]:
  return jax.grad(lambda q, k, v: fn(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))


def _tile_fraction(mask: masks.Mask | None, length: int, block: tuple[int, int]) -> float:
  if mask is None:
    return 1.0
  summary = mask.block_summary(*block, q_len=length, kv_len=length)
  return float((summary != masks.EMPTY).mean())


def run(
  lengths: list[int],
  mask_names: list[str],
  impls: list[str],
  *,
  batch: int,
  heads: int,
  head_dim: int,
  dtype: Any,
  iters: int,
  warmup: int,
  backward: bool,
  xla_max_length: int,
  warmup_seconds: float = 0.0,
  queue: int = 0,
  device_time: bool = False,
  on_record: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
  """Times every (length, mask, implementation, direction); returns one record per measurement.

  ``ms`` is the median time of one call waited for (as the peer anchor scripts time); with ``queue`` >= 2 a record
  also has ``ms_queued``, the time per call of ``queue`` calls queued back to back (``timing.time_call``): the device
  time, without the host's dispatch and wait. With ``device_time`` a record also has ``ms_device``, what the device
  itself spent per call (its kernels' durations from a profiler trace, ``timing.device_time``), and ``kernels``, the
  same per kernel. Forward records of the block-sparse kernels have ``err``, their output's relative error against
  XLA's (``output_error``), and ``wrong`` when it is above ``error_tolerance``.

  ``on_record`` sees the records so far (ratios filled in where their reference is measured) after each one, so a
  run cut short keeps what it measured.
  """
  flavour, interpret, sizes = _kernel_tiles_in_force()
  print(f"pallas kernel: {flavour}{' (interpret mode)' if interpret else ''}, tiles {sizes}", flush=True)
  records = []
  skipped = set()
  for length in lengths:
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (batch, length, heads, head_dim), dtype) for key in keys)
    for name in mask_names:
      mask = benchmark_mask(name, length)
      density = 1.0 if mask is None else mask.density(q_len=length, kv_len=length)
      tiles = _tile_fraction(mask, length, sizes.fwd)
      for impl in impls:
        reason = _skip_reason(impl, length, xla_max_length)
        if reason:
          if (impl, reason) not in skipped:
            skipped.add((impl, reason))
            print(f"skipping {impl}: {reason}", flush=True)
          continue
        fn = scheme = None  # set up once per implementation, by its first direction
        for direction in ("fwd", "fwd+bwd") if backward else ("fwd",):
          record = dict(length=length, mask=name, density=density, tiles=tiles, impl=impl, direction=direction)
          # One failing implementation (an import, its own set-up, a compile, memory) must not stop the table.
          try:
            if fn is None:
              scheme = _kernel_scheme(q, mask) if impl == "pallas" and flavour == "mosaic_gpu" else None
              fn = _attention_fn(impl, mask, name, length)
            if scheme:
              record["scheme"] = scheme
            jitted = jax.jit(fn if direction == "fwd" else _grad_fn(fn))
            seconds = timing.time_call(jitted, q, k, v, warmup=warmup, iters=iters, warmup_seconds=warmup_seconds)
            flops = attention_flops(length, heads, head_dim, batch, density, direction != "fwd")
            record.update(ms=seconds * 1e3, tflops=flops / seconds / 1e12)
          except Exception as e:  # noqa: BLE001
            record.update(ms=None, tflops=None, error=_describe(e))
            traceback.print_exc(file=sys.stderr)
          if queue >= 2 and record["ms"] is not None:
            try:  # queued calls hold more memory at once: their failure leaves the per-call time standing
              record.update(ms_queued=timing.time_call(jitted, q, k, v, warmup=1, iters=iters, queue=queue) * 1e3)
            except Exception as e:  # noqa: BLE001
              record.update(ms_queued=None, queued_error=_describe(e))
              traceback.print_exc(file=sys.stderr)
          if direction == "fwd" and impl in _CHECKED and record["ms"] is not None and length <= xla_max_length:
            try:  # the reference's memory, say, must not cost the timings
              record["err"] = output_error(jitted, q, k, v, mask, name)
              record["wrong"] = record["err"] > error_tolerance(dtype)
            except Exception as e:  # noqa: BLE001
              record.update(err=None, check_error=_describe(e))
          if device_time and record["ms"] is not None:
            try:  # a trace needs the profiler's device tracer (CUPTI on a GPU): without it the timings stand
              measured = timing.device_time(jitted, q, k, v, calls=iters)
              record.update(ms_device=measured.ms, kernels=measured.kernels)
            except Exception as e:  # noqa: BLE001
              record.update(ms_device=None, device_error=_describe(e))
          records.append(record)
          print(_progress_line(record), flush=True)
          if on_record is not None:
            _add_ratios(records)
            on_record(records)
  _add_ratios(records)
  return records


def _describe(e: BaseException) -> str:
  """A failure as a record keeps it: the exception's type and the start of its message."""
  return f"{type(e).__name__}: {str(e)[:160]}"


_CHECKED = ("pallas", "pallas-triton", "splash")  # block-sparse kernels: their forward output is checked
CHECKED_HEADS = 2  # heads of a block-sparse forward's output compared with XLA's (the reference holds L^2 scores)


def output_error(fn: Callable[..., jax.Array], q: jax.Array, k: jax.Array, v: jax.Array, mask, name: str) -> float:
  """Relative error (Frobenius) of ``fn``'s output against XLA attention in float32 with the same mask, on the first
  ``CHECKED_HEADS`` heads: a fast kernel that computes something else must not pass for a fast kernel."""
  heads = slice(0, CHECKED_HEADS)
  out = jnp.asarray(fn(q, k, v))[:, :, heads].astype(jnp.float32)
  f32 = [x[:, :, heads].astype(jnp.float32) for x in (q, k, v)]
  with jax.default_matmul_precision("highest"):
    ref = jax.jit(_attention_fn("xla", mask, name, q.shape[1]))(*f32)
  return float(jnp.linalg.norm(out - ref) / jnp.maximum(jnp.linalg.norm(ref), 1e-30))


def error_tolerance(dtype: Any) -> float:
  """The largest ``output_error`` a kernel passes with: per input dtype, as the kernel tests hold them."""
  return 1e-4 if jnp.dtype(dtype) == jnp.float32 else 2e-2


def _skip_reason(impl: str, length: int, xla_max_length: int) -> str | None:
  """Why ``impl`` does not run here at ``length`` (None: it runs)."""
  backend = jax.default_backend()
  if impl == "xla" and length > xla_max_length:
    return f"L = {length} is above --xla-max-length {xla_max_length} (XLA holds L^2 scores)"
  if impl in ("cudnn", "pallas-triton") and backend != "gpu":
    return f"it runs on NVIDIA GPUs, this is {backend}"
  if impl == "splash" and backend not in ("tpu", "cpu"):
    return f"it is a TPU kernel (interpreted on the CPU), this is {backend}"
  return None


def profile_kernels(
  directory: str,
  lengths: list[int],
  mask_names: list[str],
  *,
  batch: int,
  heads: int,
  head_dim: int,
  dtype: Any,
  backward: bool,
  clock_ghz: float,
) -> list[Any]:
  """Runs ``pallas`` once per (length, mask) with the Mosaic GPU kernels' in-kernel profiler on; prints where each
  kernel's time goes and returns the ``KernelProfile``s. Traces go to ``directory/L<length>-<mask>/``."""
  from cinema_kernels import mosaic_gpu, mosaic_gpu_profile

  flavour, interpret, _ = _kernel_tiles_in_force()
  if flavour != "mosaic_gpu" or interpret:
    raise ValueError(
      f"--profile-kernels needs the Mosaic GPU kernels (a Hopper GPU); here the pallas kernel is {flavour}"
      + (" in interpret mode" if interpret else "")
    )
  profiles = []
  for length in lengths:
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (batch, length, heads, head_dim), dtype) for key in keys)
    for name in mask_names:
      target = pathlib.Path(directory) / f"L{length}-{name}"
      for old in target.glob("*-trace.json"):  # a kernel writes its trace once, on its first run: start afresh
        old.unlink()
      fn = _attention_fn("pallas", benchmark_mask(name, length), name, length)
      with mosaic_gpu.profiling(target):
        jax.block_until_ready(jax.jit(_grad_fn(fn) if backward else fn)(q, k, v))
      jax.effects_barrier()  # the traces are written by host callbacks
      for trace in sorted(target.glob("*-trace.json")):
        profile = mosaic_gpu_profile.summarise(trace)
        profiles.append(profile)
        print(f"L={length} {name} ({trace})\n{mosaic_gpu_profile.format_summary(profile, clock_ghz)}", flush=True)
  return profiles


def _kernel_scheme(q: jax.Array, mask: masks.Mask | None) -> str | None:
  """How the Mosaic GPU kernels run this mask: the forward's CTA count (persistent or one per item) and ring depth,
  the backward tiles; None where the inputs are outside their scope (the Triton kernels run them)."""
  from cinema_kernels import mosaic_gpu, prepare_mask

  km = prepare_mask(mask, q, q, flavour="mosaic_gpu")
  if not mosaic_gpu.supports(q, km):
    return None
  b, _, h, d = q.shape
  plan = mosaic_gpu.forward_plan(jax.ShapeDtypeStruct((b, km.q_pad, h, d), q.dtype), km, interpret=False)
  kind = "persistent" if plan.persistent else "one per item"
  bwd = km.block_sizes.bwd
  overlap = ", overlapped softmax" if plan.overlap else ""
  return f"fwd {plan.ctas} CTAs ({kind}), {plan.steps}-slot ring{overlap}, bwd tiles {bwd[0]}x{bwd[1]}"


def _write_json(path: str, records: list[dict[str, Any]], call_floor_ms: float | None = None) -> None:
  payload = dict(device=timing.device_description(), call_floor_ms=call_floor_ms, records=records)
  write_atomic(path, json.dumps(payload, indent=1).encode())


def _progress_line(r: dict[str, Any]) -> str:
  ms = "FAIL " + r["error"] if r.get("ms") is None else f"{r['ms']:.3f} ms"
  if r.get("ms_queued") is not None:
    ms += f" ({r['ms_queued']:.3f} queued)"
  elif r.get("queued_error"):
    ms += f" (queued: FAIL {r['queued_error']})"
  if r.get("ms_device") is not None:
    kernels = ", ".join(f"{name[:_KERNEL_NAME]} {t:.3f}" for name, t in list(r["kernels"].items())[:_KERNELS_SHOWN])
    ms += f" (device {r['ms_device']:.3f}: {kernels})"
  elif r.get("device_error"):
    ms += f" (device: FAIL {r['device_error']})"
  if r.get("err") is not None:
    ms += f" (error vs XLA {r['err']:.2e}{_WRONG if r.get('wrong') else ''})"
  elif r.get("check_error"):
    ms += f" (check: FAIL {r['check_error']})"
  scheme = f"  [{r['scheme']}]" if r.get("scheme") else ""
  return f"  L={r['length']} {r['mask']:<12} {r['impl']:<6} {r['direction']:<7} {ms}{scheme}"


_WRONG = " WRONG"  # beside an output error above the dtype's tolerance
_KERNELS_SHOWN = 4  # the longest kernels of a record named on its progress line (the JSON keeps them all)
_KERNEL_NAME = 48  # characters of a kernel's name shown there


def _add_ratios(records: list[dict[str, Any]]) -> None:
  """Ratio of each time to the dense reference of the same length and direction (cuDNN, else XLA), and of each of
  ours to splash with the same mask where splash ran."""
  for r in records:
    splash = next(
      (
        x
        for x in records
        if x["impl"] == "splash"
        and (x["length"], x["mask"], x["direction"]) == (r["length"], r["mask"], r["direction"])
      ),
      None,
    )
    if r["impl"].startswith("pallas") and splash is not None and splash.get("ms") and r.get("ms"):
      r["ratio_splash"] = r["ms"] / splash["ms"]
    r["ratio"] = None
    r["reference"] = None
    for ref_impl in ("cudnn", "xla"):
      ref = next(
        (
          x
          for x in records
          if x["impl"] == ref_impl
          and x["mask"] == "dense"
          and x["length"] == r["length"]
          and x["direction"] == r["direction"]
          and x.get("ms")
        ),
        None,
      )
      if ref is not None:
        r["reference"] = f"{ref_impl} dense"
        r["ratio"] = None if r.get("ms") is None else r["ms"] / ref["ms"]
        break


def table(records: list[dict[str, Any]]) -> str:
  queued = any(r.get("ms_queued") is not None for r in records)
  device = any(r.get("ms_device") is not None for r in records)
  checked = any(r.get("err") is not None for r in records)
  splash = any(r.get("ratio_splash") is not None for r in records)
  header = ["L", "mask", "density", "tiles", "impl", "pass", "ms", "TFLOP/s", "x ref dense", "ref"]
  if splash:
    header.append("x splash")
  if checked:
    header.append("err vs XLA")
  if device:
    header.insert(7, "device ms")
  if queued:
    header.insert(7, "queued ms")
  rows = []
  for r in records:
    row = [
      r["length"],
      r["mask"],
      round(r["density"], 4),
      round(r["tiles"], 4),
      r["impl"],
      r["direction"],
      "FAIL" if r.get("ms") is None else float(r["ms"]),
      "-" if r.get("tflops") is None else float(r["tflops"]),
      "-" if r.get("ratio") is None else float(r["ratio"]),
      r.get("reference") or "-",
    ]
    if splash:
      row.append("-" if r.get("ratio_splash") is None else float(r["ratio_splash"]))
    if checked:
      row.append("-" if r.get("err") is None else f"{r['err']:.1e}{_WRONG if r.get('wrong') else ''}")
    if device:
      row.insert(7, "-" if r.get("ms_device") is None else float(r["ms_device"]))
    if queued:
      row.insert(7, "-" if r.get("ms_queued") is None else float(r["ms_queued"]))
    rows.append(row)
  return timing.format_table(header, rows)


def _parse(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="cinema-jax bench attention", description=__doc__.split("\n\n")[0])
  p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 16384])
  p.add_argument("--masks", type=lambda s: s.split(","), default=list(MASK_NAMES), help="comma list")
  p.add_argument("--impls", type=lambda s: s.split(","), default=list(IMPLEMENTATIONS), help="comma list")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--heads", type=int, default=None, help="default 24 (2 with --profile-kernels: smaller traces)")
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument(
    "--warmup-seconds", type=float, default=0.3, help="keep warming up each call until this long has passed"
  )
  p.add_argument(
    "--queue",
    type=int,
    default=0,
    metavar="N",
    help="also time N calls queued back to back (device time per call, without the host's dispatch and wait)",
  )
  p.add_argument(
    "--device-time",
    action="store_true",
    help="also record what the device itself spent per call, and per kernel, from a profiler trace (GPU: CUPTI)",
  )
  p.add_argument("--no-backward", action="store_true", help="time the forward only")
  p.add_argument("--xla-max-length", type=int, default=16384, help="skip XLA above this length (L^2 memory)")
  p.add_argument("--block-q", type=int, default=None, help="kernel tile rows (default: the backend's)")
  p.add_argument("--block-kv", type=int, default=None, help="kernel tile columns (default: the backend's)")
  p.add_argument(
    "--block-q-bwd",
    type=int,
    default=None,
    help="backward tile rows (default: the forward's if --block-q/--block-kv are given, else the backend's)",
  )
  p.add_argument("--block-kv-bwd", type=int, default=None, help="backward tile columns (default: as --block-q-bwd)")
  p.add_argument("--json", default=None, help="also write the records to this file")
  p.add_argument(
    "--profile-kernels",
    metavar="DIR",
    default=None,
    help="instead of timing: run the Mosaic GPU kernels once with their in-kernel profiler and print where the time "
    "goes (traces under DIR; Hopper GPUs)",
  )
  p.add_argument("--clock-ghz", type=float, default=1.98, help="SM clock for cycles -> microseconds (profiles)")
  p.add_argument(
    "--quick", action="store_true", help="CPU smoke test: L=128, H=2, D=64, float32, 1 timed run (interpret mode)"
  )
  args = p.parse_args(argv)
  for name in args.masks:
    if name not in MASK_NAMES:
      p.error(f"unknown mask {name!r}; choose from {', '.join(MASK_NAMES)}")
  for name in args.impls:
    if name not in IMPLEMENTATIONS:
      p.error(f"unknown implementation {name!r}; choose from {', '.join(IMPLEMENTATIONS)}")
  if args.queue < 0 or args.queue == 1:
    p.error(f"--queue takes N >= 2 calls (0: off), got {args.queue}")
  if args.heads is None:
    args.heads = 2 if args.profile_kernels else 24
  if args.quick:
    args.lengths, args.heads, args.head_dim, args.dtype = [128], 2, 64, "float32"
    args.iters, args.warmup = 1, 1
    args.block_q = args.block_q or 32
    args.block_kv = args.block_kv or 32
  return args


def tile_override(args: argparse.Namespace) -> Any:
  """The tiles the ``--block-*`` flags ask for; None if none is given.

  Any one flag is an override; the others keep the backend's defaults, except that the backward follows forward tiles
  given without backward ones (as in a config's ``attention`` section). So a bare ``--block-q-bwd 128
  --block-kv-bwd 128`` changes the backward tiles alone.
  """
  asked = {k: getattr(args, k) for k in ("block_q", "block_kv", "block_q_bwd", "block_kv_bwd")}
  if all(v is None for v in asked.values()):
    return None
  base = _kernel_tiles_in_force()[2]
  if asked["block_q_bwd"] is None and asked["block_kv_bwd"] is None:
    base = dataclasses.replace(base, block_q_bwd=None, block_kv_bwd=None)
  return dataclasses.replace(base, **{k: v for k, v in asked.items() if v is not None})


def _kernel_tiles_in_force() -> tuple[str, bool, Any]:
  """(flavour, interpret, tiles) of the kernel ``implementation="pallas"`` runs here (CPU: interpret-mode tiles)."""
  from cinema_kernels import default_block_sizes, resolve_flavour

  flavour, interpret = resolve_flavour()
  return (
    flavour,
    interpret,
    default_block_sizes("interpret" if interpret and jax.default_backend() == "cpu" else flavour),
  )


def main(argv: list[str]) -> int:
  args = _parse(argv)
  print(f"attention benchmark on {timing.device_description()}", flush=True)
  print(
    f"B={args.batch} H={args.heads} D={args.head_dim} {args.dtype}; FLOPs = 4 B L^2 H D x density, fwd+bwd = 3.5 x fwd",
    flush=True,
  )
  shape = dict(batch=args.batch, heads=args.heads, head_dim=args.head_dim, dtype=jnp.dtype(args.dtype))
  floor_ms = None if args.profile_kernels else timing.call_floor() * 1e3
  if floor_ms is not None:
    floor = f"a trivial jitted call, waited for: {floor_ms:.3f} ms"
    print(f"{floor} (the floor under every 'ms' figure: the host's dispatch and wait)", flush=True)
  sizes = tile_override(args)
  with contextlib.ExitStack() as stack:
    if sizes is not None:
      from cinema_kernels import use_block_sizes

      stack.enter_context(use_block_sizes(sizes.block_q, sizes.block_kv, sizes.block_q_bwd, sizes.block_kv_bwd))
    if args.profile_kernels:
      backward = not args.no_backward
      try:
        profile_kernels(
          args.profile_kernels, args.lengths, args.masks, **shape, backward=backward, clock_ghz=args.clock_ghz
        )
      except ValueError as e:  # no Mosaic GPU kernels here, or more regions than the profiler's buffer holds
        print(f"cinema-jax bench attention: {e}", file=sys.stderr)
        return 2
      return 0
    records = run(
      args.lengths,
      args.masks,
      args.impls,
      **shape,
      iters=args.iters,
      warmup=args.warmup,
      backward=not args.no_backward,
      xla_max_length=args.xla_max_length,
      # An idle GPU's clocks are low; the first records of a run would otherwise time part of their ramp-up.
      warmup_seconds=0.0 if args.quick else args.warmup_seconds,
      queue=args.queue,
      device_time=args.device_time,
      on_record=None if args.json is None else functools.partial(_write_json, args.json, call_floor_ms=floor_ms),
    )
  print(table(records))
  if args.json:
    _write_json(args.json, records, call_floor_ms=floor_ms)
  ours = [r for r in records if r["impl"] == "pallas"]
  wrong = [r for r in records if r.get("wrong")]
  for r in wrong:
    print(
      f"cinema-jax bench attention: {r['impl']} at L={r['length']} {r['mask']} is off XLA's output by {r['err']:.2e} "
      f"(relative; the tolerance for {args.dtype} is {error_tolerance(args.dtype):.0e})",
      file=sys.stderr,
    )
  return 0 if all(r.get("ms") is not None for r in ours) and not wrong else 1
