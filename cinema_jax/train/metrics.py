"""Training metrics: the finiteness guard, throughput and MFU, TensorBoard event files.

MFU (model FLOPs utilisation) = model FLOPs per second / (devices x peak FLOP/s per device). Model FLOPs are the
analytic estimate of ``tasks.flops_per_token`` (6 x parameters + attention), so recomputation by remat does not
count as useful work. The peak is a property of the chip (``train.peak_tflops``; e.g. 989 for an H100 SXM in bf16
dense), which the program cannot measure; without it MFU is not reported.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Mapping

GUARDED = ("loss", "grad_norm", "param_norm", "update_norm")


class NonFiniteError(FloatingPointError):
  """A loss or norm became NaN or infinite; training stopped."""


def check_finite(metrics: Mapping[str, float], step: int) -> None:
  """Raises NonFiniteError naming the step (0-based update index) and the first non-finite metric."""
  for name in GUARDED:
    if name in metrics and not math.isfinite(float(metrics[name])):
      raise NonFiniteError(
        f"training stopped: {name} is {float(metrics[name])} at step {step} "
        f"(other metrics: { {k: float(v) for k, v in metrics.items()} })"
      )


def throughput(
  step_time: float, tokens_per_step: int, flops_per_step: float, num_devices: int, peak_tflops: float | None
) -> dict[str, float]:
  """tokens/s, model TFLOP/s per device and (given a peak) MFU for one step of ``step_time`` seconds."""
  out = {
    "step_time": step_time,
    "tokens_per_s": tokens_per_step / step_time,
    "tflops_per_device": flops_per_step / step_time / num_devices / 1e12,
  }
  if peak_tflops:
    out["mfu"] = out["tflops_per_device"] / peak_tflops
  return out


class MetricsWriter:
  """Scalars to TensorBoard event files under ``workdir/tensorboard`` (only where ``enabled``: process 0)."""

  def __init__(self, workdir: str | pathlib.Path, enabled: bool):
    self.writer = None
    if enabled:
      from tensorboardX import SummaryWriter

      self.writer = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if self.writer is None:
      return
    for name, value in metrics.items():
      self.writer.add_scalar(f"train/{name}", float(value), step)

  def close(self) -> None:
    if self.writer is not None:
      self.writer.flush()
      self.writer.close()
