"""Procedural films: the embedded data set of the demo and the tests.

A film is a few shots joined by hard cuts. Every shot happens in one setting (a textured backdrop: sky over a
ground plane) with one or two characters from a fixed cast; identity = name + shape + colour, and the same name
always has the same shape and colour in every film, as a setting always has the same backdrop. The camera holds,
pans, tilts or zooms; characters walk, come closer, move away, wait or hop. Consecutive shots never share a setting,
so every cut changes the picture.

Geometry (2.5-D). Coordinates are pixels of the output frame, pixel centre at the integer position (OpenCV's
convention, so tracked points compare directly). A world point w (same units, on the backdrop) appears at

  p = s (w - c) + ((W - 1) / 2, (H - 1) / 2)

with camera centre c and zoom s. A character at world position a and depth z is drawn centred on p(a) with radius
s * radius_ref * z_ref / z, nearer characters last (painter's order = z-buffer order, since the backdrop is always
farther than any character). Ground-truth depth is the z-buffer: sky at SKY_DEPTH, the ground plane from
GROUND_FAR at the horizon to GROUND_NEAR at the bottom of the world (1/z linear in the row, as a real plane), each
character at its own z. Ground-truth tracks follow the surface under a pixel of a shot's first frame.

Frames are rendered ``supersample`` times larger and area-averaged (anti-aliasing: sub-pixel motion stays smooth,
which the tracker needs); depth takes the centre sample of each block. Captions come from the shot description;
the synopsis strings the shots together. Everything is a function of the seed.

Output per film: ``NAME.mp4`` (H.264, yuv420p, faststart: plays in browsers), ``NAME.json`` (the sidecar: shots
with frame ranges and captions, cuts, synopsis, cast) and ``NAME.gt.npz`` (``depth`` float16 [F, H, W], the z
values; ``tracks`` float32 [N, F, 2], NaN outside the track's shot; ``visible`` bool [N, F]; ``track_shot`` int32
[N]). Files are written under temporary names and renamed, so a film either exists whole or not at all.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import subprocess
import zlib
from collections.abc import Sequence

import cv2
import numpy as np
from tqdm import tqdm

SKY_DEPTH = 40.0
GROUND_FAR = 30.0  # depth of the ground at the horizon
GROUND_NEAR = 10.0  # depth of the ground at the bottom edge of the world
Z_REF = 5.0  # depth at which a character has radius RADIUS_REF * frame height
RADIUS_REF = 0.16
WORLD_SCALE = (3, 2)  # world size / frame size (x, y): room for pans and zoom-outs
FORMAT = "cinema_jax.synthetic_film.v1"


@dataclasses.dataclass(frozen=True)
class Character:
  name: str
  shape: str
  colour: str
  rgb: tuple[int, int, int]

  @property
  def description(self) -> str:
    return f"{self.name}, the {self.colour} {self.shape}"


@dataclasses.dataclass(frozen=True)
class Setting:
  name: str
  description: str
  where: str  # the description with its preposition, for captions
  sky: tuple[int, int, int]
  ground: tuple[int, int, int]
  horizon: float  # horizon row as a fraction of the world height


CAST = (
  Character("Ada", "circle", "red", (215, 45, 45)),
  Character("Bo", "square", "blue", (45, 85, 215)),
  Character("Cyd", "triangle", "yellow", (240, 205, 35)),
  Character("Dot", "diamond", "violet", (155, 70, 200)),
  Character("Eli", "hexagon", "orange", (245, 135, 25)),
  Character("Fay", "star", "pink", (240, 120, 180)),
  Character("Gus", "pentagon", "white", (240, 240, 240)),
  Character("Hob", "cross", "black", (25, 25, 25)),
)

SETTINGS = (
  Setting("meadow", "a sunny meadow", "in a sunny meadow", (120, 190, 245), (75, 160, 60), 0.45),
  Setting("desert", "a desert under a pale sky", "in a desert under a pale sky", (245, 230, 180), (215, 160, 85), 0.5),
  Setting("night street", "a city street at night", "on a city street at night", (15, 20, 60), (75, 75, 90), 0.4),
  Setting("snowfield", "a snowfield at dawn", "on a snowfield at dawn", (250, 175, 190), (230, 238, 250), 0.48),
  Setting("forest", "a dark forest", "in a dark forest", (35, 70, 45), (50, 40, 25), 0.35),
  Setting("volcano", "the slopes of a volcano", "on the slopes of a volcano", (110, 30, 25), (70, 60, 60), 0.42),
  Setting("lagoon", "a turquoise lagoon", "by a turquoise lagoon", (190, 240, 250), (25, 150, 165), 0.5),
)

# name -> phrase in captions. Camera speeds are per frame in output pixels (pans) or zoom factor per shot.
CAMERA_MOVES = {
  "static": "holds still",
  "pan_left": "pans left",
  "pan_right": "pans right",
  "tilt_up": "tilts up",
  "tilt_down": "tilts down",
  "zoom_in": "zooms in",
  "zoom_out": "pulls back",
}
ACTIONS = {
  "walk_left": "walks to the left",
  "walk_right": "walks to the right",
  "approach": "comes closer",
  "retreat": "moves away",
  "wait": "waits",
  "hop": "hops in place",
}


@dataclasses.dataclass(frozen=True)
class Actor:
  character: Character
  action: str
  start: tuple[float, float]  # world position at the shot's first frame
  end: tuple[float, float]  # world position at the last frame (before hops)
  z: tuple[float, float]  # depth at the first and last frame
  hop: float  # hop height in output pixels (0 unless action == "hop")


@dataclasses.dataclass(frozen=True)
class Shot:
  setting: Setting
  actors: tuple[Actor, ...]
  camera: str
  center: tuple[tuple[float, float], tuple[float, float]]  # camera centre at the first and last frame
  zoom: tuple[float, float]
  num_frames: int
  caption: str


@dataclasses.dataclass(frozen=True)
class FilmSpec:
  """Everything needed to render a film; a pure function of (seed, options)."""

  seed: int
  title: str
  width: int
  height: int
  fps: float
  shots: tuple[Shot, ...]
  synopsis: str
  supersample: int

  @property
  def num_frames(self) -> int:
    return sum(s.num_frames for s in self.shots)

  @property
  def shot_ranges(self) -> list[tuple[int, int]]:
    """Frame ranges of the shots, end exclusive."""
    ends = np.cumsum([s.num_frames for s in self.shots]).tolist()
    return list(zip([0, *ends[:-1]], ends, strict=True))

  @property
  def cuts(self) -> list[int]:
    """First frame of every shot after the first."""
    return [start for start, _ in self.shot_ranges[1:]]

  @property
  def characters(self) -> list[Character]:
    seen = {}
    for shot in self.shots:
      for actor in shot.actors:
        seen.setdefault(actor.character.name, actor.character)
    return list(seen.values())


# ---------------------------------------------------------------------------------------------------------------
# Film specs and captions.


def make_film(
  seed: int,
  *,
  width: int = 96,
  height: int = 64,
  fps: float = 12.0,
  shots: tuple[int, int] = (3, 5),
  shot_frames: tuple[int, int] = (18, 30),
  max_actors: int = 2,
  pan_speed: tuple[float, float] = (0.3, 0.8),
  walk_speed: tuple[float, float] = (0.3, 0.9),
  zoom_change: float = 0.2,
  supersample: int = 4,
) -> FilmSpec:
  """A film spec from a seed: cast, settings, shots (inclusive ranges for counts and frames), captions, synopsis."""
  if min(shots) < 1 or shots[0] > shots[1] or shot_frames[0] > shot_frames[1] or shot_frames[0] < 2:
    raise ValueError(f"bad film sizes: shots {shots}, shot_frames {shot_frames}")
  rng = np.random.default_rng(seed)
  num_shots = int(rng.integers(shots[0], shots[1] + 1))
  cast = [CAST[i] for i in rng.choice(len(CAST), size=min(len(CAST), max(2, max_actors + 1)), replace=False)]
  places = [SETTINGS[i] for i in rng.choice(len(SETTINGS), size=min(3, num_shots + 1), replace=False)]
  world_w, world_h = WORLD_SCALE[0] * width, WORLD_SCALE[1] * height
  made: list[Shot] = []
  previous = None
  for _ in range(num_shots):
    setting = places[int(rng.integers(len(places)))]
    while setting is previous:  # a cut always changes the setting
      setting = places[int(rng.integers(len(places)))]
    previous = setting
    frames = int(rng.integers(shot_frames[0], shot_frames[1] + 1))
    camera = list(CAMERA_MOVES)[int(rng.integers(len(CAMERA_MOVES)))]
    c0 = np.array([world_w / 2 + rng.uniform(-0.3, 0.3) * width, world_h / 2 + rng.uniform(-0.05, 0.05) * height])
    step = rng.uniform(*pan_speed) * (frames - 1)
    direction = {"pan_left": (-1, 0), "pan_right": (1, 0), "tilt_up": (0, -1), "tilt_down": (0, 1)}.get(camera, (0, 0))
    c1 = c0 + step * np.array(direction, float)
    z0 = 1.0 if camera != "zoom_out" else 1.0 + zoom_change
    z1 = {"zoom_in": 1.0 + zoom_change, "zoom_out": 1.0}.get(camera, z0)
    count = int(rng.integers(1, max_actors + 1))
    who = [cast[i] for i in rng.choice(len(cast), size=count, replace=False)]
    actors = []
    for k, character in enumerate(who):
      action = list(ACTIONS)[int(rng.integers(len(ACTIONS)))]
      # Spread the actors across the view, standing on the ground in the lower part of the frame.
      sx = (k + 1) / (count + 1) + rng.uniform(-0.08, 0.08)
      sy = rng.uniform(0.62, 0.75)
      start = (c0[0] + (sx - 0.5) * width / z0, c0[1] + (sy - 0.5) * height / z0)
      depth = float(rng.uniform(4.0, 7.0))
      speed = rng.uniform(*walk_speed) * (frames - 1)
      end, zs, hop = start, (depth, depth), 0.0
      if action == "walk_left":
        end = (start[0] - speed, start[1])
      elif action == "walk_right":
        end = (start[0] + speed, start[1])
      elif action == "approach":
        zs = (depth, depth * 0.75)
      elif action == "retreat":
        zs = (depth, min(depth * 1.3, 9.0))
      elif action == "hop":
        hop = float(rng.uniform(0.08, 0.15) * height)
      actors.append(Actor(character, action, tuple(map(float, start)), tuple(map(float, end)), zs, hop))
    actors.sort(key=lambda a: -a.z[0])
    shot = Shot(setting, tuple(actors), camera, (tuple(map(float, c0)), tuple(map(float, c1))), (z0, z1), frames, "")
    made.append(dataclasses.replace(shot, caption=shot_caption(shot)))
  spec = FilmSpec(seed, "", width, height, float(fps), tuple(made), "", supersample)
  title = " and ".join(c.name for c in spec.characters[:2]) + f" in the {made[0].setting.name}"
  spec = dataclasses.replace(spec, title=title)
  return dataclasses.replace(spec, synopsis=synopsis(spec))


def shot_caption(shot: Shot) -> str:
  """One sentence per fact: setting, each character (identity + action), camera."""
  where = shot.setting.where
  parts = [f"{where[0].upper()}{where[1:]}, {_actor_phrase(shot.actors[0])}"]
  parts += [f"while {_actor_phrase(a)}" for a in shot.actors[1:]]
  return " ".join(parts) + f". The camera {CAMERA_MOVES[shot.camera]}."


def _actor_phrase(actor: Actor) -> str:
  return f"{actor.character.description}, {ACTIONS[actor.action]}"


def synopsis(spec: FilmSpec) -> str:
  """The story in order: who appears, where, and what each shot shows."""
  cast = ", ".join(f"{c.name} (a {c.colour} {c.shape})" for c in spec.characters)
  places = []
  for shot in spec.shots:
    if shot.setting.description not in places:
      places.append(shot.setting.description)
  places = ", ".join(places[:-1]) + (" and " if len(places) > 1 else "") + places[-1]
  lines = [f"{spec.title}: a film in {len(spec.shots)} shots starring {cast}, set in {places}."]
  for i, shot in enumerate(spec.shots):
    lead = "First" if i == 0 else ("Finally" if i == len(spec.shots) - 1 else "Then")
    who = " and ".join(f"{a.character.name} {ACTIONS[a.action]}" for a in shot.actors)
    lines.append(f"{lead}, {shot.setting.where}, {who}.")
  return " ".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Rendering.


@dataclasses.dataclass(frozen=True)
class _Pose:
  """Screen pose of one character at one frame (output pixels)."""

  actor: Actor
  center: np.ndarray  # [2]
  radius: float
  z: float


def _camera(shot: Shot, t: int) -> tuple[np.ndarray, float]:
  u = t / max(shot.num_frames - 1, 1)
  c = (1 - u) * np.array(shot.center[0]) + u * np.array(shot.center[1])
  return c, (1 - u) * shot.zoom[0] + u * shot.zoom[1]


def _screen(spec: FilmSpec, c: np.ndarray, s: float, world: np.ndarray) -> np.ndarray:
  return s * (world - c) + np.array([(spec.width - 1) / 2, (spec.height - 1) / 2])


def _world(spec: FilmSpec, c: np.ndarray, s: float, screen: np.ndarray) -> np.ndarray:
  return (screen - np.array([(spec.width - 1) / 2, (spec.height - 1) / 2])) / s + c


def _poses(spec: FilmSpec, shot: Shot, t: int) -> list[_Pose]:
  """Characters at frame t of the shot, farthest first."""
  c, s = _camera(shot, t)
  u = t / max(shot.num_frames - 1, 1)
  poses = []
  for actor in shot.actors:
    pos = (1 - u) * np.array(actor.start) + u * np.array(actor.end)
    pos[1] -= actor.hop * abs(np.sin(np.pi * 2 * u))
    z = (1 - u) * actor.z[0] + u * actor.z[1]
    poses.append(_Pose(actor, _screen(spec, c, s, pos), s * RADIUS_REF * spec.height * Z_REF / z, z))
  return sorted(poses, key=lambda p: -p.z)


def _shape_polygon(shape: str) -> np.ndarray:
  """Outline of a shape in unit coordinates (radius 1), [V, 2]."""
  return _SHAPES[shape]


def _regular(n: int, phase: float = -np.pi / 2) -> np.ndarray:
  a = phase + 2 * np.pi * np.arange(n) / n
  return np.stack([np.cos(a), np.sin(a)], -1)


def _star() -> np.ndarray:
  outer, inner = _regular(5), 0.45 * _regular(5, -np.pi / 2 + np.pi / 5)
  return np.stack([outer, inner], 1).reshape(-1, 2)


def _cross() -> np.ndarray:
  a, b = 0.35, 1.0
  return np.array(
    [[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a], [a, b], [-a, b], [-a, a], [-b, a], [-b, -a]] + [[-a, -a]]
  )


_SHAPES = {
  "circle": _regular(48),
  "square": _regular(4, np.pi / 4) * 1.1,
  "triangle": _regular(3) * np.array([1.15, 1.15]) + np.array([0.0, 0.2]),
  "diamond": _regular(4) * np.array([0.85, 1.15]),
  "hexagon": _regular(6),
  "pentagon": _regular(5),
  "star": _star() * 1.15,
  "cross": _cross(),
}
_EYES = ((-0.33, -0.22), (0.33, -0.22))


@functools.lru_cache(maxsize=32)
def _backdrop(setting: Setting, width: int, height: int, ss: int) -> tuple[np.ndarray, np.ndarray]:
  """The setting's world texture (uint8 [h, w, 3]) and depth (float32 [h, w]) at ``ss`` x output resolution.

  Seeded by the setting's name, so a setting looks the same in every film.
  """
  rng = np.random.default_rng(zlib.crc32(setting.name.encode()))
  h, w = WORLD_SCALE[1] * height * ss, WORLD_SCALE[0] * width * ss
  rows = (np.arange(h, dtype=np.float32)[:, None] + 0.5) / h * np.ones((1, w), np.float32)
  horizon = setting.horizon
  # Three octaves: broad patches, and finer grain the tracker can lock on to.
  fine = 0.4 * _noise(rng, h, w, 20 * ss) + 0.35 * _noise(rng, h, w, 6 * ss) + 0.25 * _noise(rng, h, w, 3 * ss)
  clouds = np.clip(_noise(rng, h, w, 28 * ss) * 1.6 - 0.7, 0, 1)
  sky = np.array(setting.sky, np.float32) * (0.8 + 0.35 * (rows / horizon))[..., None]
  sky = sky + (255 - sky) * (0.55 * clouds)[..., None]
  ground = np.array(setting.ground, np.float32) * (0.55 + 0.9 * fine)[..., None]
  is_sky = rows < horizon
  image = np.where(is_sky[..., None], sky, ground)
  depth_ground = 1.0 / (1 / GROUND_FAR + (1 / GROUND_NEAR - 1 / GROUND_FAR) * (rows - horizon) / (1 - horizon))
  depth = np.where(is_sky, SKY_DEPTH, depth_ground).astype(np.float32)
  return np.clip(image, 0, 255).astype(np.uint8), depth


def _noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
  """Smooth value noise in [0, 1] with features about ``cell`` pixels apart."""
  grid = rng.random((h // cell + 3, w // cell + 3), dtype=np.float32)
  up = cv2.resize(grid, (grid.shape[1] * cell, grid.shape[0] * cell), interpolation=cv2.INTER_CUBIC)
  up = up[cell : cell + h, cell : cell + w]
  lo, hi = up.min(), up.max()
  return (up - lo) / max(hi - lo, 1e-6)


def _affine(spec: FilmSpec, c: np.ndarray, s: float) -> np.ndarray:
  """2x3 map from world-texture pixels to supersampled frame pixels (both with pixel centres at integers)."""
  ss = spec.supersample
  half = (ss - 1) / 2
  ctr = np.array([(spec.width - 1) / 2, (spec.height - 1) / 2])
  # texture pixel u = ss * w + half; frame pixel x_ss = ss * p + half; p = s (w - c) + ctr.
  offset = ss * (ctr - s * c) + half - s * half
  return np.array([[s, 0, offset[0]], [0, s, offset[1]]], np.float64)


def render_frame(spec: FilmSpec, shot: Shot, t: int) -> tuple[np.ndarray, np.ndarray]:
  """Frame t of a shot: RGB uint8 [H, W, 3] and z-buffer float32 [H, W]."""
  ss = spec.supersample
  size = (spec.width * ss, spec.height * ss)
  texture, depth_tex = _backdrop(shot.setting, spec.width, spec.height, ss)
  c, s = _camera(shot, t)
  m = _affine(spec, c, s)
  image = cv2.warpAffine(texture, m, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
  depth = cv2.warpAffine(depth_tex, m, size, flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT_101)
  half = (ss - 1) / 2
  frac = 16  # cv2 fixed-point shift 4: polygon vertices at 1/16 pixel
  for pose in _poses(spec, shot, t):
    to_px = lambda local, r=pose.radius, q=pose.center: ((q + r * local) * ss + half) * frac  # noqa: E731
    outline = np.round(to_px(_shape_polygon(pose.actor.character.shape))).astype(np.int32)
    mask = np.zeros(size[::-1], np.uint8)
    cv2.fillPoly(mask, [outline], 1, lineType=cv2.LINE_8, shift=4)
    image[mask > 0] = pose.actor.character.rgb
    depth[mask > 0] = pose.z
    for eye in _EYES:
      centre = np.round(to_px(np.array(eye))).astype(np.int32)
      cv2.circle(image, tuple(centre), int(round(0.2 * pose.radius * ss * frac)), (255, 255, 255), -1, cv2.LINE_8, 4)
      cv2.circle(image, tuple(centre), int(round(0.09 * pose.radius * ss * frac)), (0, 0, 0), -1, cv2.LINE_8, 4)
  image = cv2.resize(image, (spec.width, spec.height), interpolation=cv2.INTER_AREA)
  return image, depth[ss // 2 :: ss, ss // 2 :: ss].copy()


def render_film(spec: FilmSpec, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """All frames: RGB uint8 [F, H, W, 3] and z-buffer float32 [F, H, W]."""
  frames, depths = [], []
  with tqdm(total=spec.num_frames, desc=f"render seed {spec.seed}", disable=not progress, leave=False) as bar:
    for shot in spec.shots:
      for t in range(shot.num_frames):
        image, depth = render_frame(spec, shot, t)
        frames.append(image)
        depths.append(depth)
        bar.update()
  return np.stack(frames), np.stack(depths)


# ---------------------------------------------------------------------------------------------------------------
# Ground truth motion.


def ground_truth_tracks(
  spec: FilmSpec, shot_index: int, points: np.ndarray, depth: np.ndarray | None = None, depth_tolerance: float = 0.05
) -> tuple[np.ndarray, np.ndarray]:
  """Where the surface under each of ``points`` [N, 2] (x, y at the shot's first frame) is in every frame of the shot.

  Returns (tracks float32 [N, T, 2], visible bool [N, T]). A point belongs to the nearest character whose outline
  contains it, else to the backdrop. With ``depth`` (the shot's z-buffer [T, H, W]) a point is visible where it is
  inside the frame and the z-buffer at its pixel equals its surface's depth (relative ``depth_tolerance``);
  without it, visible = inside the frame.
  """
  shot = spec.shots[shot_index]
  points = np.asarray(points, np.float64).reshape(-1, 2)
  c0, s0 = _camera(shot, 0)
  poses0 = _poses(spec, shot, 0)
  owner = np.full(len(points), -1)
  for k, pose in enumerate(poses0):  # farthest first: later (nearer) owners overwrite
    outline = _shape_polygon(pose.actor.character.shape).astype(np.float32)
    local = (points - pose.center) / pose.radius
    inside = np.array([cv2.pointPolygonTest(outline, (float(x), float(y)), False) >= 0 for x, y in local])
    owner[inside] = k
  order0 = [p.actor for p in poses0]
  world = _world(spec, c0, s0, points)
  texture_depth = _backdrop(shot.setting, spec.width, spec.height, spec.supersample)[1]
  ss = spec.supersample
  ty = np.clip(np.round(world[:, 1] * ss + (ss - 1) / 2).astype(int), 0, texture_depth.shape[0] - 1)
  tx = np.clip(np.round(world[:, 0] * ss + (ss - 1) / 2).astype(int), 0, texture_depth.shape[1] - 1)
  backdrop_z = texture_depth[ty, tx]
  tracks = np.zeros((len(points), shot.num_frames, 2), np.float32)
  visible = np.zeros((len(points), shot.num_frames), bool)
  for t in range(shot.num_frames):
    c, s = _camera(shot, t)
    by_actor = {id(p.actor): p for p in _poses(spec, shot, t)}
    xy = _screen(spec, c, s, world)
    z = backdrop_z.copy()
    for k, actor in enumerate(order0):
      sel = owner == k
      if sel.any():
        pose0, pose = poses0[k], by_actor[id(actor)]
        xy[sel] = pose.center + pose.radius * (points[sel] - pose0.center) / pose0.radius
        z[sel] = pose.z
    tracks[:, t] = xy
    inside = (xy[:, 0] > -0.5) & (xy[:, 0] < spec.width - 0.5) & (xy[:, 1] > -0.5) & (xy[:, 1] < spec.height - 0.5)
    if depth is not None:
      col = np.clip(np.round(xy[:, 0]).astype(int), 0, spec.width - 1)
      row = np.clip(np.round(xy[:, 1]).astype(int), 0, spec.height - 1)
      inside &= np.abs(depth[t, row, col] - z) <= depth_tolerance * z
    visible[:, t] = inside
  return tracks, visible


def grid_points(width: int, height: int, cols: int, rows: int) -> np.ndarray:
  """Centres of a cols x rows grid over a width x height frame, [cols * rows, 2] (x, y), row-major."""
  xs = (np.arange(cols) + 0.5) * width / cols - 0.5
  ys = (np.arange(rows) + 0.5) * height / rows - 0.5
  return np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Files.


def sidecar(spec: FilmSpec, name: str) -> dict:
  """The JSON sidecar: what ingest reads captions from, and what the tests compare shot detection with."""
  shots = []
  for (start, end), shot in zip(spec.shot_ranges, spec.shots, strict=True):
    actors = [
      {"name": a.character.name, "action": a.action, "z": list(a.z), "start": list(a.start), "end": list(a.end)}
      for a in shot.actors
    ]
    shots.append(
      {
        "start": start,
        "end": end,
        "setting": shot.setting.name,
        "camera": shot.camera,
        "zoom": list(shot.zoom),
        "caption": shot.caption,
        "actors": actors,
      }
    )
  return {
    "format": FORMAT,
    "title": spec.title,
    "seed": spec.seed,
    "fps": spec.fps,
    "width": spec.width,
    "height": spec.height,
    "num_frames": spec.num_frames,
    "synopsis": spec.synopsis,
    "characters": [dataclasses.asdict(c) for c in spec.characters],
    "settings": sorted({s.setting.name for s in spec.shots}),
    "shots": shots,
    "cuts": spec.cuts,
    "files": {"video": f"{name}.mp4", "ground_truth": f"{name}.gt.npz"},
  }


def write_film(spec: FilmSpec, out_dir: str | os.PathLike, name: str, *, crf: int = 16, track_grid=(8, 6)) -> dict:
  """Renders and writes NAME.mp4, NAME.gt.npz and NAME.json (last: its presence marks a finished film)."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  frames, depth = render_film(spec)
  encode_mp4(frames, out / f"{name}.mp4", spec.fps, crf=crf)
  tracks, visible, track_shot = [], [], []
  for i, (start, end) in enumerate(spec.shot_ranges):
    grid = grid_points(spec.width, spec.height, *track_grid)
    xy, vis = ground_truth_tracks(spec, i, grid, depth[start:end])
    full = np.full((len(grid), spec.num_frames, 2), np.nan, np.float32)
    full[:, start:end] = xy
    seen = np.zeros((len(grid), spec.num_frames), bool)
    seen[:, start:end] = vis
    tracks.append(full)
    visible.append(seen)
    track_shot.append(np.full(len(grid), i, np.int32))
  arrays = {
    "depth": depth.astype(np.float16),
    "tracks": np.concatenate(tracks),
    "visible": np.concatenate(visible),
    "track_shot": np.concatenate(track_shot),
  }
  tmp = out / f".{name}.gt.npz.partial"
  with open(tmp, "wb") as f:
    np.savez_compressed(f, **arrays)
  os.replace(tmp, out / f"{name}.gt.npz")
  meta = sidecar(spec, name)
  write_json(out / f"{name}.json", meta)
  return meta


def encode_mp4(frames: np.ndarray, path: str | os.PathLike, fps: float, *, crf: int = 16) -> None:
  """RGB uint8 [F, H, W, 3] -> H.264 yuv420p mp4 (even H and W) with the ffmpeg binary of imageio-ffmpeg.

  Written to a hidden temporary name and renamed. One encoder thread and bit-exact flags make the file a function
  of the frames.
  """
  import imageio_ffmpeg

  path = pathlib.Path(path)
  f, h, w, _ = frames.shape
  if h % 2 or w % 2:
    raise ValueError(f"yuv420p needs an even frame size, got {w}x{h}")
  tmp = path.with_name(f".{path.name}.partial")
  cmd = [
    imageio_ffmpeg.get_ffmpeg_exe(),
    *("-hide_banner", "-loglevel", "error", "-y"),
    *("-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", f"{fps:g}", "-i", "-"),
    *("-c:v", "libx264", "-preset", "medium", "-crf", str(crf), "-pix_fmt", "yuv420p", "-threads", "1"),
    *("-movflags", "+faststart", "-map_metadata", "-1", "-fflags", "+bitexact", "-flags:v", "+bitexact"),
    *("-f", "mp4", str(tmp)),
  ]
  result = subprocess.run(cmd, input=np.ascontiguousarray(frames, np.uint8).tobytes(), capture_output=True)
  if result.returncode:
    tmp.unlink(missing_ok=True)
    raise RuntimeError(f"ffmpeg failed writing {path}: {result.stderr.decode(errors='replace').strip()}")
  os.replace(tmp, path)


def write_json(path: pathlib.Path, obj) -> None:
  tmp = path.with_name(f".{path.name}.partial")
  tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
  os.replace(tmp, path)


def film_options(config) -> dict:
  """make_film keyword arguments from the ``synth`` section of configs/data.py."""
  return dict(
    width=config.width,
    height=config.height,
    fps=config.fps,
    shots=tuple(config.shots),
    shot_frames=tuple(config.shot_frames),
    max_actors=config.max_actors,
    pan_speed=tuple(config.pan_speed),
    walk_speed=tuple(config.walk_speed),
    zoom_change=config.zoom_change,
    supersample=config.supersample,
  )


def generate_films(
  out_dir: str | os.PathLike,
  num_films: int,
  *,
  seed: int = 0,
  crf: int = 16,
  track_grid: Sequence[int] = (8, 6),
  progress: bool = True,
  **film_kwargs,
) -> list[pathlib.Path]:
  """Writes films ``film_000`` ... (film i from seed ``seed + i``); returns the mp4 paths.

  A film whose sidecar already exists with the same seed and sizes is kept (reruns resume; the files are a function
  of the seed, so regenerating would write the same bytes).
  """
  out = pathlib.Path(out_dir)
  paths = []
  for i in tqdm(range(num_films), desc="synthetic films", disable=not progress):
    spec = make_film(seed + i, **film_kwargs)
    name = f"film_{i:03d}"
    side = out / f"{name}.json"
    done = False
    if side.exists() and (out / f"{name}.mp4").exists() and (out / f"{name}.gt.npz").exists():
      try:
        old = json.loads(side.read_text())
        done = old == json.loads(json.dumps(sidecar(spec, name)))
      except (OSError, ValueError):
        done = False
    if not done:
      write_film(spec, out, name, crf=crf, track_grid=tuple(track_grid))
    paths.append(out / f"{name}.mp4")
  return paths
