"""Story adherence on the synthetic world: which cast members a frame shows, and whether keyframes keep to the story.

The synthetic world (``cinema_jax.data.synthetic``) has a fixed cast, each character a flat-coloured polygon of its
own shape and colour, over textured backdrops. Frames made by a small generator are blurry, noisy approximations of
it, so characters are found by colour, which survives that far better than outlines do:

1. A 3 x 3 median takes out per-pixel noise. Every pixel then goes to the nearest (CIE76 distance in Lab) of the cast
   colours and the backdrop colours of the shot's setting (given, else the setting whose backdrop explains the frame
   best, ``guess_setting``); a pixel farther than ``COLOUR_TOLERANCE`` from every cast colour is backdrop. Competing
   with the backdrop is what keeps desert sand from reading as Cyd's yellow or a dark forest floor as Hob's black.
2. Per cast colour, a closing then an opening (3 x 3 at 64 rows) remove specks and one-pixel rims of mixed colour;
   connected components whose opened core keeps at least ``min_area`` pixels are blobs.
3. Blobs that belong to another blob are dropped: its eyes (every character has two, white with black pupils) and
   rims of mixed colour that blur leaves around it (violet on a pale sky reads as pink).
4. The largest remaining blob of each cast colour is a detection. Its shape is the cast outline that best overlaps it
   once scaled to the blob's area and centred on its centroid (no shape for a blob cut by the frame's border).

A character is present when its colour is; shapes at this size are a few pixels across, so shape accuracy is reported
apart (docs/adherence.md has the thresholds and the measured accuracy).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import cv2
import numpy as np

from cinema_jax.data import synthetic

COLOUR_TOLERANCE = 30.0  # Lab units: farther than this from every cast colour is never a character
MIN_AREA_FRACTION = 0.0025  # default min_area = this x H x W (16 pixels at 64 x 96; the smallest cast member ~55)
EYE_AREA = 0.15  # an eye-coloured blob at most this times a blob's area ... (two eyes are < 0.08 of any character)
EYE_INSIDE = 0.7  # ... and this much inside its convex hull is that character's eyes
RIM_WIDTH = 2  # pixels at 64 rows: mixed colour along an edge reaches this far after blur and resampling ...
RIM_INSIDE = 0.7  # ... so a blob this much within RIM_WIDTH of another (and more than the other of it) is a rim
BACKDROP_CELL = 4.0  # Lab units: backdrop colours are pooled in cells this wide ...
BACKDROP_MIN_SHARE = 5e-4  # ... and a cell rarer than this share of the backdrop is dropped (keeps rare extremes,
# e.g. the darkest specks of the forest floor, from swallowing Hob's black)
SETTING_CAP = 20.0  # Lab units: a pixel explained by no colour of a setting costs this much, however far it is
SHAPE_MIN_IOU = 0.5  # below this overlap with every outline the shape is unknown


@dataclasses.dataclass(frozen=True)
class Detection:
  """One cast colour found in a frame: its largest blob."""

  name: str  # the cast member whose colour matched
  colour: str
  shape: str | None  # best-fitting outline; None when the blob is cut by the border or fits no outline
  area: int  # pixels
  centroid: tuple[float, float]  # x, y
  bbox: tuple[int, int, int, int]  # x, y, width, height
  mean_rgb: tuple[float, float, float]  # of the blob's interior


# ---------------------------------------------------------------------------------------------------------------
# Pixels -> colour classes.


def _to_lab(rgb) -> np.ndarray:
  """uint8 RGB [..., 3] -> float32 Lab [..., 3] (L in [0, 100])."""
  rgb = np.asarray(rgb)
  flat = rgb.reshape(-1, 1, 3).astype(np.float32) / 255.0
  return cv2.cvtColor(flat, cv2.COLOR_RGB2LAB).reshape(*rgb.shape[:-1], 3)


def _sq_dist(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Squared distances float32 [n, m] between rows of x [n, 3] and y [m, 3].

  Channel by channel rather than as a matmul: a product with 3 inner terms gains nothing from BLAS, whose threads
  only contend on a busy host.
  """
  x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
  d = np.zeros((len(x), len(y)), np.float32)
  for k in range(3):
    d += np.square(x[:, k, None] - y[None, :, k])
  return d


@functools.cache
def backdrop_colours(setting: synthetic.Setting) -> np.ndarray:
  """Lab colours [P, 3] covering the setting's backdrop (sky, clouds, textured ground).

  Taken from the generator itself: the whole world rendered with no characters at 96 x 64, tile by tile; colours are
  pooled in Lab cells and the rare cells dropped.
  """
  width, height = 96, 64
  spec = synthetic.FilmSpec(0, "", width, height, 12.0, (), "", 4)
  tiles = []
  for i in range(synthetic.WORLD_SCALE[0]):
    for j in range(synthetic.WORLD_SCALE[1]):
      centre = ((i + 0.5) * width, (j + 0.5) * height)
      shot = synthetic.Shot(setting, (), "static", (centre, centre), (1.0, 1.0), 1, "")
      tiles.append(synthetic.render_frame(spec, shot, 0)[0].reshape(-1, 3))
  lab = _to_lab(np.concatenate(tiles)).astype(np.float64)
  cells = np.floor(lab / BACKDROP_CELL).astype(np.int64)
  _, inverse, counts = np.unique(cells, axis=0, return_inverse=True, return_counts=True)
  inverse = inverse.reshape(-1)
  sums = np.zeros((len(counts), 3))
  np.add.at(sums, inverse, lab)
  keep = counts >= BACKDROP_MIN_SHARE * len(lab)
  colours = (sums[keep] / counts[keep, None]).astype(np.float32)
  colours.flags.writeable = False  # cached and shared by every caller
  return colours


def guess_setting(
  frame: np.ndarray,
  *,
  cast: Sequence[synthetic.Character] = synthetic.CAST,
  settings: Sequence[synthetic.Setting] = synthetic.SETTINGS,
) -> synthetic.Setting:
  """The setting whose backdrop colours (with the cast's) explain the frame best: least mean capped Lab distance."""
  frame = _check_frame(frame, "frame")
  lab = _to_lab(_denoise(frame)[::2, ::2]).reshape(-1, 3)  # a quarter of the pixels decides as well
  d_cast = _sq_dist(lab, _cast_lab(_check_cast(cast))).min(1)
  costs = [
    np.minimum(np.minimum(_sq_dist(lab, backdrop_colours(s)).min(1), d_cast), SETTING_CAP**2).mean() for s in settings
  ]
  return settings[int(np.argmin(costs))]


def _cast_lab(cast: tuple[synthetic.Character, ...]) -> np.ndarray:
  return _to_lab(np.array([c.rgb for c in cast], np.uint8))


def _denoise(frame: np.ndarray) -> np.ndarray:
  """A 3 x 3 median: removes per-pixel noise yet keeps flat-colour edges sharp (no rims of mixed colour)."""
  return cv2.medianBlur(frame, 3)


def classify_pixels(
  frame: np.ndarray, *, cast: Sequence[synthetic.Character] = synthetic.CAST, setting: synthetic.Setting | None = None
) -> np.ndarray:
  """int32 [H, W]: the index in ``cast`` of each pixel's colour, -1 for backdrop (nearest colour wins)."""
  frame = _check_frame(frame, "frame")
  cast = _check_cast(cast)
  _check_setting(setting, "setting")
  lab = _to_lab(_denoise(frame)).reshape(-1, 3)
  d_cast = _sq_dist(lab, _cast_lab(cast))
  best = d_cast.argmin(1)
  d_best = d_cast[np.arange(len(lab)), best]
  if setting is None:
    setting = guess_setting(frame, cast=cast)
  d_back = _sq_dist(lab, backdrop_colours(setting)).min(1)
  labels = np.where((d_best <= COLOUR_TOLERANCE**2) & (d_best < d_back), best, -1)
  return labels.reshape(frame.shape[:2]).astype(np.int32)


# ---------------------------------------------------------------------------------------------------------------
# Colour classes -> blobs -> detections.


@dataclasses.dataclass
class _Blob:
  index: int  # into the cast
  mask: np.ndarray  # bool [H, W]
  area: int
  outline: np.ndarray | None = None  # bool [H, W], the mask with its holes filled
  hull: np.ndarray | None = None  # bool [H, W], the convex hull grown by one pixel
  near: np.ndarray | None = None  # bool [H, W], the mask grown by RIM_WIDTH


def _blobs(labels: np.ndarray, num_colours: int, min_area: int, kernel: np.ndarray) -> list[_Blob]:
  """Components of each colour class joined by a closing; those whose opened core keeps min_area pixels."""
  blobs = []
  for k in range(num_colours):
    mask = (labels == k).astype(np.uint8)
    if mask.sum() < min_area:
      continue
    closed = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)
    core = cv2.morphologyEx(closed, cv2.MORPH_OPEN, kernel)
    count, comp = cv2.connectedComponents(closed, connectivity=8)
    core_area = np.bincount(comp[core > 0], minlength=count)
    for i in np.nonzero(core_area >= min_area)[0]:
      if i:
        blob = (comp == i) & (mask > 0)  # the closing only joins; a blob's pixels are the ones of its colour
        blobs.append(_Blob(k, blob, int(blob.sum())))
  return sorted(blobs, key=lambda b: -b.area)


def _outline_and_hull(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The mask with its holes filled; its convex hull grown by one pixel."""
  contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
  outline = np.zeros(mask.shape, np.uint8)
  cv2.drawContours(outline, contours, -1, 1, thickness=-1)
  hull = np.zeros(mask.shape, np.uint8)
  cv2.fillPoly(hull, [cv2.convexHull(np.concatenate(contours))], 1)
  return outline > 0, cv2.dilate(hull, np.ones((3, 3), np.uint8)) > 0


def _characters(blobs: list[_Blob], eye_colours: set[int], rim_width: int) -> list[_Blob]:
  """Blobs that are neither eyes nor rims of another blob; the largest per colour.

  Eyes: every character has two white eyes with black pupils. They are told by colour, size and place (inside the
  hull, not the outline: they stick out of the star's and the triangle's sides); a character of any other colour is
  never taken for a feature, so a large false blob on a backdrop cannot swallow a real character.
  Rims: blur mixes colours along edges (violet on pale sky reads as pink), a band hugging the blob it came from.
  """
  grow = np.ones((2 * rim_width + 1, 2 * rim_width + 1), np.uint8)
  for blob in blobs:
    blob.outline, blob.hull = _outline_and_hull(blob.mask)
    blob.near = cv2.dilate(blob.mask.astype(np.uint8), grow) > 0

  def eye_of(b: _Blob, a: _Blob) -> bool:
    return b.index in eye_colours and b.area <= EYE_AREA * a.area and a.hull[b.mask].mean() >= EYE_INSIDE

  def rim_of(b: _Blob, a: _Blob) -> bool:
    inside = a.near[b.mask].mean()
    return inside >= RIM_INSIDE and inside > b.near[a.mask].mean()

  kept = [b for b in blobs if not any(eye_of(b, a) or rim_of(b, a) for a in blobs if a.index != b.index)]
  seen, out = set(), []
  for blob in kept:  # largest first
    if blob.index not in seen:
      seen.add(blob.index)
      out.append(blob)
  return out


def _eye_colours(cast: tuple[synthetic.Character, ...]) -> set[int]:
  """Cast indices of the colours eyes are drawn in: those nearest white and black, when near enough."""
  d = _sq_dist(_to_lab(np.array([[255, 255, 255], [0, 0, 0]], np.uint8)), _cast_lab(cast))
  return {int(i) for i, di in zip(d.argmin(1), d.min(1), strict=True) if di <= COLOUR_TOLERANCE**2}


@functools.cache
def _outline(shape: str) -> tuple[np.ndarray, float, np.ndarray]:
  """A cast shape's unit outline [V, 2] (the generator's own), its area and its centroid."""
  poly = np.asarray(synthetic._shape_polygon(shape), np.float64)
  x, y = poly[:, 0], poly[:, 1]
  cross = x * np.roll(y, -1) - np.roll(x, -1) * y
  area = cross.sum() / 2
  centroid = np.array([((x + np.roll(x, -1)) * cross).sum(), ((y + np.roll(y, -1)) * cross).sum()]) / (6 * area)
  return poly, abs(area), centroid


def _raster(points: np.ndarray, size: tuple[int, int], ss: int = 4) -> np.ndarray:
  """Coverage float32 [h, w] of a polygon given in pixel coordinates (pixel centres at integers)."""
  h, w = size
  canvas = np.zeros((h * ss, w * ss), np.uint8)
  fixed = np.round(((points + 0.5) * ss - 0.5) * 16).astype(np.int32)  # 4 fractional bits
  cv2.fillPoly(canvas, [fixed], 255, lineType=cv2.LINE_8, shift=4)
  return cv2.resize(canvas, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def _guess_shape(mask: np.ndarray, shapes: Sequence[str]) -> str | None:
  """The outline (among ``shapes``) overlapping the filled blob best, at the blob's area and centroid."""
  ys, xs = np.nonzero(mask)
  h, w = mask.shape
  if xs.min() == 0 or ys.min() == 0 or xs.max() == w - 1 or ys.max() == h - 1:
    return None  # cut by the border: its outline is not the character's
  pad = int(math.ceil(0.5 * math.sqrt(len(xs)))) + 2  # room for a fitted outline larger than the blob
  x0, y0 = xs.min() - pad, ys.min() - pad
  size = (ys.max() - y0 + pad + 1, xs.max() - x0 + pad + 1)
  target = np.zeros(size, np.float32)
  target[ys - y0, xs - x0] = 1.0
  centre = np.array([xs.mean() - x0, ys.mean() - y0])
  best, best_iou = None, SHAPE_MIN_IOU
  for shape in shapes:
    poly, area, centroid = _outline(shape)
    cover = _raster(centre + math.sqrt(len(xs) / area) * (poly - centroid), size)
    iou = np.minimum(cover, target).sum() / np.maximum(cover, target).sum()
    if iou > best_iou:
      best, best_iou = shape, iou
  return best


def detect_characters(
  frame: np.ndarray,
  *,
  cast: Sequence[synthetic.Character] = synthetic.CAST,
  setting: synthetic.Setting | None = None,
  min_area: int | None = None,
) -> list[Detection]:
  """Cast members visible in ``frame`` (uint8 RGB [H, W, 3]), one per colour found, largest blob first.

  ``setting``: the shot's setting, whose backdrop colours compete with the cast's; None guesses it from the frame.
  ``min_area``: pixels a blob keeps after cleanup; default ``MIN_AREA_FRACTION * H * W`` (16 at 64 x 96), at least 4.
  """
  frame = _check_frame(frame, "frame")
  cast = _check_cast(cast)
  h, w, _ = frame.shape
  if min_area is None:
    min_area = max(4, round(MIN_AREA_FRACTION * h * w))
  elif isinstance(min_area, bool) or not isinstance(min_area, int | np.integer) or min_area < 1:
    raise ValueError(f"min_area must be a positive int of pixels, got {min_area!r}")
  labels = classify_pixels(frame, cast=cast, setting=setting)
  shapes = tuple(dict.fromkeys(c.shape for c in cast))
  out = []
  scale = max(1, round(h / 64))  # cleanup sizes are set for the generator's 64 rows
  kernel = np.ones((2 * scale + 1, 2 * scale + 1), np.uint8)
  blobs = _blobs(labels, len(cast), int(min_area), kernel)
  for blob in _characters(blobs, _eye_colours(cast), RIM_WIDTH * scale):
    character = cast[blob.index]
    ys, xs = np.nonzero(blob.mask)
    x, y, bw, bh = cv2.boundingRect(blob.mask.astype(np.uint8))
    interior = cv2.erode(blob.mask.astype(np.uint8), kernel) > 0  # edge pixels mix with what is around
    mean = frame[interior if interior.any() else blob.mask].mean(0)
    out.append(
      Detection(
        name=character.name,
        colour=character.colour,
        shape=_guess_shape(blob.outline, shapes),
        area=blob.area,
        centroid=(float(xs.mean()), float(ys.mean())),
        bbox=(int(x), int(y), int(bw), int(bh)),
        mean_rgb=(float(mean[0]), float(mean[1]), float(mean[2])),
      )
    )
  return out


# ---------------------------------------------------------------------------------------------------------------
# Story-level scores.


def story_adherence(
  keyframes: Sequence[np.ndarray],
  expected: Sequence[Sequence[str]],
  *,
  settings: Sequence[synthetic.Setting | None] | None = None,
  cast: Sequence[synthetic.Character] = synthetic.CAST,
) -> dict:
  """How well keyframes (one per shot) show the characters their captions name.

  Returns a dict:
    presence: fraction of (shot, captioned character) pairs whose character's colour is detected in the keyframe.
    keyframes_with_all_present: fraction of keyframes showing every character their caption names.
    colour_consistency: over characters captioned in >= 2 shots, the fraction of their appearances after the first
      (n - 1 per character) seen in the colour of their reference appearance (the first where they are seen at all).
      A character is seen in its own colour when detected, else in the colour of an uncaptioned blob it is matched
      to (same shape first, then the largest). An appearance where it is not seen counts as inconsistent, so a
      missing first appearance costs one, and the next sighting becomes the reference.
    shape_accuracy: over detected captioned characters with a shape guess, the fraction whose shape is right.
    shapes_guessed: fraction of detected captioned characters with a shape guess.
    per_shot: per keyframe, dict(found, missing, extra (colours of uncaptioned blobs), seen (name -> colour or
      None), shapes (name -> guessed shape)).
  A score with nothing to average over is NaN.
  """
  cast = _check_cast(cast)
  if len(keyframes) != len(expected):
    raise ValueError(f"keyframes and expected must pair up, got {len(keyframes)} keyframes and {len(expected)} shots")
  if settings is None:
    settings = [None] * len(keyframes)
  elif len(settings) != len(keyframes):
    raise ValueError(f"settings must give one setting (or None) per keyframe, got {len(settings)} for {len(keyframes)}")
  by_name = {c.name: c for c in cast}
  keyframes = [_check_frame(frame, f"keyframes[{i}]") for i, frame in enumerate(keyframes)]
  for i, (names, setting) in enumerate(zip(expected, settings, strict=True)):
    _check_names(names, by_name, f"expected[{i}]")
    _check_setting(setting, f"settings[{i}]")
  per_shot = []
  pairs = found_pairs = all_present = shape_right = shape_guessed = 0
  for frame, names, setting in zip(keyframes, expected, settings, strict=True):
    detections = detect_characters(frame, cast=cast, setting=setting)
    by_det = {d.name: d for d in detections}
    found = [n for n in names if n in by_det]
    missing = [n for n in names if n not in by_det]
    extra = [d for d in detections if d.name not in names]
    seen = {n: by_name[n].colour for n in found}
    seen.update(_match_missing(missing, extra, by_name))
    shapes = {n: by_det[n].shape for n in found}
    pairs += len(names)
    found_pairs += len(found)
    all_present += not missing
    shape_guessed += sum(s is not None for s in shapes.values())
    shape_right += sum(shapes[n] == by_name[n].shape for n in found)
    per_shot.append(dict(found=found, missing=missing, extra=[d.colour for d in extra], seen=seen, shapes=shapes))
  return dict(
    presence=_ratio(found_pairs, pairs),
    keyframes_with_all_present=_ratio(all_present, len(keyframes)),
    colour_consistency=_colour_consistency(expected, per_shot),
    shape_accuracy=_ratio(shape_right, shape_guessed),
    shapes_guessed=_ratio(shape_guessed, found_pairs),
    per_shot=per_shot,
  )


def _match_missing(missing: list[str], extra: list[Detection], by_name: dict) -> dict[str, str | None]:
  """Colour each missing character is seen in: an uncaptioned blob of its shape first, else the largest left."""
  free = list(extra)  # largest first, as detected
  seen = {}
  for name in missing:
    pick = next((d for d in free if d.shape == by_name[name].shape), free[0] if free else None)
    seen[name] = None if pick is None else pick.colour
    if pick is not None:
      free.remove(pick)
  return seen


def _colour_consistency(expected: Sequence[Sequence[str]], per_shot: list[dict]) -> float:
  appearances: dict[str, list[str | None]] = {}
  for names, shot in zip(expected, per_shot, strict=True):
    for name in names:
      appearances.setdefault(name, []).append(shot["seen"][name])
  total = consistent = 0
  for colours in appearances.values():
    if len(colours) < 2:
      continue
    total += len(colours) - 1
    reference = next((c for c in colours if c is not None), None)
    if reference is not None:
      consistent += sum(c == reference for c in colours) - 1  # the reference itself is not a later appearance
  return _ratio(consistent, total)


def clip_presence(
  frames,
  expected_names: Sequence[str],
  *,
  setting: synthetic.Setting | None = None,
  cast: Sequence[synthetic.Character] = synthetic.CAST,
) -> float:
  """Fraction of ``frames`` (uint8 [F, H, W, 3] or a list of frames) showing every one of ``expected_names``."""
  cast = _check_cast(cast)
  _check_names(expected_names, {c.name: c for c in cast}, "expected_names")
  _check_setting(setting, "setting")
  if len(frames) == 0:
    raise ValueError("frames is empty: clip presence needs at least one frame")
  hits = 0
  for i, frame in enumerate(frames):
    found = {d.name for d in detect_characters(_check_frame(frame, f"frames[{i}]"), cast=cast, setting=setting)}
    hits += all(n in found for n in expected_names)
  return hits / len(frames)


def _ratio(num: int, den: int) -> float:
  return num / den if den else float("nan")


# ---------------------------------------------------------------------------------------------------------------
# Input checks: one clear error per bad input.


def _check_frame(frame, what: str) -> np.ndarray:
  frame = np.asarray(frame)
  if frame.dtype != np.uint8:
    raise TypeError(f"{what} must be uint8 RGB, got dtype {frame.dtype}")
  if frame.ndim != 3 or frame.shape[-1] != 3 or min(frame.shape[:2]) < 8:
    raise ValueError(f"{what} must be RGB [H, W, 3] with H, W >= 8, got shape {frame.shape}")
  return frame


def _check_cast(cast) -> tuple[synthetic.Character, ...]:
  cast = tuple(cast)
  if not cast or not all(isinstance(c, synthetic.Character) for c in cast):
    raise TypeError(f"cast must be a non-empty sequence of synthetic.Character, got {cast!r}")
  names = [c.name for c in cast]
  if len(set(names)) != len(names):
    raise ValueError(f"cast names must be unique, got {names}")
  return cast


def _check_setting(setting, what: str) -> None:
  if setting is not None and not isinstance(setting, synthetic.Setting):
    raise TypeError(f"{what} must be a synthetic.Setting or None, got {type(setting).__name__}: {setting!r}")


def _check_names(names, by_name: dict, what: str) -> None:
  if isinstance(names, str):
    raise TypeError(f"{what} must be a list of character names, got the string {names!r}")
  unknown = [n for n in names if n not in by_name]
  if unknown:
    raise ValueError(f"{what} names unknown characters {unknown}; the cast is {sorted(by_name)}")
  if len(set(names)) != len(names):
    raise ValueError(f"{what} names a character twice: {list(names)}")
