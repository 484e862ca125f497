"""Shared measuring and printing for benchmarks: median wall time of a jitted call, the device's own time per call
from a profiler trace, compiled memory, tables."""

from __future__ import annotations

import collections
import dataclasses
import pathlib
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp


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


def call_floor(iters: int = 20) -> float:
  """Median seconds of a trivial jitted call waited for: the host's dispatch and wait that every ``time_call`` sample
  with ``queue=1`` includes, whatever the device does."""
  fn = jax.jit(lambda x: x + 1)
  return time_call(fn, jnp.zeros((), jnp.int32), warmup=3, iters=iters)


@dataclasses.dataclass(frozen=True)
class DeviceTime:
  """The devices per call: ``ms``, their activity added up (over every device a sharded call runs on); ``kernels``,
  the same by kernel name, longest first."""

  ms: float
  kernels: dict[str, float]


# XLA's CUPTI collector puts a GPU's kernels and copies on one line per stream, "Stream #<id>" (with the kinds of its
# events after it), and names a line "CUPTI overhead" when it holds the tracer's own records, which may share a
# stream's line: there only the events with a correlation id (the launches') count. A TPU's activity is on its ops
# line. Other lines (modules, steps) repeat those spans.
_STREAM, _OVERHEAD, _OPS = "Stream #", "CUPTI overhead", "XLA Ops"


def _activity(plane: Any) -> list[tuple[str, float]]:
  """(name, nanoseconds) of the plane's activity events. Read while their line is held: an event refers into it."""

  def read(line: Any, launches_only: bool = False) -> list[tuple[str, float]]:
    # jaxlib 0.11 builds the stats' type on first use with a DeprecationWarning; where warnings are errors that
    # aborts the process (nanobind), so it is silenced here.
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", DeprecationWarning)
      return [
        (e.name, e.duration_ns)
        for e in line.events
        if not launches_only or any(key == "correlation_id" for key, _ in e.stats)
      ]

  lines = list(plane.lines)
  events = [x for line in lines if line.name.startswith(_STREAM) for x in read(line)]
  events += [x for line in lines if line.name == _OVERHEAD for x in read(line, launches_only=True)]
  if not events:
    events = [x for line in lines if line.name == _OPS for x in read(line)]
  return events


def device_time_from_profile(profile: Any, calls: int) -> DeviceTime:
  """The device activity of ``calls`` calls recorded in ``profile`` (a ``jax.profiler.ProfileData``), per call.

  Sums by name the events of each ``/device:`` plane's activity: a GPU's streams, else a TPU's ops. Kernels that ran
  concurrently on two streams count twice: this is busy time, not a span.
  """
  if calls < 1:
    raise ValueError(f"device_time_from_profile: calls must be >= 1, got {calls}")
  by_name: collections.Counter[str] = collections.Counter()
  for plane in profile.planes:
    if plane.name.startswith("/device:"):
      for name, ns in _activity(plane):
        by_name[name] += ns
  if not by_name:
    names = [plane.name for plane in profile.planes]
    raise RuntimeError(
      f"the profile holds no device activity (no {_STREAM!r} or {_OPS!r} line with events on a /device: plane; "
      f"planes: {names})"
    )
  kernels = {name: ns / calls / 1e6 for name, ns in by_name.most_common()}
  return DeviceTime(ms=sum(kernels.values()), kernels=kernels)


def device_time(fn: Callable[..., Any], *args: Any, calls: int = 10) -> DeviceTime:
  """The device's own time per call of ``fn(*args)`` (warm: call it first), from a ``jax.profiler`` trace of
  ``calls`` calls queued back to back: no host dispatch, no waiting, no launch gaps.

  Raises ``RuntimeError`` where the trace holds no device activity (a CPU, or a GPU without CUPTI).
  """
  from jax.profiler import ProfileData

  with tempfile.TemporaryDirectory(prefix="cinema-device-time-") as directory:
    jax.profiler.start_trace(directory)
    try:
      jax.block_until_ready([fn(*args) for _ in range(calls)])
    finally:
      jax.profiler.stop_trace()
    traces = sorted(pathlib.Path(directory).rglob("*.xplane.pb"))
    if not traces:
      raise RuntimeError("jax.profiler wrote no trace (*.xplane.pb)")
    profile = ProfileData.from_file(str(traces[-1]))
    return device_time_from_profile(profile, calls)


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
