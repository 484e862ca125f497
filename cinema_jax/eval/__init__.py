"""Video metrics and story adherence (see docs/eval.md).

metrics.py: classical video metrics on uint8 RGB frames (VBench's temporal flickering, dynamic degree, motion
smoothness and consistency with classical stand-ins, FramePack drift, SSIM/PSNR) and ``evaluate_video``, which the
story pipeline stores as metrics.json; fvd.py: Frechet Video Distance (I3D from the optional ``fvd`` extra);
adherence.py: which cast members frames show and whether keyframes keep to the story; cli.py: ``cinema-jax eval``.
"""

from cinema_jax.eval.adherence import detect_characters, story_adherence

# The function fvd stays at cinema_jax.eval.fvd.fvd: exporting it here would hide the fvd module.
from cinema_jax.eval.fvd import MissingExtra, frechet_distance, i3d_features
from cinema_jax.eval.metrics import (
  KEYS,
  evaluate_frames,
  evaluate_video,
  psnr,
  ssim,
)

__all__ = [
  "KEYS",
  "MissingExtra",
  "detect_characters",
  "evaluate_frames",
  "evaluate_video",
  "frechet_distance",
  "i3d_features",
  "psnr",
  "ssim",
  "story_adherence",
]
