"""Where a Mosaic GPU kernel's time goes: summaries of the traces that ``mosaic_gpu.profiling`` makes the kernels write.

A trace (Chrome trace JSON, one per compiled kernel, its first run) holds, for every CTA and warpgroup, the named
regions the kernel body entered (``_region`` in ``mosaic_gpu``), stamped with the SM's cycle counter: an event's
``ts`` is ``(start + cycles) / 1000`` where ``start`` is the warpgroup's start on the global timer in nanoseconds and
``cycles`` counts from its first event, ``pid`` is 1 + the SM and ``tid`` is 1 + warpgroup + warpgroups x CTA. So
within one warpgroup a difference of ``ts`` is in thousands of cycles, and the first event of each warpgroup is on
the global clock in microseconds.

``summarise`` turns a trace into per-CTA means: each region's cycles per warpgroup (consumers and producer apart;
``Init`` is Mosaic GPU's own set-up region), the CTA's span in cycles, and how often a new CTA starts on an SM
(microseconds), whose excess over the span is the SM's idle time between CTAs where one CTA is resident at a time.
The producer is the warpgroup whose regions are loads (``load*``), the last of each CTA.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from collections import defaultdict


@dataclasses.dataclass(frozen=True)
class KernelProfile:
  """Per-CTA means of one kernel's trace. ``regions``: (role, region) -> thousands of cycles per warpgroup."""

  kernel: str
  ctas: int
  sms: int
  warpgroups: int
  span_kcycles: float
  start_interval_us: float | None  # mean time between consecutive CTA starts on one SM; None: one CTA per SM
  min_start_interval_us: float | None
  regions: dict[tuple[str, str], float]

  def co_resident(self, clock_ghz: float) -> bool:
    """Whether CTAs share an SM at once (a CTA started before the previous one could have ended)."""
    return self.min_start_interval_us is not None and self.min_start_interval_us < self.span_kcycles / clock_ghz

  def gap_us(self, clock_ghz: float) -> float | None:
    """Mean idle time of an SM between its CTAs, the span converted at ``clock_ghz``; None where CTAs overlap."""
    if self.start_interval_us is None or self.co_resident(clock_ghz):
      return None
    return self.start_interval_us - self.span_kcycles / clock_ghz


def summarise(path: str | os.PathLike) -> KernelProfile:
  """Reads one trace written under ``mosaic_gpu.profiling``; raises ValueError naming the file if it is not one."""
  path = pathlib.Path(path)
  try:
    events = json.loads(path.read_text())["traceEvents"]
    rows = [(int(e["tid"]), int(e["pid"]), str(e["name"]), e["ph"], float(e["ts"])) for e in events]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{path}: not a Mosaic GPU profiler trace ({type(e).__name__}: {e})") from None
  if not rows:
    raise ValueError(f"{path}: the trace holds no events (did the kernel enter any named region?)")

  by_trace: dict[int, list[tuple[int, str, str, float]]] = defaultdict(list)
  for tid, pid, name, ph, ts in rows:
    by_trace[tid].append((pid, name, ph, ts))
  producers = [tid for tid, ev in by_trace.items() if any(name.startswith("load") for _, name, _, _ in ev)]
  if not producers:
    raise ValueError(f"{path}: no producer warpgroup (regions named load*) in the trace")
  per_cta = math.gcd(*producers)  # the producer is the last warpgroup of its CTA: tid = warpgroups x (CTA + 1)

  spans: dict[int, float] = defaultdict(float)
  starts: dict[int, tuple[int, float]] = {}
  totals: dict[tuple[str, str], float] = defaultdict(float)
  counts = {"consumer": 0, "producer": 0}
  for tid, ev in by_trace.items():
    cta, role = (tid - 1) // per_cta, "producer" if tid % per_cta == 0 else "consumer"
    counts[role] += 1
    times = [ts for _, _, _, ts in ev]
    spans[cta] = max(spans[cta], max(times) - min(times))
    if cta not in starts or min(times) < starts[cta][1]:
      starts[cta] = (ev[0][0], min(times))
    open_regions: list[tuple[str, float]] = []
    for _, name, ph, ts in ev:
      if ph == "B":
        open_regions.append((name, ts))
      elif ph == "E":
        if not open_regions or open_regions[-1][0] != name:
          raise ValueError(f"{path}: region {name!r} of trace {tid} ends without beginning")
        _, begin = open_regions.pop()
        totals[(role, name)] += ts - begin

  by_sm: dict[int, list[float]] = defaultdict(list)
  for sm, start in starts.values():
    by_sm[sm].append(start)
  intervals = [b - a for s in by_sm.values() for a, b in zip(sorted(s), sorted(s)[1:], strict=False)]
  ctas = len(spans)
  return KernelProfile(
    kernel=path.name.rsplit("-", 2)[0].strip("_"),
    ctas=ctas,
    sms=len(by_sm),
    warpgroups=per_cta,
    span_kcycles=sum(spans.values()) / ctas,
    start_interval_us=sum(intervals) / len(intervals) if intervals else None,
    min_start_interval_us=min(intervals) if intervals else None,
    regions={key: total / counts[key[0]] for key, total in totals.items()},  # per warpgroup of that role
  )


def format_summary(profile: KernelProfile, clock_ghz: float = 1.98) -> str:
  """A few lines: the CTA, its regions' shares, the SM's idle time between CTAs (cycles converted at ``clock_ghz``)."""
  span_us = profile.span_kcycles / clock_ghz
  head = (
    f"{profile.kernel}: {profile.ctas} CTAs on {profile.sms} SMs, {profile.warpgroups} warpgroups; "
    f"a CTA spans {profile.span_kcycles:.1f} k cycles ({span_us:.2f} us at {clock_ghz} GHz)"
  )
  gap = profile.gap_us(clock_ghz)
  if profile.start_interval_us is not None:
    idle = "CTAs share SMs" if gap is None else f"idle between CTAs {gap:.2f} us"
    head += f"; a new CTA starts on an SM every {profile.start_interval_us:.2f} us ({idle})"
  lines = [head, f"  {'role':<9} {'region':<10} {'k cycles':>9} {'of span':>8}"]
  for (role, name), kcycles in sorted(profile.regions.items(), key=lambda kv: (kv[0][0], -kv[1])):
    lines.append(f"  {role:<9} {name:<10} {kcycles:>9.2f} {kcycles / profile.span_kcycles:>8.1%}")
  return "\n".join(lines)
