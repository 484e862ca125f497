"""Shared measuring and printing for benchmarks: median wall time of a jitted call, compiled memory, tables."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax


def time_call(
  fn: Callable[..., Any],
  *args: Any,
  warmup: int = 2,
  iters: int = 10,
  warmup_seconds: float = 0.0,
  queue: int = 1,
) -> float:
  """Median seconds of ``fn(*args)``, each call waited for on device.

  Before timing: ``warmup`` calls (the first compiles), then more for ``warmup_seconds``, so that an accelerator's
  clocks have left idle by the first timed call.

  ``queue``: calls per sample, dispatched back to back and waited for together; the sample is their time over
  ``queue``. With 1 (as the peer anchor scripts time) a sample includes the host's dispatch and its wait for the
  device; with more, those overlap the device's work of the calls queued before, which leaves the device time per
  call once it exceeds the host's time per dispatch.
  """
  if queue < 1:
    raise ValueError(f"time_call: queue must be >= 1, got {queue}")
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  deadline = time.perf_counter() + warmup_seconds
  while time.perf_counter() < deadline:
    jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready([fn(*args) for _ in range(queue)])
    samples.append((time.perf_counter() - start) / queue)
  return statistics.median(samples)


def compiled_memory_bytes(fn: Callable[..., Any], *args: Any) -> int:
  """Peak bytes XLA plans for one call of jitted ``fn``: arguments + outputs + temporaries - aliased (donated)."""
  analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
  if analysis is None:
    raise RuntimeError(f"the {jax.default_backend()} backend reports no compiled memory analysis")
  return int(
    analysis.argument_size_in_bytes
    + analysis.output_size_in_bytes
    + analysis.temp_size_in_bytes
    - analysis.alias_size_in_bytes
  )


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A plain text table; floats get 4 significant digits."""

  def cell(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)

  cells = [list(map(str, header))] + [[cell(v) for v in row] for row in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def device_description() -> str:
  d = jax.devices()[0]
  return f"{jax.device_count()} x {d.platform} ({getattr(d, 'device_kind', '?')}), jax {jax.__version__}"
