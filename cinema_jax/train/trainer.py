"""``train_and_evaluate(config, workdir)``: the training loop over progressive long-context stages.

Per run: start-up (mesh from ``config.mesh`` over all devices of all processes), the state built abstractly and
either restored from the newest readable checkpoint in ``workdir/checkpoints`` (onto the current mesh) or created
sharded; then, stage by stage (``train.stage_steps`` x ``train.stage_lengths``), a grain dataset of that stage's
length and a step compiled for its shapes. Every step: the global batch from the per-process parts, the jitted
donated step, metrics checked for NaN / inf, TensorBoard scalars and the progress bar from process 0, a checkpoint
on the interval or at a preemption notice (jax's preemption service across processes; SIGTERM in a single-process
run, see ``TerminationNotice``). A finished single-process run also writes its sampling parameters (the EMA, else the
parameters) to ``workdir/params.safetensors`` (``cinema_jax.train.export``).
"""

from __future__ import annotations

import dataclasses
import pathlib
import signal
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
import tqdm

from cinema_jax.data.loader import global_batch
from cinema_jax.parallel import make_mesh, mesh_context
from cinema_jax.train import export, tasks
from cinema_jax.train import metrics as metrics_lib
from cinema_jax.train.checkpoint import Checkpointer
from cinema_jax.train.data import StageData
from cinema_jax.train.state import build_state
from cinema_jax.train.step import batch_shardings, jit_step


class TerminationNotice:
  """SIGTERM (what a preempted VM or a job scheduler sends first) as a preemption notice for a single-process run.

  While active, SIGTERM sets ``requested`` instead of killing the process, so the loop saves the current step and
  stops cleanly. Multi-process runs leave signals to jax's preemption service, which orbax's
  ``reached_preemption`` reads on every process at the same step (one process stopping alone would hang the rest).
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._notice)
    return self

  def _notice(self, signum, frame):
    self.requested = True
    # A second SIGTERM (a run stuck before its next step) acts as it would have without the notice.
    signal.signal(signal.SIGTERM, self._previous)

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False


@dataclasses.dataclass
class TrainResult:
  state: Any  # the final TrainState (sharded jax.Arrays)
  history: list[dict]  # per step of this run: step, stage, length, loss, norms, step_time, tokens_per_s (, mfu)
  step: int  # updates applied in total (including those before a resume)
  preempted: bool  # stopped early at a preemption notice (a checkpoint was written)
  resumed_from: int | None  # the checkpoint step this run started from


def stages(config) -> list[tuple[int, int, int]]:
  """(first step, end step, length) of every stage."""
  steps, lengths = tuple(config.train.stage_steps), tuple(config.train.stage_lengths)
  if len(steps) != len(lengths) or not steps:
    raise ValueError(
      f"train.stage_steps {steps} and train.stage_lengths {lengths} must be non-empty and of equal length"
    )
  if any(s < 1 for s in steps) or any(n < 1 for n in lengths):
    raise ValueError(f"stage steps {steps} and lengths {lengths} must be positive")
  bounds = np.cumsum((0,) + steps)
  return [(int(bounds[i]), int(bounds[i + 1]), int(lengths[i])) for i in range(len(steps))]


def train_and_evaluate(config, workdir: str | pathlib.Path, *, task=None, devices=None) -> TrainResult:
  """Trains ``config`` in ``workdir`` (resuming from its newest checkpoint); see the module docstring."""
  workdir = pathlib.Path(workdir)
  task = task or tasks.make_task(config)
  mesh = make_mesh(config.mesh.to_dict(), devices)
  rules = tuple(config.sharding_rules)
  primary = jax.process_index() == 0
  plan = stages(config)
  total = plan[-1][1]
  batch_size = config.train.batch_size
  example = task.example_batch(plan[0][2], batch_size)
  spec = build_state(task, config, mesh, rules, example)

  ckpt = None
  start, state, data_state, resumed_from = 0, None, None, None
  if config.checkpoint.enabled:
    ckpt = Checkpointer(
      workdir / "checkpoints",
      max_to_keep=config.checkpoint.keep,
      every=config.checkpoint.every,
      use_async=config.checkpoint.use_async,
    )
    restored = ckpt.restore(spec.abstract)
    if restored is not None:
      start, state, data_state = restored
      resumed_from = start
      if primary:
        print(f"resuming from the checkpoint at step {start} in {ckpt.directory}", file=sys.stderr, flush=True)
  if state is None:
    state = spec.init()

  config_json = config.to_json_best_effort()
  writer = metrics_lib.MetricsWriter(workdir, enabled=primary)
  num_params = tasks.num_params(spec.abstract.params)
  history: list[dict] = []
  preempted = False
  bar = tqdm.tqdm(total=total, initial=start, desc="train", disable=not (primary and config.train.progress))
  notice = TerminationNotice()
  notice.__enter__()
  try:
    for index, (first, end, length) in enumerate(plan):
      if start >= end:
        continue
      data = StageData(
        task, config, stage=index, length=length, process_index=jax.process_index(),
        process_count=jax.process_count(),
      )  # fmt: skip
      if data_state is not None and data_state.get("stage") == index:
        data.set_state(data_state["iterator"])
      elif start > first:  # a checkpoint without this stage's position (cannot happen for ones written here)
        data.set_state({"next_index": start - first})
      example = task.example_batch(length, batch_size)
      step_fn = jit_step(task, config, spec.tx, spec.shardings, batch_shardings(example, mesh, rules))
      tokens_per_step = batch_size * task.tokens_per_sample(length)
      flops_per_step = tasks.flops_per_token(task, spec.abstract.params, length) * tokens_per_step
      with mesh_context(mesh, rules):
        for step in range(max(start, first), end):
          batch = global_batch(next(data), mesh, rules)
          t0 = time.perf_counter()
          state, m = step_fn(state, batch)
          m = {k: float(v) for k, v in jax.device_get(m).items()}
          elapsed = time.perf_counter() - t0
          metrics_lib.check_finite(m, step)
          m.update(
            metrics_lib.throughput(elapsed, tokens_per_step, flops_per_step, mesh.size, config.train.peak_tflops)
          )
          m.update(step=step, stage=index, length=length)
          history.append(m)
          if (step + 1) % config.train.log_every == 0 or step + 1 == end:
            writer.write(step + 1, {k: v for k, v in m.items() if k not in ("step", "stage")})
          bar.update(1)
          bar.set_postfix(stage=index, loss=f"{m['loss']:.4f}", refresh=False)
          if ckpt is not None:
            done = step + 1
            position = {"stage": index, "iterator": data.get_state()}
            saved = ckpt.save(done, state, position, config_json, force=done == total)
            if done < total and (notice.requested or ckpt.reached_preemption(done)):
              if not saved:  # on the interval (or saved by orbax at its own notice) the step is written already
                ckpt.save(done, state, position, config_json, force=True)
              ckpt.wait()
              preempted = True
              if primary:
                print(f"preemption notice: saved step {done} and stopped", file=sys.stderr, flush=True)
              return TrainResult(state, history, done, True, resumed_from)
          elif notice.requested and step + 1 < total:  # nothing to save to: stop at once
            if primary:
              print(f"termination notice: stopped after step {step + 1} (checkpoints are off)", file=sys.stderr)
            return TrainResult(state, history, step + 1, True, resumed_from)
    if primary:
      print(f"trained {total} steps ({num_params:,} parameters) in {workdir}", file=sys.stderr, flush=True)
    if jax.process_count() == 1:  # multi-process runs: export_from_workdir reads the final checkpoint instead
      source = "ema" if state.ema is not None else "params"
      path = export.export_params(
        jax.device_get(getattr(state, source)), workdir / export.FILENAME, config_json=config_json, step=total,
        source=source,
      )  # fmt: skip
      print(f"sampling parameters ({source}) written to {path}", file=sys.stderr, flush=True)
    return TrainResult(state, history, total, preempted, resumed_from)
  finally:
    notice.__exit__(None, None, None)
    bar.close()
    writer.close()
    if ckpt is not None:
      ckpt.close()
