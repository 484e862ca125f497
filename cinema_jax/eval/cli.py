"""``cinema-jax eval``: the metrics of one video, as a table or as one JSON object.

  cinema-jax eval VIDEO [--reference REF] [--json] [--quiet]

With ``--json`` stdout holds exactly one JSON object (progress bars go to stderr): the keys of
``metrics.evaluate_video`` (temporal_flickering, dynamic_degree, motion_smoothness, subject_consistency_proxy,
background_consistency_proxy, drift, num_shots, ssim and psnr with a reference, then the extras of docs/eval.md).
Exit status 0 on success, 2 on a usage error or a video that cannot be used (one line ``cinema-jax eval: PATH:
REASON`` on stderr). Also runs as ``python -m cinema_jax.eval.cli``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

PROG = "cinema-jax eval"

# (key, format, meaning) of the table's rows; keys missing from the result (ssim without a reference) are skipped.
ROWS = (
  ("temporal_flickering", "{:.4f}", "VBench score, 1 = no frame-to-frame change"),
  ("dynamic_degree", "{:.3f}", "fraction of shots with motion (Farneback)"),
  ("motion_smoothness", "{:.4f}", "1 = odd frames exactly interpolated from their neighbours"),
  ("subject_consistency_proxy", "{:.4f}", "centre colours kept over each shot (proxy)"),
  ("background_consistency_proxy", "{:.4f}", "border colours kept over each shot (proxy)"),
  ("drift", "{:.3f}", "clarity change, first vs last 15% of each shot (doublings)"),
  ("drift_colour", "{:.4f}", "colour change, first vs last 15% of each shot"),
  ("num_shots", "{}", "shots (PySceneDetect)"),
  ("ssim", "{:.4f}", "vs the reference, luma, mean over frames"),
  ("psnr", "{:.2f}", "dB vs the reference, mean over frames (capped at 100)"),
)


def format_table(result: dict) -> str:
  """The readable form of an ``evaluate_video`` result."""
  lines = [
    f"{result.get('path', 'video')}: {result['num_frames']} frames, {result['width']}x{result['height']} "
    f"@ {result['fps']:g} fps, {result['num_shots']} shots"
  ]
  if "reference" in result:
    lines.append(f"reference: {result['reference']}")
  width = max(len(k) for k, _, _ in ROWS)
  for key, fmt, meaning in ROWS:
    if key in result:
      value = "n/a" if result[key] is None else fmt.format(result[key])
      lines.append(f"  {key:<{width}}  {value:>8}  {meaning}")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
  parser = argparse.ArgumentParser(prog=PROG, description="Classical video metrics of one video (docs/eval.md).")
  parser.add_argument("video", help="the video file to evaluate")
  parser.add_argument(
    "--reference", default=None, metavar="REF", help="a video of the same frame count and size: adds SSIM, PSNR"
  )
  parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
  parser.add_argument("--quiet", action="store_true", help="no progress bars")
  args = parser.parse_args(list(argv))

  from cinema_jax.data.ingest import BadInput
  from cinema_jax.eval import metrics

  try:
    result = metrics.evaluate_video(args.video, args.reference, progress=not args.quiet)
  except (BadInput, ValueError) as e:
    print(f"{PROG}: {e}", file=sys.stderr)
    return 2
  if args.json:
    # allow_nan=False: an infinity or NaN would print as Infinity / NaN, which is not JSON; none is produced.
    print(json.dumps(result, allow_nan=False))
  else:
    print(format_table(result))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
