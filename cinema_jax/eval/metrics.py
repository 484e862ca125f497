"""Video metrics on uint8 RGB frames with numpy and OpenCV only: no network, no weights (see docs/eval.md).

Letters: T frames, H height, W width, C = 3 channels, N histogram bins. Frames are RGB uint8
[T, H, W, C] throughout.

Metrics that compare neighbouring frames (flicker, motion smoothness, dynamic degree, consistency, drift) are
computed shot by shot, so a hard cut between shots never counts as flicker or motion, then averaged over shots
weighted by their frame counts, as VBench-Long does (dynamic degree is the fraction of dynamic shots). SSIM and
PSNR compare a video with a reference frame by frame and ignore shots.

Scores follow VBench's formulas where one exists (temporal flickering exactly; dynamic degree, motion smoothness and
the consistencies with classical stand-ins for its networks) and FramePack's start-versus-end drift.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Callable, Sequence

import cv2
import numpy as np
from tqdm import tqdm

# ---------------------------------------------------------------------------------------------------------------
# Settings. Every number the metrics use is here, with the reason for its value.

# VBench's dynamic degree subsamples videos to about 8 fps (every round(fps / 8)-th frame) before the flow.
DYNAMIC_FPS = 8.0
# Pair score = mean flow magnitude of the fastest 5% of pixels (VBench).
TOP_FRACTION = 0.05
# A pair moves when its score exceeds THRESHOLD_PER_256 * min(H, W) / 256 pixels (times 8 / fps below 8 fps, as
# VBench does). VBench uses 6.0 with RAFT; with Farneback we use 1.4, i.e. 0.35 px per sampled pair at 64 px, set on
# synthetic shapes of known speed (see docs/eval.md): a textured pan reads 1.0x its speed, a disc covering 3% of a
# 64 x 96 frame 0.93-0.95x, one covering 0.8% about 0.8x, so 0.5 px per pair counts as motion for all three,
# 0.25 px for none. Identical frames are never measured (they score 0); decoded static H.264 scores at most
# ~0.25 px, pixel noise of sigma 5 ~0.2 px (sigma 10, ~0.4 px, does count). VBench's 1.5 px at 64 px would call
# most slow pans of small videos static.
THRESHOLD_PER_256 = 1.4
# A shot is dynamic when at least round(4 T' / 16) (at least 1) of its sampled pairs move, T' = sampled frames.
COUNT_FRACTION = 4 / 16
# Farneback dense flow with the parameters of OpenCV's optical-flow tutorial; 3 pyramid levels suit 64 px frames.
FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)
# Consistency proxies: HSV histograms with 12 hue x 4 saturation x 4 value bins (OpenCV hue runs 0..180).
HIST_BINS = (12, 4, 4)
# The subject is the central CENTRE_FRACTION of the height and of the width (a quarter of the area); the
# background is the ring around it.
CENTRE_FRACTION = 0.5
# FramePack's drift compares the first and the last 15% of the frames.
DRIFT_FRACTION = 0.15
# SSIM of Wang et al. (2004): 11 x 11 Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03, L = 255.
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
# Identical frames have infinite PSNR; each frame's PSNR is capped here so the mean stays a number (and JSON valid).
PSNR_CAP_DB = 100.0
# BT.601 luma weights for SSIM (the usual choice of video SSIM tools), applied unrounded in float64.
LUMA = np.array([0.299, 0.587, 0.114])

KEYS = (
  "temporal_flickering",
  "dynamic_degree",
  "motion_smoothness",
  "subject_consistency_proxy",
  "background_consistency_proxy",
  "drift",
  "num_shots",
)


# ---------------------------------------------------------------------------------------------------------------
# Input checks.


def check_frames(frames, name: str = "frames") -> np.ndarray:
  """Returns ``frames`` as an array after checking it is uint8 RGB [T, H, W, 3] with T >= 1."""
  frames = np.asarray(frames)
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
    raise ValueError(f"{name}: expected uint8 RGB frames [T, H, W, 3] with T >= 1, got {frames.dtype} {frames.shape}")
  return frames


def check_shots(shots: Sequence[Sequence[int]] | None, num_frames: int) -> list[tuple[int, int]]:
  """Frame ranges [start, end) sorted, non-empty, non-overlapping and inside the video; None = one shot."""
  if shots is None:
    return [(0, num_frames)]
  out = []
  for shot in shots:
    try:
      start, end = (int(x) for x in shot)
    except (TypeError, ValueError) as e:
      raise ValueError(f"shots: each shot is a (start, end) frame range, got {shot!r}") from e
    if not 0 <= start < end <= num_frames:
      raise ValueError(f"shots: range {(start, end)} is empty or outside the video's {num_frames} frames")
    if out and start < out[-1][1]:
      raise ValueError(f"shots: range {(start, end)} overlaps or precedes {out[-1]} (ranges must be sorted)")
    out.append((start, end))
  if not out:
    raise ValueError("shots: no shot given")
  return out


# ---------------------------------------------------------------------------------------------------------------
# Per-shot metrics: each takes the frames of one shot and returns None when the shot is too short for it.


def temporal_flickering(frames: np.ndarray) -> float | None:
  """VBench: (255 - mean_t mean |x_{t+1} - x_t|) / 255 over all pixels and channels; 1.0 = no change at all.

  VBench scores only videos that its RAFT static filter finds static; here every shot is scored (a moving shot
  flickers by its motion too), so compare videos of similar motion. Needs 2 frames.
  """
  if len(frames) < 2:
    return None
  total = sum(float(cv2.absdiff(a, b).sum(dtype=np.float64)) for a, b in zip(frames[:-1], frames[1:], strict=True))
  return (255.0 - total / ((len(frames) - 1) * frames[0].size)) / 255.0


def _gray(frame: np.ndarray) -> np.ndarray:
  return cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)


def flow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Farneback flow [H, W, 2] (dx, dy) from RGB frame ``a`` to ``b``: a(p) ~ b(p + flow(p))."""
  f = FARNEBACK
  return cv2.calcOpticalFlowFarneback(
    _gray(a), _gray(b), None, f["pyr_scale"], f["levels"], f["winsize"], f["iterations"], f["poly_n"],
    f["poly_sigma"], f["flags"],
  )  # fmt: skip


def motion_score(a: np.ndarray, b: np.ndarray) -> float:
  """VBench's pair score: mean flow magnitude (px) of the fastest TOP_FRACTION of pixels.

  Identical frames score 0 without a flow: Farneback reports up to ~0.2 px near the borders of two identical
  textured frames, and a static video must score exactly 0.
  """
  if np.array_equal(a, b):
    return 0.0
  magnitude = np.hypot(*np.moveaxis(flow(a, b), -1, 0)).ravel()
  k = max(1, int(magnitude.size * TOP_FRACTION))
  return float(np.partition(magnitude, magnitude.size - k)[-k:].mean())


def dynamic_threshold(height: int, width: int, fps: float = DYNAMIC_FPS) -> float:
  """Pixels per sampled pair above which a pair moves (VBench's rule, recalibrated for Farneback). Below 8 fps the
  threshold grows by 8 / fps, as in VBench: the pairs of a slower video are further apart in time."""
  return max(1.0, DYNAMIC_FPS / fps) * THRESHOLD_PER_256 * min(height, width) / 256.0


def sample_interval(fps: float) -> int:
  """VBench's frame step for ~8 fps: max(1, round(fps / 8))."""
  return max(1, round(fps / DYNAMIC_FPS))


def dynamic(frames: np.ndarray, fps: float) -> dict | None:
  """VBench dynamic degree of one shot: subsample to ~8 fps, score each pair (``motion_score``); the shot is dynamic
  when at least max(1, round(4 T' / 16)) pairs exceed ``dynamic_threshold``. Returns {dynamic, moving_pairs,
  needed_pairs, motion} (motion = mean pair score, px) or None below 2 sampled frames."""
  sampled = frames[:: sample_interval(fps)]
  if len(sampled) < 2:
    return None
  scores = np.array([motion_score(a, b) for a, b in zip(sampled[:-1], sampled[1:], strict=True)])
  moving = int((scores > dynamic_threshold(*frames.shape[1:3], fps)).sum())
  needed = max(1, round(COUNT_FRACTION * len(sampled)))
  return {"dynamic": moving >= needed, "moving_pairs": moving, "needed_pairs": needed, "motion": float(scores.mean())}


def interpolate_average(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """The middle frame as the mean of its neighbours (ghosts anything that moves)."""
  return np.round(0.5 * (a.astype(np.float32) + b.astype(np.float32))).astype(np.uint8)


def interpolate_warp(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """The middle frame from Farneback flows both ways, each neighbour warped half way and the two averaged.

  Flows from the middle frame are not known; they are approximated from the neighbours' flows as in Super SloMo
  at t = 1/2: F(mid -> a) = (F(b -> a) - F(a -> b)) / 4 = -F(mid -> b), exact for uniform linear motion.
  Identical neighbours predict themselves (see ``motion_score`` on Farneback's border offsets).
  """
  if np.array_equal(a, b):
    return a.copy()
  to_a = 0.25 * (flow(b, a) - flow(a, b))  # [h, w, 2]
  h, w = a.shape[:2]
  gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))

  def warp(image, offset):
    return cv2.remap(
      image, gx + offset[..., 0], gy + offset[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    ).astype(np.float32)

  return np.round(0.5 * (warp(a, to_a) + warp(b, -to_a))).astype(np.uint8)


INTERPOLATORS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
  "warp": interpolate_warp,
  "average": interpolate_average,
}


def motion_smoothness(frames: np.ndarray, method: str = "warp") -> float | None:
  """VBench's motion smoothness with a classical interpolator for AMT: keep the even frames, predict each odd frame
  from its two neighbours, score (255 - mean |odd - predicted|) / 255. ``method``: warp (Farneback half-flow,
  default) or average. Needs 3 frames."""
  if method not in INTERPOLATORS:
    raise ValueError(f"motion_smoothness: unknown method {method!r}; choose one of {', '.join(INTERPOLATORS)}")
  if len(frames) < 3:
    return None
  interpolate = INTERPOLATORS[method]
  errors = [
    float(cv2.absdiff(frames[i], interpolate(frames[i - 1], frames[i + 1])).mean())
    for i in range(1, len(frames) - 1, 2)
  ]
  return (255.0 - float(np.mean(errors))) / 255.0


def hsv_histogram(region: np.ndarray) -> np.ndarray:
  """Unit feature [N] of an RGB region: square root of its normalised HSV histogram, so that the cosine of two
  features is the Bhattacharyya coefficient of the histograms (1 = same colours, 0 = disjoint)."""
  hsv = cv2.cvtColor(np.ascontiguousarray(region), cv2.COLOR_RGB2HSV)
  hist = cv2.calcHist([hsv], [0, 1, 2], None, list(HIST_BINS), [0, 180, 0, 256, 0, 256]).ravel().astype(np.float64)
  return np.sqrt(hist / hist.sum())


def centre_box(height: int, width: int) -> tuple[slice, slice]:
  """Rows and columns of the central CENTRE_FRACTION of the frame (at least one pixel each way)."""
  ch, cw = max(1, round(height * CENTRE_FRACTION)), max(1, round(width * CENTRE_FRACTION))
  y0, x0 = (height - ch) // 2, (width - cw) // 2
  return slice(y0, y0 + ch), slice(x0, x0 + cw)


def subject_features(frames: np.ndarray) -> np.ndarray:
  """[T, N] HSV-histogram features of the centre region, where the subject of a shot usually is."""
  rows, cols = centre_box(*frames.shape[1:3])
  return np.stack([hsv_histogram(f[rows, cols]) for f in frames])


def background_features(frames: np.ndarray) -> np.ndarray:
  """[T, N] HSV-histogram features of the ring around the centre region (the whole frame if there is none)."""
  h, w = frames.shape[1:3]
  rows, cols = centre_box(h, w)
  ring = np.ones((h, w), bool)
  ring[rows, cols] = False
  if not ring.any():
    ring[:] = True
  return np.stack([hsv_histogram(f[ring][:, None]) for f in frames])  # a [pixels, 1, 3] "image" of the ring


def consistency(features: np.ndarray) -> float | None:
  """VBench's consistency of unit features [T, N]: 1/(T-1) sum_{t>=1} (max(0, cos(f_{t-1}, f_t)) +
  max(0, cos(f_0, f_t))) / 2. Needs 2 frames."""
  if len(features) < 2:
    return None
  previous = np.clip(np.sum(features[:-1] * features[1:], axis=-1), 0.0, 1.0)
  first = np.clip(features[1:] @ features[0], 0.0, 1.0)
  return float(np.mean(0.5 * (previous + first)))


def subject_consistency_proxy(frames: np.ndarray) -> float | None:
  """Consistency of the centre region's colours: a classical proxy for VBench's DINO subject consistency."""
  return consistency(subject_features(frames))


def background_consistency_proxy(frames: np.ndarray) -> float | None:
  """Consistency of the border region's colours: a classical proxy for VBench's CLIP background consistency."""
  return consistency(background_features(frames))


def drift_window(num_frames: int) -> int:
  """Frames in each of FramePack's start and end windows: round(15% of T), at least 1."""
  return max(1, round(DRIFT_FRACTION * num_frames))


def start_end_drift(values: np.ndarray) -> float | None:
  """FramePack's |M(first 15%) - M(last 15%)| of a per-frame score M [T] (means over each window). Needs 2 frames."""
  if len(values) < 2:
    return None
  k = drift_window(len(values))
  return abs(float(np.mean(values[:k])) - float(np.mean(values[-k:])))


def sharpness(frames: np.ndarray) -> np.ndarray:
  """Per-frame M [T]: log2(1 + variance of the 3 x 3 Laplacian of the grey frame). On a log scale a given relative
  change reads the same on plain and on busy content: one unit = sharpness doubled or halved."""
  return np.array([math.log2(1.0 + cv2.Laplacian(_gray(f), cv2.CV_64F).var()) for f in frames])


def drift(frames: np.ndarray) -> float | None:
  """Clarity drift (FramePack's M = clarity, with Laplacian variance for MUSIQ): the start-versus-end difference of
  ``sharpness``, in doublings. Blur accumulating over a rollout, or noise creeping in, raises it; camera moves over
  the same scenery barely do."""
  return start_end_drift(sharpness(frames))


def colour_similarity_to_start(frames: np.ndarray) -> np.ndarray:
  """Per-frame M [T]: Bhattacharyya coefficient of the frame's HSV histogram with the mean histogram of the first
  15% of the frames (1 = the same colours as the opening)."""
  hists = np.stack([hsv_histogram(f) ** 2 for f in frames])  # [t, n] probabilities
  opening = hists[: drift_window(len(frames))].mean(axis=0)
  return np.sqrt(hists * opening).sum(axis=-1)


def drift_colour(frames: np.ndarray) -> float | None:
  """Colour drift: the start-versus-end difference of ``colour_similarity_to_start``, in [0, 1]. Colour casts,
  saturation or exposure creeping in raise it, but so does new scenery entering a moving shot."""
  return start_end_drift(colour_similarity_to_start(frames))


# ---------------------------------------------------------------------------------------------------------------
# Against a reference video (frame by frame; shots play no part).


def check_reference(frames: np.ndarray, reference: np.ndarray) -> None:
  if frames.shape != reference.shape:
    t, h, w = reference.shape[:3]
    raise ValueError(
      f"reference has {t} frames of {w}x{h} but the video has {frames.shape[0]} frames of "
      f"{frames.shape[2]}x{frames.shape[1]}: SSIM and PSNR need the same frame count and size"
    )


def ssim_frame(a: np.ndarray, b: np.ndarray) -> float:
  """SSIM of two RGB frames on their luma (BT.601, unrounded): Gaussian-window means, variances and covariance,
  SSIM map ((2 mu_a mu_b + C1)(2 cov + C2)) / ((mu_a^2 + mu_b^2 + C1)(var_a + var_b + C2)), averaged over the
  pixels whose window lies inside the frame (all pixels when the frame is smaller than the window)."""
  x, y = a.astype(np.float64) @ LUMA, b.astype(np.float64) @ LUMA

  def blur(z):
    return cv2.GaussianBlur(z, (SSIM_WINDOW, SSIM_WINDOW), SSIM_SIGMA)

  c1, c2 = (SSIM_K1 * 255.0) ** 2, (SSIM_K2 * 255.0) ** 2
  mx, my = blur(x), blur(y)
  vx, vy, cov = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
  smap = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
  pad = SSIM_WINDOW // 2
  if smap.shape[0] > 2 * pad and smap.shape[1] > 2 * pad:
    smap = smap[pad:-pad, pad:-pad]
  return float(smap.mean())


def ssim(frames: np.ndarray, reference: np.ndarray) -> float:
  """Mean over frames of ``ssim_frame``; 1.0 exactly for identical videos."""
  check_reference(frames, reference)
  return float(np.mean([ssim_frame(a, b) for a, b in zip(frames, reference, strict=True)]))


def psnr_frame(a: np.ndarray, b: np.ndarray) -> float:
  """10 log10(255^2 / MSE) over all pixels and channels, capped at PSNR_CAP_DB (identical frames)."""
  mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
  return PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, 10.0 * math.log10(255.0**2 / mse))


def psnr(frames: np.ndarray, reference: np.ndarray) -> float:
  """Mean over frames of ``psnr_frame`` (dB); PSNR_CAP_DB for identical videos."""
  check_reference(frames, reference)
  return float(np.mean([psnr_frame(a, b) for a, b in zip(frames, reference, strict=True)]))


# ---------------------------------------------------------------------------------------------------------------
# Whole videos.

# Per-shot metrics aggregated with frame weights: name -> function of the shot's frames.
SHOT_METRICS: dict[str, Callable[[np.ndarray], float | None]] = {
  "temporal_flickering": temporal_flickering,
  "motion_smoothness": motion_smoothness,
  "subject_consistency_proxy": subject_consistency_proxy,
  "background_consistency_proxy": background_consistency_proxy,
  "drift": drift,
  "drift_colour": drift_colour,
}


def frame_weighted(values: Sequence[float | None], weights: Sequence[int]) -> float | None:
  """Mean of the defined values weighted by their shots' frame counts; None when no shot defines the metric."""
  pairs = [(v, w) for v, w in zip(values, weights, strict=True) if v is not None]
  if not pairs:
    return None
  return float(sum(v * w for v, w in pairs) / sum(w for _, w in pairs))


def evaluate_frames(
  frames: np.ndarray,
  fps: float,
  *,
  shots: Sequence[Sequence[int]] | None = None,
  reference: np.ndarray | None = None,
  progress: bool = False,
) -> dict:
  """All metrics of one video: a dict of JSON types (see docs/eval.md for every key).

  ``frames``: uint8 RGB [T, H, W, 3]; ``fps``: its frame rate (dynamic degree subsamples to ~8 fps); ``shots``:
  frame ranges [start, end) (None = one shot; ``evaluate_video`` detects them); ``reference``: frames of the same
  shape for ``ssim`` and ``psnr``. Keys: ``KEYS``, then ssim and psnr with a reference, then num_frames, fps,
  width, height, dynamic_threshold (px per sampled pair), drift_colour and ``shots`` (one dict per shot: start,
  end, each per-shot metric, dynamic and its pair counts). A metric no shot is long enough for is None.
  """
  frames = check_frames(frames)
  try:
    rate = float(fps)
  except (TypeError, ValueError):
    rate = math.nan
  if not (math.isfinite(rate) and rate > 0):
    raise ValueError(f"fps: expected a positive frame rate, got {fps!r}")
  fps = rate
  ranges = check_shots(shots, len(frames))
  if reference is not None:
    check_reference(frames, check_frames(reference, "reference"))
  per_shot = []
  with tqdm(total=len(frames), desc="eval", unit="frame", disable=not progress, leave=False) as bar:
    for start, end in ranges:
      clip = frames[start:end]
      row = {"start": start, "end": end, **{name: fn(clip) for name, fn in SHOT_METRICS.items()}}
      row.update(dynamic(clip, fps) or dict.fromkeys(("dynamic", "moving_pairs", "needed_pairs", "motion")))
      per_shot.append(row)
      bar.update(end - start)
  weights = [r["end"] - r["start"] for r in per_shot]
  judged = [r["dynamic"] for r in per_shot if r["dynamic"] is not None]
  out = {name: frame_weighted([r[name] for r in per_shot], weights) for name in SHOT_METRICS}
  result = {
    "temporal_flickering": out["temporal_flickering"],
    "dynamic_degree": float(np.mean(judged)) if judged else None,
    "motion_smoothness": out["motion_smoothness"],
    "subject_consistency_proxy": out["subject_consistency_proxy"],
    "background_consistency_proxy": out["background_consistency_proxy"],
    "drift": out["drift"],
    "num_shots": len(ranges),
  }
  if reference is not None:
    result["ssim"] = ssim(frames, reference)
    result["psnr"] = psnr(frames, reference)
  t, h, w = frames.shape[:3]
  result.update(
    num_frames=t, fps=float(fps), width=w, height=h, dynamic_threshold=dynamic_threshold(h, w, fps),
    drift_colour=out["drift_colour"], shots=per_shot,
  )  # fmt: skip
  return result


def _read(path: pathlib.Path, progress: bool):
  """(frames, VideoInfo) of a video file; ingest.BadInput names the file and the reason when it cannot be used."""
  from cinema_jax.data import ingest  # imported on use: it loads the shard writers, which metrics on arrays skip

  if not path.exists():
    raise ingest.BadInput(path, "no such file")
  if path.is_dir():
    raise ingest.BadInput(path, "is a directory, not a video")
  if path.stat().st_size == 0:
    raise ingest.BadInput(path, "empty file (0 bytes)")
  return ingest.read_video(path, progress=progress)


def evaluate_video(
  path: str | pathlib.Path,
  reference: str | pathlib.Path | None = None,
  *,
  shots: Sequence[Sequence[int]] | None = None,
  progress: bool = False,
  **detector_options,
) -> dict:
  """``evaluate_frames`` of a video file: decodes it (whole, in memory: for the small videos of this project),
  detects its shots with PySceneDetect (``ingest.detect_shots``; ``detector_options`` go to it) unless ``shots`` is
  given, and compares it with the ``reference`` file when one is given. Adds ``path`` (and ``reference``).

  Raises ``cinema_jax.data.ingest.BadInput`` for a missing, empty or undecodable file and ValueError when the
  reference's frame count or size differs.
  """
  from cinema_jax.data import ingest

  path = pathlib.Path(path)
  frames, info = _read(path, progress)
  ref = None
  if reference is not None:
    reference = pathlib.Path(reference)
    ref, _ = _read(reference, progress)
    try:
      check_reference(frames, ref)
    except ValueError as e:
      raise ValueError(f"{reference} vs {path}: {e}") from None
  if shots is None:
    shots = ingest.detect_shots(path, num_frames=info.frames, **detector_options)
  result = evaluate_frames(frames, info.fps, shots=shots, reference=ref, progress=progress)
  result["path"] = str(path)
  if reference is not None:
    result["reference"] = str(reference)
  return result
