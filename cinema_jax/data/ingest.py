"""Ingest: videos -> shots, keyframes, captions, clips and control maps -> shards (see shards.py for the layout).

Per video: hash the file (the video id is stem + content hash, so a rerun recognises finished videos); probe it
with OpenCV (fps, size, announced frame count); detect shots with PySceneDetect reading the file itself (detector
and threshold from the config; by default ContentDetector, threshold 27, min_scene_len 15); caption every shot
through a captioner (sidecar files by default, see captions.py); plan one keyframe per shot and the clips (each shot
resampled to the target fps, cut into ``clip_frames`` frames ``clip_stride`` apart); then decode once,
sequentially, keeping only the frames needed, fitted to the target size as they arrive (centre crop to the aspect,
area resize), and compute each clip's control maps as soon as its last frame is in (depth normalised with the whole
video's percentiles, see control.DepthEstimator; KLT tracks; LongVie point maps). At most one decoded
full-resolution frame is alive at a time: memory does not grow with the video's resolution or its decoded length.
Results are written into a temporary folder and renamed when complete.

Bad input (missing, empty, unreadable, unsupported, corrupt or truncated video, missing caption, depth of the wrong
size) raises ``BadInput``; ``ingest`` reports it as one line ``skipped PATH: REASON`` and carries on with the
other files. Any other exception while a video is processed (which writes nothing) skips it the same way, as
``skipped PATH: TypeName: message``; errors while writing (a full disk) stop the run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import pathlib
import re
from collections.abc import Callable, Iterable, Iterator, Sequence

import cv2
import numpy as np
from tqdm import tqdm

from cinema_jax.data import captions as captions_lib
from cinema_jax.data import control, shards

# FFmpeg inside OpenCV prints its own complaints about broken files; ingest reports each bad file in one line
# instead (set the variable to another AV_LOG level to see them).
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
# PySceneDetect logs "Detecting scenes..." at INFO for every video; the progress bars already say so.
if logging.getLogger("pyscenedetect").level == logging.NOTSET:
  logging.getLogger("pyscenedetect").setLevel(logging.WARNING)


class BadInput(Exception):
  """A file that cannot be ingested; ``reason`` says why in a few words."""

  def __init__(self, path: str | pathlib.Path, reason: str):
    super().__init__(f"{path}: {reason}")
    self.path, self.reason = str(path), reason


@dataclasses.dataclass(frozen=True)
class VideoInfo:
  fps: float
  width: int
  height: int
  frames: int  # decoded frames (the header's count can be wrong)


# ---------------------------------------------------------------------------------------------------------------
# Decoding and shots.


def probe_video(path: str | pathlib.Path) -> tuple[float, int, int, int]:
  """(fps, the header's frame count, width, height) from the container and the first frame; decodes one frame.
  Raises BadInput when OpenCV cannot open the file, it has no frame rate or no frame decodes."""
  path = pathlib.Path(path)
  cap = cv2.VideoCapture(str(path))
  try:
    if not cap.isOpened():
      raise BadInput(path, "cannot decode: OpenCV cannot open it (corrupt file or unsupported codec)")
    fps = float(cap.get(cv2.CAP_PROP_FPS))
    announced = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    if not math.isfinite(fps) or fps <= 0:
      raise BadInput(path, f"cannot decode: no frame rate in the container (fps = {fps})")
    ok, frame = cap.read()  # the size as decoded (the header's can differ, e.g. for rotated videos)
    if not ok:
      raise BadInput(path, "cannot decode: no decodable frames")
    return fps, announced, frame.shape[1], frame.shape[0]
  finally:
    cap.release()


def iter_frames(
  path: str | pathlib.Path, stop: int | None = None, *, progress: bool = False
) -> Iterator[tuple[int, np.ndarray]]:
  """(index, RGB uint8 [H, W, 3]) of frames 0 .. stop - 1 (None: to the end), decoded one at a time; ends early
  when the file has fewer frames. Nothing here holds a frame after yielding it."""
  path = pathlib.Path(path)
  cap = cv2.VideoCapture(str(path))
  try:
    with tqdm(total=stop, desc=f"decode {path.name}", unit="frame", disable=not progress, leave=False) as bar:
      for i in itertools.count() if stop is None else range(stop):
        ok, frame = cap.read()
        if not ok:
          return
        frame = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        bar.update()
        yield i, frame
        del frame
  finally:
    cap.release()


def read_video(path: str | pathlib.Path, *, min_decoded_fraction: float = 0.9, progress: bool = False):
  """Decodes every frame: (RGB uint8 [F, H, W, 3], VideoInfo). Raises BadInput for what cannot be used.

  Holds the whole video in memory: for short videos and tests only (ingest streams, see ``process_video``). A video
  that decodes fewer than ``min_decoded_fraction`` of the frames its header announces is reported as truncated
  (0 turns the check off: some containers only estimate their frame count).
  """
  path = pathlib.Path(path)
  fps, announced, _, _ = probe_video(path)
  frames = [f for _, f in iter_frames(path, progress=progress)]
  if not frames:
    raise BadInput(path, "cannot decode: no decodable frames")
  _check_decoded(path, len(frames), announced, min_decoded_fraction)
  video = np.stack(frames)
  return video, VideoInfo(fps, video.shape[2], video.shape[1], len(frames))


def _check_decoded(path: pathlib.Path, decoded: int, announced: int, min_decoded_fraction: float) -> None:
  if announced > 0 and decoded < min_decoded_fraction * announced and announced - decoded > 2:
    raise BadInput(path, f"corrupt or truncated: decoded {decoded} of {announced} frames")


# name -> (PySceneDetect class, the keyword its threshold goes to)
DETECTORS = {
  "content": ("ContentDetector", "threshold"),
  "adaptive": ("AdaptiveDetector", "adaptive_threshold"),
  "threshold": ("ThresholdDetector", "threshold"),
  "histogram": ("HistogramDetector", "threshold"),
  "hash": ("HashDetector", "threshold"),
}


def detect_shots(
  path: str | pathlib.Path,
  *,
  detector: str = "content",
  threshold: float | None = None,
  min_scene_len: int = 15,
  num_frames: int | None = None,
  downscale: int | None = None,
  **detector_options,
) -> list[tuple[int, int]]:
  """Shot frame ranges (end exclusive) covering the video, from a PySceneDetect detector reading the file itself.

  ``detector``: content (HSV change; default threshold 27), adaptive, threshold (fades), histogram or hash;
  ``threshold`` goes to that detector's threshold argument (None = its default); other keywords go to the
  detector unchanged. ``num_frames`` (the decoded count, when known) clips the ranges to the decoded frames.
  ``downscale``: detect on frames shrunk by this integer factor (None = PySceneDetect's automatic factor, which
  keeps the width near 256 pixels; 1 = full resolution). PySceneDetect holds one frame at a time.
  """
  starts, processed = _run_detector(
    path, detector=detector, threshold=threshold, min_scene_len=min_scene_len, downscale=downscale,
    **detector_options,
  )  # fmt: skip
  return _ranges(starts, processed if num_frames is None else num_frames)


def _run_detector(
  path, *, detector, threshold, min_scene_len, downscale=None, progress=False, **detector_options
) -> tuple[list[int], int]:
  """(sorted shot starts including 0, frames PySceneDetect decoded)."""
  import scenedetect

  if detector not in DETECTORS:
    raise KeyError(f"unknown shot detector {detector!r}; choose one of {', '.join(DETECTORS)}")
  cls_name, threshold_key = DETECTORS[detector]
  options = dict(detector_options, min_scene_len=min_scene_len)
  if threshold is not None:
    options[threshold_key] = threshold
  try:
    video = scenedetect.open_video(str(path), backend="opencv")
  except Exception as e:  # scenedetect raises its own VideoOpenFailure, OSError, ...
    raise BadInput(path, f"cannot decode: PySceneDetect cannot open it ({type(e).__name__})") from e
  manager = scenedetect.SceneManager()
  if downscale is not None:
    manager.auto_downscale = False
    manager.downscale = int(downscale)
  manager.add_detector(getattr(scenedetect, cls_name)(**options))
  processed = manager.detect_scenes(video, show_progress=progress)
  starts = sorted({s.frame_num for s, _ in manager.get_scene_list(start_in_scene=True)} | {0})
  return starts, processed


def _ranges(starts: Sequence[int], total: int) -> list[tuple[int, int]]:
  starts = [s for s in starts if s < total]
  return [(a, b) for a, b in zip(starts, [*starts[1:], total], strict=True) if b > a]


def keyframe_index(frames: np.ndarray, start: int, end: int, policy: str = "middle") -> int:
  """The frame that stands for a shot: ``middle``, ``first`` or ``sharpest`` (largest variance of the Laplacian in
  the middle half of the shot, i.e. least motion blur)."""
  if policy == "middle":
    return (start + end - 1) // 2
  if policy == "first":
    return start
  if policy == "sharpest":
    lo, hi = start + (end - start) // 4, max(start + (3 * (end - start)) // 4, start + 1)
    scores = [cv2.Laplacian(cv2.cvtColor(frames[i], cv2.COLOR_RGB2GRAY), cv2.CV_64F).var() for i in range(lo, hi)]
    return lo + int(np.argmax(scores))
  raise ValueError(f"unknown keyframe policy {policy!r}; choose middle, first or sharpest")


def resample_indices(start: int, end: int, source_fps: float, target_fps: float) -> np.ndarray:
  """Source frames [start, end) sampled at ``target_fps`` (<= 0 keeps every frame): frame of time k / target_fps."""
  if target_fps <= 0:
    return np.arange(start, end)
  step = source_fps / target_fps
  count = int(math.floor((end - start - 1) / step + 1e-9)) + 1
  return start + np.floor(np.arange(count) * step + 1e-9).astype(np.int64)


def plan_clips(
  shots: Sequence[tuple[int, int]], source_fps: float, target_fps: float, clip_frames: int, clip_stride: int
) -> list[tuple[int, np.ndarray]]:
  """(shot index, source frame indices [clip_frames]) of every clip; clips never cross a cut."""
  clips = []
  for s, (start, end) in enumerate(shots):
    idx = resample_indices(start, end, source_fps, target_fps)
    for j in range(0, len(idx) - clip_frames + 1, clip_stride):
      clips.append((s, idx[j : j + clip_frames]))
  return clips


def fit_frames(frames: np.ndarray, size: Sequence[int], channels: bool = True) -> np.ndarray:
  """[..., H, W, C] (or [..., H, W] with ``channels=False``) -> [..., h, w(, C)]: centre crop to the aspect of
  ``size`` = (h, w), then resize (area when shrinking, bilinear when growing)."""
  h, w = size
  split = frames.ndim - (3 if channels else 2)
  lead, frame_shape = frames.shape[:split], frames.shape[split:]
  src_h, src_w = frame_shape[:2]
  if src_w * h > w * src_h:  # wider than the target: crop the sides
    cw, ch = int(round(src_h * w / h)), src_h
  else:
    cw, ch = src_w, int(round(src_w * h / w))
  x0, y0 = (src_w - cw) // 2, (src_h - ch) // 2
  interp = cv2.INTER_AREA if cw >= w and ch >= h else cv2.INTER_LINEAR
  out = np.empty((int(np.prod(lead, dtype=np.int64)), h, w, *frame_shape[2:]), frames.dtype)
  for i, f in enumerate(frames.reshape(-1, *frame_shape)):
    f = np.ascontiguousarray(f[y0 : y0 + ch, x0 : x0 + cw])
    out[i] = f if (ch, cw) == (h, w) else cv2.resize(f, (w, h), interpolation=interp).reshape(h, w, *frame_shape[2:])
  return out.reshape(*lead, h, w, *frame_shape[2:])


# ---------------------------------------------------------------------------------------------------------------
# One video.


def hash_file(path: pathlib.Path) -> str:
  digest = hashlib.sha1()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def video_id(path: pathlib.Path, sha1: str) -> str:
  stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", pathlib.Path(path).stem).strip("._") or "video"
  return f"{stem[:48]}-{sha1[:10]}"


def _check_file(path: pathlib.Path, extensions: Sequence[str]) -> str:
  """Fails fast on what needs no decoding; returns the content hash."""
  if not path.exists():
    raise BadInput(path, "no such file")
  if path.is_dir():
    raise BadInput(path, "is a directory, not a video")
  if path.suffix.lower() not in extensions:
    raise BadInput(path, f"unsupported file type {path.suffix or '(none)'!r} (video types: {', '.join(extensions)})")
  try:
    if path.stat().st_size == 0:
      raise BadInput(path, "empty file (0 bytes)")
    return hash_file(path)
  except PermissionError as e:
    raise BadInput(path, "unreadable: permission denied") from e
  except OSError as e:
    raise BadInput(path, f"unreadable: {e.strerror or e}") from e


@dataclasses.dataclass
class IngestedVideo:
  """Everything ingest writes for one video (before it is written)."""

  manifest: dict
  film_record: dict
  clip_records: list[dict]
  arrays: dict[str, np.ndarray]


def process_video(
  path: pathlib.Path,
  config,
  *,
  captioner: captions_lib.Captioner,
  depth_estimator: control.DepthEstimator,
  sha1: str | None = None,
  source: str | None = None,
  progress: bool = False,
) -> IngestedVideo:
  """Cuts, captions and computes control maps for one video (``config`` = the ``ingest`` section); writes nothing.

  Streams: PySceneDetect reads the file for the shots (and the decoded frame count), then one sequential decode up
  to the last frame any clip or keyframe needs keeps only what is needed, fitted to the target size as it arrives:
  the keyframes, and the frames of the clips not yet complete. A clip's control maps are computed as soon as its
  last frame is decoded. At most one decoded full-resolution frame is alive at a time. ``source`` is the name the
  manifest records (default: the file name).
  """
  path = pathlib.Path(path)
  sha1 = sha1 or _check_file(path, tuple(config.extensions))
  vid = video_id(path, sha1)
  fps, announced, width, height = probe_video(path)
  starts, decoded = _run_detector(
    path, detector=config.detector, threshold=config.threshold, min_scene_len=config.min_scene_len,
    downscale=config.get("detect_downscale") if hasattr(config, "get") else None, progress=progress,
  )  # fmt: skip
  if decoded == 0:
    raise BadInput(path, "cannot decode: no decodable frames")
  _check_decoded(path, decoded, announced, config.min_decoded_fraction)
  info = VideoInfo(fps, width, height, decoded)
  shots = _ranges(starts, decoded)
  try:
    text = captioner(path, shots, info.fps)
  except captions_lib.MissingCaption as e:
    raise BadInput(path, str(e)) from e
  try:
    # Estimators get the video's shape, not its pixels (a model-based one reads the file itself).
    disparity = depth_estimator(path, control.VideoFrames(path, (decoded, height, width, 3)))
  except control.DepthError as e:
    raise BadInput(path, str(e)) from e
  clips = plan_clips(shots, info.fps, config.fps, config.clip_frames, config.clip_stride)
  clip_size, key_size = tuple(config.clip_size), tuple(config.keyframe_size)
  t, (h, w) = config.clip_frames, clip_size
  has_control = disparity is not None and len(clips) > 0
  arrays = {
    "keyframes": np.zeros((len(shots), *key_size, 3), np.uint8),
    "frames": np.zeros((len(clips), t, h, w, 3), np.uint8),
  }
  if has_control:
    depth_range = control.depth_percentiles(disparity)  # over the whole video, before cutting
    grid = tuple(config.track_grid)
    arrays["depth"] = np.zeros((len(clips), t, h, w), np.float16)
    arrays["points"] = np.zeros((len(clips), t, h, w, 3), np.uint8)
    num_points = grid[0] * grid[1] if config.track_method == "grid" else config.track_max_points
    arrays["tracks"] = np.full((len(clips), num_points, t, 2), np.nan, np.float32)

  def cut_clip(i: int, idx: np.ndarray, small: dict[int, np.ndarray]) -> None:
    arrays["frames"][i] = np.stack([small[j] for j in idx])
    if not has_control:
      return
    clip_disparity = np.asarray(disparity[idx], np.float32)
    normalized = control.normalize_depth(clip_disparity, *depth_range)
    arrays["depth"][i] = fit_frames(normalized, clip_size, channels=False).astype(np.float16)
    clip_disparity = fit_frames(clip_disparity, clip_size, channels=False)
    points = control.query_points(arrays["frames"][i, 0], config.track_method, grid, config.track_max_points)
    tracks = control.track_points(
      arrays["frames"][i], points, fb_threshold=config.track_fb_threshold, window=config.track_window,
      levels=config.track_levels,
    )  # fmt: skip
    arrays["points"][i] = control.render_point_map(tracks, clip_disparity, config.point_size)
    arrays["tracks"][i, : len(points)] = tracks.xy

  key_idx = _stream_cut(path, shots, clips, config.keyframe, key_size, clip_size, arrays["keyframes"], cut_clip,
                        decoded, progress)  # fmt: skip
  film_record = {
    "video": vid,
    "shots": [list(s) for s in shots],
    "captions": text.shots,
    "synopsis": text.synopsis,
    "keyframes": key_idx,
  }
  clip_records = [
    {"video": vid, "clip": i, "shot": s, "caption": text.shots[s], "frames": idx.tolist(), "fps": config.fps}
    for i, (s, idx) in enumerate(clips)
  ]
  manifest = {
    "id": vid,
    "source": source if source is not None else path.name,
    "sha1": sha1,
    "info": dataclasses.asdict(info),
    "shots": [list(s) for s in shots],
    "captions": text.shots,
    "synopsis": text.synopsis,
    "keyframes": key_idx,
    "num_clips": len(clips),
    "clip_shots": [s for s, _ in clips],
    "has_control": has_control,
    "arrays": {name: list(a.shape) for name, a in arrays.items()},
  }
  return IngestedVideo(manifest, film_record, clip_records, arrays)


def _stream_cut(
  path: pathlib.Path,
  shots: Sequence[tuple[int, int]],
  clips: Sequence[tuple[int, np.ndarray]],
  policy: str,
  key_size: tuple[int, int],
  clip_size: tuple[int, int],
  keyframes_out: np.ndarray,
  cut_clip: Callable[[int, np.ndarray, dict[int, np.ndarray]], None],
  decoded: int,
  progress: bool,
) -> list[int]:
  """One sequential decode: fills ``keyframes_out`` and calls ``cut_clip(i, idx, small)`` as soon as clip i's last
  frame has arrived (``small`` maps source index -> frame at ``clip_size``). Returns the keyframe indices."""
  if policy not in ("middle", "first", "sharpest"):
    raise ValueError(f"unknown keyframe policy {policy!r}; choose middle, first or sharpest")
  # Keyframe candidates per shot: one fixed frame, or the middle half scored by sharpness as it streams past.
  candidates = {}  # frame -> shot
  for s, (a, b) in enumerate(shots):
    if policy == "sharpest":
      lo, hi = a + (b - a) // 4, max(a + (3 * (b - a)) // 4, a + 1)
      candidates.update((j, s) for j in range(lo, hi))
    else:
      candidates[keyframe_index(None, a, b, policy)] = s
  best = [(-math.inf, -1)] * len(shots)  # (score, frame) per shot
  last_use: dict[int, int] = {}  # source frame -> last clip that needs it
  ends: dict[int, list[int]] = {}  # source frame -> clips that are complete once it has arrived
  for i, (_, idx) in enumerate(clips):
    for j in idx.tolist():
      last_use[j] = i
    ends.setdefault(int(idx[-1]), []).append(i)
  stop = max([*candidates, *last_use, -1]) + 1  # nothing after the last needed frame is decoded
  small: dict[int, np.ndarray] = {}
  seen = 0
  for j, frame in iter_frames(path, stop, progress=progress):
    seen = j + 1
    s = candidates.get(j)
    if s is not None:
      score = 0.0
      if policy == "sharpest":
        score = cv2.Laplacian(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var()
      if score > best[s][0]:  # strictly larger: the first of equal scores wins, as argmax
        best[s] = (score, j)
        keyframes_out[s] = fit_frames(frame[None], key_size)[0]
    if j in last_use:
      small[j] = fit_frames(frame[None], clip_size)[0]
    del frame
    for i in ends.get(j, ()):
      cut_clip(i, clips[i][1], small)
      for k in clips[i][1].tolist():
        if last_use.get(k) == i:
          small.pop(k, None)
  if seen < stop:  # the detector read more frames than this decode could
    raise BadInput(path, f"corrupt or truncated: decoded {seen} of {decoded} frames")
  return [f for _, f in best]


def write_video(root: pathlib.Path, video: IngestedVideo) -> None:
  """Writes one video's shards into a temporary folder and publishes it with a rename."""
  with shards.atomic_video_dir(root, video.manifest["id"]) as folder:
    shards.write_records(folder / "films.array_record", [video.film_record])
    shards.write_records(folder / "clips.array_record", video.clip_records)
    for name, array in video.arrays.items():
      shards.write_array(folder / f"{name}.zarr", array)
    shards.write_json(folder / shards.VIDEO_MANIFEST, video.manifest)


# ---------------------------------------------------------------------------------------------------------------
# Many videos.


@dataclasses.dataclass
class IngestReport:
  ingested: list[str] = dataclasses.field(default_factory=list)  # ids written by this run
  present: list[str] = dataclasses.field(default_factory=list)  # ids already in the data set (skipped, not bad)
  skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (path, reason) of bad input

  @property
  def ok(self) -> bool:
    """True when the data set holds at least one of the given videos."""
    return bool(self.ingested or self.present)


def expand_sources(paths: Iterable[str | pathlib.Path], extensions: Sequence[str]) -> list[tuple[pathlib.Path, str]]:
  """(file, source name) for every input: files as given, named by their file name; folders expand (recursively,
  sorted) to the video files inside them, named by their path relative to the folder. Hidden names are left out of
  folders (temporary files of writers in progress). The source name is what manifests record, so the shards do not
  depend on where the inputs lie."""
  out, seen = [], set()
  for p in map(pathlib.Path, paths):
    found = [(p, p.name)]
    if p.is_dir():
      found = sorted(
        (f, f.relative_to(p).as_posix())
        for f in p.rglob("*")
        if f.is_file() and f.suffix.lower() in extensions and not any(x.startswith(".") for x in f.relative_to(p).parts)
      )
    for f, name in found:
      key = f.resolve() if f.exists() else f
      if key not in seen:
        seen.add(key)
        out.append((f, name))
  return out


def expand_paths(paths: Iterable[str | pathlib.Path], extensions: Sequence[str]) -> list[pathlib.Path]:
  """The files of ``expand_sources``."""
  return [f for f, _ in expand_sources(paths, extensions)]


class SettingsMismatch(ValueError):
  """The output folder holds a data set ingested with other settings."""


def settings_of(config) -> dict:
  """The ingest settings as stored in the manifest (JSON types)."""
  return json.loads(json.dumps(config.to_dict() if hasattr(config, "to_dict") else dict(config)))


def ingest(
  paths: Iterable[str | pathlib.Path],
  out_dir: str | pathlib.Path,
  config=None,
  *,
  captioner: captions_lib.Captioner | None = None,
  depth_estimator: control.DepthEstimator | None = None,
  progress: bool = True,
  on_skip: Callable[[str], None] | None = None,
) -> IngestReport:
  """Ingests videos (files or folders) into the data set at ``out_dir``; see the module docstring.

  ``config`` is the ``ingest`` section of configs/data.py (default: its default variant). ``on_skip`` receives the
  report line of every bad file as it happens. Raises SettingsMismatch when ``out_dir`` was ingested with other
  settings (mixing them would make one data set out of incompatible clips).
  """
  if config is None:
    from cinema_jax import config as config_lib

    config = config_lib.load_config("configs/data.py").ingest
  root = pathlib.Path(out_dir)
  shards.videos_dir(root).mkdir(parents=True, exist_ok=True)
  settings = settings_of(config)
  manifest_path = root / shards.MANIFEST
  if manifest_path.exists():
    old = json.loads(manifest_path.read_text(encoding="utf-8")).get("settings")
    if old != settings:
      diff = sorted(k for k in set(old or {}) | set(settings) if (old or {}).get(k) != settings.get(k))
      raise SettingsMismatch(f"{root} was ingested with other settings ({', '.join(diff)} differ); use another --out")
  shards.clean_partial(root)
  captioner = captioner or captions_lib.get_captioner(config.captioner)
  depth_estimator = depth_estimator or control.get_depth_estimator(config.depth, metric=config.depth_metric)
  extensions = tuple(e.lower() for e in config.extensions)
  report = IngestReport()
  files = expand_sources(paths, extensions)
  for path, source in tqdm(files, desc="ingest", unit="video", disable=not progress or len(files) < 2):
    try:
      sha1 = _check_file(path, extensions)
      vid = video_id(path, sha1)
      if shards.is_finished(root, vid):
        report.present.append(vid)
        continue
      video = process_video(
        path,
        config,
        captioner=captioner,
        depth_estimator=depth_estimator,
        sha1=sha1,
        source=source,
        progress=progress,
      )
    except Exception as e:  # noqa: BLE001 - nothing is written yet: any failure here is about this input
      reason = e.reason if isinstance(e, BadInput) else f"{type(e).__name__}: {e}"
      report.skipped.append((str(path), reason))
      if on_skip is not None:
        on_skip(f"skipped {path}: {reason}")
      continue
    write_video(root, video)  # outside the try: a failing write (full disk) is not bad input and stops the run
    shards.write_manifest(root, settings)
    report.ingested.append(vid)
  shards.write_manifest(root, settings)
  return report
