"""LongVie control maps: global depth normalisation, depth estimators, KLT point tracks, point-map rendering and
the data-level degradations.

Letters: F frames of a whole video, T frames of a clip, N points, H x W pixels, C channels.

Depth convention. Estimators return *relative inverse depth* (disparity: larger = nearer), which is what Video Depth
Anything's relative models write. ``normalize_depth_global`` then maps it with the 5th/95th percentiles of the whole
video to [0, 1] with near = 0 (black) and far = 1, LongVie's polarity; wrong polarity is worse than no control.

Point maps (LongVie): black background; each tracked point is a filled square whose side is ``size_fraction`` x
the smallest distance between two points at the clip's first frame; its colour is fixed at the first frame from
the point's 3-D position, R = norm(x0), G = norm(y0), B = norm(1 / z0), with norm the 2nd-98th percentile
normalisation over the clip's points (x0, y0 in pixels; 1 / z0 is the disparity at the point). Farther points are
drawn first (smaller disparity at the current frame), so nearer ones cover them. Lost points are not drawn.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Sequence
from typing import Protocol

import cv2
import numpy as np

# ---------------------------------------------------------------------------------------------------------------
# Depth.


def normalize_depth_global(depth: np.ndarray) -> np.ndarray:
  """LongVie's global normalisation: p5, p95 over every value of the video; clip; (p95 - d) / (p95 - p5).

  ``depth`` is inverse depth (disparity, larger = nearer) of any shape, usually [F, H, W]. Returns float32 in
  [0, 1] with near = 0. A constant input (p95 == p5) maps to zeros. Equals ``normalize_depth(d,
  *depth_percentiles(d))``, which ingest uses to normalise one clip at a time with the whole video's percentiles.
  """
  return normalize_depth(depth, *depth_percentiles(depth))


def depth_percentiles(depth: np.ndarray) -> tuple[float, float]:
  """(p5, p95) over every value of ``depth`` (the whole video's inverse depth)."""
  d = np.asarray(depth, np.float64)
  if d.size == 0:
    raise ValueError("normalize_depth_global: empty depth array")
  if not np.isfinite(d).all():
    raise ValueError("normalize_depth_global: depth holds NaN or inf")
  p5, p95 = np.percentile(d, [5, 95])
  return float(p5), float(p95)


def normalize_depth(depth: np.ndarray, p5: float, p95: float) -> np.ndarray:
  """(p95 - clip(d, p5, p95)) / (p95 - p5) as float32 in [0, 1] (near = 0); zeros when p95 <= p5."""
  d = np.asarray(depth, np.float64)
  if p95 <= p5:
    return np.zeros(d.shape, np.float32)
  return ((p95 - np.clip(d, p5, p95)) / (p95 - p5)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class VideoFrames:
  """What ingest hands a depth estimator instead of decoded pixels: the video and its decoded shape [F, H, W, 3].
  Ingest streams and never holds a whole video; an estimator that needs the pixels reads ``path`` itself."""

  path: pathlib.Path
  shape: tuple[int, int, int, int]


class DepthError(ValueError):
  """A depth source that exists but cannot be used (wrong size, unreadable)."""


class DepthEstimator(Protocol):
  """Inverse depth for a decoded video.

  ``__call__(video_path, frames)``: ``frames`` uint8 [F, H, W, 3] as decoded, or (from ingest) a ``VideoFrames``
  with only the path and that shape; an estimator that needs pixels decodes ``video_path`` itself, streaming.
  Returns float32 [F, H, W] (larger = nearer), or None when this estimator has nothing for the video (then the
  video gets no control maps). Raises ``DepthError`` when a depth source exists but does not fit. A model-based
  estimator (a Video Depth Anything port) implements this same call.
  """

  def __call__(self, video_path: pathlib.Path, frames: np.ndarray | VideoFrames) -> np.ndarray | None: ...


def _check_shape(depth: np.ndarray, frames: np.ndarray, source: pathlib.Path) -> np.ndarray:
  """Depth [F, H, W] for ``frames`` [F, H', W', 3]: the frame count must match; a smaller or larger map of the same
  aspect (within 2 %, e.g. an estimator run with a maximum resolution) is resized bilinearly; anything else is a
  mismatch."""
  if depth.ndim == 4 and depth.shape[-1] == 1:
    depth = depth[..., 0]
  want = tuple(frames.shape[:3])
  if depth.ndim == 3 and depth.shape[0] == want[0] and depth.shape[1:] != want[1:]:
    (h, w), (vh, vw) = depth.shape[1:], want[1:]
    if abs(w / h - vw / vh) <= 0.02 * vw / vh:
      depth = np.stack([cv2.resize(d, (vw, vh), interpolation=cv2.INTER_LINEAR) for d in depth.astype(np.float32)])
  if depth.shape != want:
    raise DepthError(
      f"control size mismatch: depth in {source.name} has shape {tuple(depth.shape)}, "
      f"the video has {want} (frames, height, width)"
    )
  return depth


@dataclasses.dataclass(frozen=True)
class SyntheticDepth:
  """The ground-truth z-buffer of a synthetic film (``NAME.gt.npz``, key ``depth``), returned as 1 / z."""

  def __call__(self, video_path: pathlib.Path, frames: np.ndarray) -> np.ndarray | None:
    source = pathlib.Path(video_path).with_suffix(".gt.npz")
    if not source.exists():
      return None
    try:
      with np.load(source) as data:
        z = data["depth"].astype(np.float32)
    except (OSError, KeyError, ValueError) as e:
      raise DepthError(f"cannot read ground-truth depth {source.name}: {e}") from e
    return 1.0 / np.maximum(_check_shape(z, frames, source), 1e-6)


@dataclasses.dataclass(frozen=True)
class PrecomputedDepth:
  """Depth written beside the video by an external estimator.

  Looks for ``STEM_depths.npz`` (key ``depths``: what Video Depth Anything's ``run.py --save_npz`` writes), then
  ``STEM.depth.npz`` (key ``depth`` or the only array) and ``STEM.depth.npy``. The array is [F, H, W] (or
  [F, H, W, 1]) with one map per decoded frame (run Video Depth Anything with ``--target_fps -1``); a map at another
  resolution of the same aspect (``--max_res``) is resized to the frame. ``metric=True`` for metric-depth models
  (larger = farther): the values are inverted to disparity.
  """

  metric: bool = False

  def __call__(self, video_path: pathlib.Path, frames: np.ndarray) -> np.ndarray | None:
    stem = pathlib.Path(video_path).with_suffix("")
    candidates = (
      (stem.with_name(stem.name + "_depths.npz"), "depths"),
      (stem.with_name(stem.name + ".depth.npz"), "depth"),
      (stem.with_name(stem.name + ".depth.npy"), None),
    )
    found = [(source, key) for source, key in candidates if source.exists()]
    if not found:
      return None
    source, key = found[0]
    try:
      if key is None:
        depth = np.load(source)
      else:
        with np.load(source) as data:
          names = list(data.keys())
          depth = data[key] if key in names else data[names[0]]
    except (OSError, KeyError, ValueError, IndexError) as e:
      raise DepthError(f"cannot read depth {source.name}: {e}") from e
    depth = _check_shape(np.asarray(depth, np.float32), frames, source)
    return 1.0 / np.maximum(depth, 1e-6) if self.metric else depth


@dataclasses.dataclass(frozen=True)
class AutoDepth:
  """Synthetic ground truth if present, else precomputed depth, else none."""

  metric: bool = False

  def __call__(self, video_path: pathlib.Path, frames: np.ndarray) -> np.ndarray | None:
    depth = SyntheticDepth()(video_path, frames)
    return depth if depth is not None else PrecomputedDepth(self.metric)(video_path, frames)


@dataclasses.dataclass(frozen=True)
class NoDepth:
  """No control maps."""

  def __call__(self, video_path: pathlib.Path, frames: np.ndarray) -> np.ndarray | None:
    return None


DEPTH_ESTIMATORS = {"auto": AutoDepth, "synthetic": SyntheticDepth, "precomputed": PrecomputedDepth, "none": NoDepth}


def get_depth_estimator(name: str, **options) -> DepthEstimator:
  """The estimator ``name``; options it has no field for (``metric`` of a synthetic or absent depth) are ignored."""
  if name not in DEPTH_ESTIMATORS:
    raise KeyError(f"unknown depth estimator {name!r}; choose one of {', '.join(DEPTH_ESTIMATORS)}")
  cls = DEPTH_ESTIMATORS[name]
  accepted = {f.name for f in dataclasses.fields(cls)}
  return cls(**{k: v for k, v in options.items() if k in accepted})


# ---------------------------------------------------------------------------------------------------------------
# Point tracks.


@dataclasses.dataclass(frozen=True)
class Tracks:
  """xy float32 [N, T, 2] (x, y pixels; NaN once lost) and visible bool [N, T]."""

  xy: np.ndarray
  visible: np.ndarray


def query_points(
  frame: np.ndarray, method: str = "grid", grid: Sequence[int] = (16, 12), max_points: int = 200
) -> np.ndarray:
  """Starting points [N, 2] on a frame [H, W(, 3)]: a cols x rows ``grid`` of cell centres (LongVie uses 70 x 70),
  or ``features`` (Shi-Tomasi corners, at most ``max_points``)."""
  h, w = frame.shape[:2]
  if method == "grid":
    cols, rows = grid
    xs = (np.arange(cols) + 0.5) * w / cols - 0.5
    ys = (np.arange(rows) + 0.5) * h / rows - 0.5
    return np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2).astype(np.float32)
  if method == "features":
    gray = _gray(frame)
    corners = cv2.goodFeaturesToTrack(gray, maxCorners=max_points, qualityLevel=0.01, minDistance=max(2, w // 40))
    return np.zeros((0, 2), np.float32) if corners is None else corners.reshape(-1, 2).astype(np.float32)
  raise ValueError(f"unknown query point method {method!r}; choose grid or features")


def _gray(frame: np.ndarray) -> np.ndarray:
  return cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) if frame.ndim == 3 else frame


def track_points(
  frames: np.ndarray,
  points: np.ndarray | None = None,
  *,
  fb_threshold: float = 1.0,
  window: int = 11,
  levels: int = 2,
  method: str = "grid",
  grid: Sequence[int] = (16, 12),
) -> Tracks:
  """Pyramidal Lucas-Kanade from frame to frame with a forward-backward check.

  ``frames`` uint8 [T, H, W, 3] (or grey [T, H, W]); ``points`` [N, 2] at frame 0 (default: ``query_points``).
  A point is lost (NaN, invisible from then on) when LK fails either way, its forward-backward error exceeds
  ``fb_threshold`` pixels, or it leaves the frame.
  """
  gray = [_gray(f) for f in frames]
  t_len = len(gray)
  h, w = gray[0].shape
  p0 = query_points(frames[0], method, grid) if points is None else np.asarray(points, np.float32).reshape(-1, 2)
  xy = np.full((len(p0), t_len, 2), np.nan, np.float32)
  visible = np.zeros((len(p0), t_len), bool)
  xy[:, 0], visible[:, 0] = p0, True
  lk = dict(
    winSize=(window, window), maxLevel=levels, criteria=(cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 30, 0.01)
  )
  for t in range(1, t_len):
    alive = np.flatnonzero(visible[:, t - 1])
    if not len(alive):
      break
    prev = xy[alive, t - 1].reshape(-1, 1, 2)
    nxt, ok, _ = cv2.calcOpticalFlowPyrLK(gray[t - 1], gray[t], prev, None, **lk)
    back, ok_back, _ = cv2.calcOpticalFlowPyrLK(gray[t], gray[t - 1], nxt, None, **lk)
    fb = np.linalg.norm(back.reshape(-1, 2) - prev.reshape(-1, 2), axis=-1)
    nxt = nxt.reshape(-1, 2)
    inside = (nxt[:, 0] >= 0) & (nxt[:, 0] <= w - 1) & (nxt[:, 1] >= 0) & (nxt[:, 1] <= h - 1)
    keep = ok.ravel().astype(bool) & ok_back.ravel().astype(bool) & (fb <= fb_threshold) & inside
    xy[alive[keep], t] = nxt[keep]
    visible[alive[keep], t] = True
  return Tracks(xy, visible)


# ---------------------------------------------------------------------------------------------------------------
# Point maps.


def _percentile_norm(v: np.ndarray, lo: float = 2.0, hi: float = 98.0) -> np.ndarray:
  a, b = np.percentile(v, [lo, hi])
  if b <= a:
    return np.full(v.shape, 0.5, np.float32)
  return np.clip((v - a) / (b - a), 0, 1).astype(np.float32)


def point_colours(xy0: np.ndarray, disparity0: np.ndarray) -> np.ndarray:
  """uint8 [N, 3] colours from first-frame positions [N, 2] and disparities [N]: (norm x0, norm y0, norm 1/z0)."""
  rgb = np.stack([_percentile_norm(xy0[:, 0]), _percentile_norm(xy0[:, 1]), _percentile_norm(disparity0)], -1)
  return np.round(rgb * 255).astype(np.uint8)


def _sample(image: np.ndarray, xy: np.ndarray) -> np.ndarray:
  h, w = image.shape[:2]
  col = np.clip(np.round(xy[:, 0]).astype(int), 0, w - 1)
  row = np.clip(np.round(xy[:, 1]).astype(int), 0, h - 1)
  return image[row, col]


def _smallest_distance(xy: np.ndarray, block: int = 512) -> float:
  """Smallest Euclidean distance between two of the points ``xy`` [N, 2] (N >= 2), in float64; rows in blocks so
  the distance matrix never exceeds ``block`` x N (LongVie's 70 x 70 grid is 4900 points)."""
  xy = np.asarray(xy, np.float64)
  best = math.inf
  for lo in range(0, len(xy), block):
    d = np.sqrt(((xy[lo : lo + block, None, :] - xy[None, :, :]) ** 2).sum(-1))
    rows = np.arange(lo, min(lo + block, len(xy)))
    d[rows - lo, rows] = math.inf  # not a point's distance to itself
    best = min(best, float(d.min()))
  return best


def render_point_map(tracks: Tracks, disparity: np.ndarray, size_fraction: float = 0.5) -> np.ndarray:
  """LongVie point maps, uint8 [T, H, W, 3], from tracks [N, T] and inverse depth ``disparity`` [T, H, W]."""
  t_len, h, w = disparity.shape
  out = np.zeros((t_len, h, w, 3), np.uint8)
  first = np.flatnonzero(tracks.visible[:, 0])
  if not len(first):
    return out
  xy0 = tracks.xy[first, 0]
  colours = point_colours(xy0, _sample(disparity[0], xy0))
  if len(first) > 1:
    gap = _smallest_distance(xy0)
  else:
    gap = float(min(h, w))
  half = max(size_fraction * gap, 1.0) / 2
  for t in range(t_len):
    seen = tracks.visible[first, t]
    idx = np.flatnonzero(seen)
    pts = tracks.xy[first[idx], t]
    order = np.argsort(_sample(disparity[t], pts), kind="stable")  # far (small disparity) first
    for i in order:
      x, y = pts[i]
      # Pixels whose centres fall in [x - half, x + half): a side of L pixels covers exactly L of them.
      lo = (int(np.ceil(x - half)), int(np.ceil(y - half)))
      hi = (int(np.ceil(x + half)) - 1, int(np.ceil(y + half)) - 1)
      cv2.rectangle(out[t], lo, hi, tuple(int(c) for c in colours[idx[i]]), thickness=-1)
  return out


# ---------------------------------------------------------------------------------------------------------------
# Data-level degradations (LongVie, applied to control maps in [0, 1] while training).

DEFAULT_SCALES = (1.0, 1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32)
DEFAULT_KERNELS = (3, 5, 7, 9, 11, 13, 15)


def _per_frame(x: np.ndarray, fn) -> np.ndarray:
  """Applies an [H, W, C] -> [H, W, C] cv2 function to every frame of [T, H, W, C] (cv2 drops a C = 1 axis)."""
  out = np.empty_like(x)
  for t in range(x.shape[0]):
    out[t] = fn(x[t]).reshape(x.shape[1:])
  return out


def random_scale_fusion(
  x: np.ndarray, rng: np.random.Generator, scales: Sequence[float] = DEFAULT_SCALES
) -> np.ndarray:
  """Drops one scale at random; each other scale s contributes bilinear down (to s x size) and back up, weighted by
  U(0, 1) draws normalised to sum 1. ``x`` float32 [T, H, W, C] in [0, 1]; the result is clamped to [0, 1]."""
  x = np.asarray(x, np.float32)
  _, h, w, _ = x.shape
  keep = [s for i, s in enumerate(scales) if i != int(rng.integers(len(scales)))]
  weights = rng.uniform(0, 1, len(keep))
  weights = weights / weights.sum() if weights.sum() > 0 else np.full(len(keep), 1 / len(keep))
  out = np.zeros_like(x)
  for s, wt in zip(keep, weights, strict=True):
    small = (max(1, round(w * s)), max(1, round(h * s)))
    down_up = lambda f, small=small: cv2.resize(  # noqa: E731
      cv2.resize(f, small, interpolation=cv2.INTER_LINEAR), (w, h), interpolation=cv2.INTER_LINEAR
    )
    out += np.float32(wt) * _per_frame(x, down_up)
  return np.clip(out, 0, 1)


def adaptive_average_blur(
  x: np.ndarray, rng: np.random.Generator, kernels: Sequence[int] = DEFAULT_KERNELS, reference_side: int = 480
) -> np.ndarray:
  """Box blur with an odd kernel drawn from ``kernels``, scaled by short side / ``reference_side`` (the paper's
  480-pixel frames) and kept odd and >= 3, so small maps are blurred as much, relatively, as large ones."""
  x = np.asarray(x, np.float32)
  k = int(kernels[int(rng.integers(len(kernels)))])
  k = max(3, int(round(k * min(x.shape[1:3]) / reference_side)) | 1)
  return np.clip(_per_frame(x, lambda f: cv2.blur(f, (k, k), borderType=cv2.BORDER_REFLECT_101)), 0, 1)


def degrade(
  x: np.ndarray,
  rng: np.random.Generator,
  prob: float = 0.10,
  scales: Sequence[float] = DEFAULT_SCALES,
  kernels: Sequence[int] = DEFAULT_KERNELS,
  reference_side: int = 480,
) -> np.ndarray:
  """With probability ``prob``: random scale fusion, average blur, or both (each a third of the time)."""
  x = np.asarray(x, np.float32)
  if rng.random() >= prob:
    return x
  choice = int(rng.integers(3))
  if choice in (0, 2):
    x = random_scale_fusion(x, rng, scales)
  if choice in (1, 2):
    x = adaptive_average_blur(x, rng, kernels, reference_side)
  return x
