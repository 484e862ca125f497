"""``cinema-jax bench keyframes``: cost of generating one story keyframe against the history length, with and without
GoldenMem.

For each history length k (keyframes 1..k already generated) it times ``KeyframePipeline.generate_next`` (GoldenMem
packing on the host, then the jitted Euler sampler: ``--steps`` model forwards) and reads the compiled peak memory
of the sampler (``compiled_memory_bytes``). GoldenMem packs at most ``max_memory`` earlier keyframes at
Fibonacci-pyramid sizes, so its cost stops growing once the pyramid is full; without it every earlier keyframe sits in
the sequence at full size and the cost grows with k (attention quadratically).

Ratios are to a reference row measured in the same run (GoldenMem at k = 7, i.e. the 8th keyframe). The acceptance
pair (8th vs 48th keyframe) is timed again interleaved, round after round, so that load changes on a shared machine
hit both alike. Default: tiny config (configs/keyframes.py:tiny), 8 x 8-token frames, 4 Euler steps, CPU; about two
minutes on 2 cores. ``--quick`` shrinks everything for a smoke test.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from cinema_jax.bench.timing import compiled_memory_bytes, device_description, format_table, time_call
from cinema_jax.config import load_config
from cinema_jax.pipelines.keyframes import CaptionEmbedding, KeyframePipeline

LIMIT = 1.1  # acceptance: with GoldenMem the 48th keyframe costs <= 1.1 x the 8th


def _parse(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="cinema-jax bench keyframes", description=__doc__.split("\n\n")[0])
  p.add_argument("--histories", default="1,2,4,7,16,32,47,48", help="history lengths k to measure (keyframe k+1)")
  p.add_argument("--compare", default="7,47", help="the acceptance pair of history lengths (8th vs 48th keyframe)")
  p.add_argument("--side", type=int, default=8, help="tokens per side of a keyframe")
  p.add_argument("--steps", type=int, default=4, help="Euler steps per keyframe")
  p.add_argument("--iters", type=int, default=3, help="timed calls per row (median)")
  p.add_argument("--rounds", type=int, default=5, help="interleaved rounds for the acceptance pair")
  p.add_argument("--quick", action="store_true", help="tiny smoke run: 4 x 4 frames, 1 step, few rows")
  p.add_argument("--strict", action="store_true", help="exit 1 when an acceptance check fails")
  args = p.parse_args(list(argv))
  if args.quick:
    args.histories, args.compare, args.side, args.steps, args.iters, args.rounds = "1,7,12", "7,12", 4, 1, 1, 1
  args.histories = sorted({int(h) for h in args.histories.split(",")})
  args.compare = tuple(int(h) for h in args.compare.split(","))
  if len(args.compare) != 2:
    p.error(f"--compare takes two history lengths, got {args.compare}")
  args.histories = sorted(set(args.histories) | set(args.compare))
  return args


def _story(config, length: int, seed: int = 0):
  """Random keyframe latents and caption embeddings of the config's shapes."""
  rng = np.random.default_rng(seed)
  p = config.latent.patch
  shape = (config.frame.height * p, config.frame.width * p, config.latent.channels)
  latents = [rng.standard_normal(shape).astype(np.float32) for _ in range(length)]
  captions = [
    CaptionEmbedding(
      rng.standard_normal((config.text.caption_tokens, config.model.context_in_dim)).astype(np.float32),
      rng.standard_normal(config.model.vec_in_dim).astype(np.float32),
    )
    for _ in range(length + 1)
  ]
  return latents, captions


def run(argv: Sequence[str] = (), *, log=print) -> dict:
  """Runs the benchmark; returns its rows and acceptance figures (tests read these)."""
  args = _parse(argv)
  config = load_config(
    "configs/keyframes.py:tiny",
    [
      f"--config.frame.height={args.side}",
      f"--config.frame.width={args.side}",
      f"--config.sampling.num_steps={args.steps}",
    ],
  )
  pipeline = KeyframePipeline.from_config(config)
  latents, captions = _story(config, max(args.histories))
  log(f"cinema-jax bench keyframes on {device_description()}")
  log(
    f"tiny MM-DiT (width {config.model.hidden_size}, {config.model.depth} double + {config.model.depth_single_blocks} "
    f"single blocks), {args.side} x {args.side}-token keyframes, {config.text.caption_tokens} caption tokens, "
    f"{args.steps} Euler steps per keyframe, GoldenMem max_memory {config.goldenmem.max_memory}"
  )

  def generate(k: int, enabled: bool):
    return lambda: pipeline.generate_next(latents[:k], captions[:k], captions[k], goldenmem_enabled=enabled)

  rows = []
  start = time.perf_counter()
  cases = [(enabled, k) for enabled in (True, False) for k in args.histories]
  for enabled, k in tqdm(cases, desc="history lengths", leave=False):
    prepared = pipeline.prepare(latents[:k], captions[:k], captions[k], goldenmem_enabled=enabled)
    memory = compiled_memory_bytes(pipeline.sampler, *pipeline.sampler_args(prepared, 0))
    seconds = time_call(generate(k, enabled), warmup=1, iters=args.iters)
    rows.append(
      dict(
        goldenmem=enabled,
        history=k,
        slots=prepared.memory.num_slots,
        image_tokens=prepared.memory.num_tokens + prepared.num_tokens,
        context=prepared.memory.cost,
        seconds=seconds,
        memory_bytes=memory,
      )
    )
  ref = next(r for r in rows if r["goldenmem"] and r["history"] == args.compare[0])
  table = [
    [
      "GoldenMem" if r["goldenmem"] else "full history",
      r["history"],
      r["history"] + 1,
      r["slots"],
      r["image_tokens"],
      r["context"],
      r["seconds"] * 1e3,
      r["seconds"] / ref["seconds"],
      r["memory_bytes"] / 2**20,
      r["memory_bytes"] / ref["memory_bytes"],
    ]
    for r in rows
  ]
  header = [
    "memory",
    "history k",
    "keyframe",
    "slots",
    "image tokens",
    "context (frames)",
    "ms / keyframe",
    "time ratio",
    "compiled MiB",
    "memory ratio",
  ]
  log(format_table(header, table))
  log(f"ratios are to GoldenMem at history {ref['history']} (keyframe {ref['history'] + 1}), measured in this run")

  # The acceptance pair again, interleaved in A B B A order round by round (each call warmed first), so that drifts
  # in machine load, caches and allocator state weigh on both alike.
  lo, hi = args.compare
  times = {(e, k): [] for e in (True, False) for k in (lo, hi)}
  for e in (True, False):
    for _ in tqdm(range(args.rounds), desc="acceptance rounds", leave=False):
      for k in (lo, hi, hi, lo):
        times[(e, k)].append(time_call(generate(k, e), warmup=1, iters=args.iters))

  def pair(enabled: bool) -> tuple[float, float]:
    by_k = {r["history"]: r for r in rows if r["goldenmem"] == enabled}
    t = statistics.median(times[(enabled, hi)]) / statistics.median(times[(enabled, lo)])
    return t, by_k[hi]["memory_bytes"] / by_k[lo]["memory_bytes"]

  gm_time, gm_mem = pair(True)
  full_time, full_mem = pair(False)
  gm_ok = gm_time <= LIMIT and gm_mem <= LIMIT
  grows = full_time > LIMIT and full_mem > LIMIT
  log(
    f"GoldenMem: keyframe {hi + 1} / keyframe {lo + 1}: time {gm_time:.3f}x, compiled memory {gm_mem:.3f}x "
    f"(<= {LIMIT}: {'PASS' if gm_ok else 'FAIL'})"
  )
  log(
    f"full history: keyframe {hi + 1} / keyframe {lo + 1}: time {full_time:.3f}x, compiled memory {full_mem:.3f}x "
    f"(grows: {'PASS' if grows else 'FAIL'})"
  )
  log(f"total {time.perf_counter() - start:.1f} s")
  return dict(
    rows=rows,
    goldenmem_ratio=(gm_time, gm_mem),
    full_ratio=(full_time, full_mem),
    passed=gm_ok and grows,
  )


def main(argv: list[str]) -> int:
  args = _parse(argv)
  result = run(argv)
  return 1 if args.strict and not result["passed"] else 0
