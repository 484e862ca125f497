"""``cinema-jax bench train``: step time, tokens/s, model TFLOP/s per device and MFU of the jitted train step.

One row per training stage of the config (its long-context length): the same sharded, donated step the trainer
runs, on synthetic batches, timed as the median of ``--iters`` steps after the compile. Ratios are to the first
stage of the same run. MFU needs the chip's peak FLOP/s, which software cannot measure: pass ``--peak-tflops``
(per device, in the compute dtype; e.g. 989 for an H100 SXM in dense bf16), otherwise the column reads "n/a".

  cinema-jax bench train [--config configs/train_keyframes.py:tiny] [--iters 5] [--peak-tflops X] [--config.a=v]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from cinema_jax.bench.timing import device_description, format_table


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog="cinema-jax bench train", description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/train_keyframes.py:tiny", help="training config[:variant]")
  p.add_argument("--iters", type=int, default=5, help="timed steps per stage (after one compiling step)")
  p.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s of one device, for MFU")
  args, rest = p.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith("--config.")]
  if bad:
    p.error(f"unrecognized arguments: {' '.join(bad)}")
  if args.iters < 1:
    p.error(f"--iters must be >= 1, got {args.iters}")

  from cinema_jax.config import load_config
  from cinema_jax.data.loader import global_batch
  from cinema_jax.parallel import make_mesh, mesh_context
  from cinema_jax.train import metrics, tasks, trainer
  from cinema_jax.train.data import StageData
  from cinema_jax.train.state import build_state
  from cinema_jax.train.step import batch_shardings, jit_step

  config = load_config(args.config, rest)
  task = tasks.make_task(config)
  mesh = make_mesh(config.mesh.to_dict())
  rules = tuple(config.sharding_rules)
  plan = trainer.stages(config)
  batch_size = config.train.batch_size
  spec = build_state(task, config, mesh, rules, task.example_batch(plan[0][2], batch_size))
  state = spec.init()
  n_params = tasks.num_params(spec.abstract.params)
  rows, reference = [], None
  for index, (_, _, length) in enumerate(plan):
    data = StageData(task, config, stage=index, length=length, process_index=0, process_count=1)
    example = task.example_batch(length, batch_size)
    step = jit_step(task, config, spec.tx, spec.shardings, batch_shardings(example, mesh, rules))
    batch = global_batch(next(data), mesh, rules)
    times = []
    with mesh_context(mesh, rules):
      for i in range(args.iters + 1):
        start = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        if i:  # the first call compiles
          times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens = batch_size * task.tokens_per_sample(length)
    flops = tasks.flops_per_token(task, spec.abstract.params, length) * tokens
    t = metrics.throughput(seconds, tokens, flops, mesh.size, args.peak_tflops)
    reference = reference or t["tokens_per_s"]
    rows.append([
      length, tokens, f"{seconds * 1e3:.1f}", f"{t['tokens_per_s']:.0f}", f"{t['tokens_per_s'] / reference:.2f}",
      f"{t['tflops_per_device']:.4f}", f"{100 * t['mfu']:.1f}%" if "mfu" in t else "n/a",
    ])  # fmt: skip
    if not np.isfinite(float(m["loss"])):
      print(f"stage {index}: the loss is not finite")
      return 1
  print(f"train step of {args.config} ({config.train.task}, {n_params:,} parameters, batch {batch_size}, "
        f"mesh {dict(mesh.shape)}) on {device_description()}")  # fmt: skip
  header = ["length", "tokens/step", "step ms", "tokens/s", "vs stage 0", "TFLOP/s/device", "MFU"]
  print(format_table(header, rows))
  if args.peak_tflops is None:
    print("MFU needs the peak FLOP/s of one device: pass --peak-tflops (e.g. 989 for an H100 SXM, dense bf16).")
  return 0
