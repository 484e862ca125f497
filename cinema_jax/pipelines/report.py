"""What a story run leaves behind: the movie and clips (H.264), the keyframe contact sheet (PNG), the storyboard
report (one static HTML page) and the folder they are written into, which appears whole or not at all.

Images are RGB uint8 [H, W, 3]; videos are RGB uint8 [T, H, W, 3] (T frames). Every file is written under a
temporary name and renamed, and ``atomic_output_dir`` publishes a whole run folder with one rename, so an
interrupted or failed run never leaves a half-written movie, sheet or report where a finished one is expected.
"""

from __future__ import annotations

import base64
import contextlib
import html
import math
import numbers
import os
import pathlib
import secrets
import shutil
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import cv2
import numpy as np

from cinema_jax.data.synthetic import encode_mp4
from cinema_jax.files import write_atomic

# Contact sheet. Small frames are enlarged by a whole factor with nearest-neighbour sampling: every generated pixel
# stays a sharp square of its exact colour (no detail invented, no blur hiding artefacts), as in the HTML report.
SHEET_MIN_TILE_WIDTH = 256  # auto scale: the smallest whole factor that makes a tile at least this wide
SHEET_COLUMNS = 5  # default tiles per row (a five-shot story fits in one row)
SHEET_GAP = 6  # pixels between tiles and around the sheet
SHEET_LABEL_HEIGHT = 28  # label strip under each tile
SHEET_BACKGROUND = (32, 32, 32)
SHEET_TEXT = (235, 235, 235)

# Report. Cards are at least this wide on screen; keyframes fill the card width with CSS pixelated upscaling.
REPORT_CARD_MIN_WIDTH = 280
SHOT_KEYS = ("caption", "keyframe", "clip", "duration", "metrics")
MISSING = "\u2013"  # an en dash marks a metric without a value


# ---------------------------------------------------------------------------------------------------------------
# Videos.


def write_movie(frames: np.ndarray, path: str | os.PathLike, fps: float, *, crf: int = 18) -> pathlib.Path:
  """Writes frames as a browser-playable H.264 mp4 (yuv420p, moov atom first); returns the path.

  yuv420p stores colour at half resolution, so H and W must be even. The file appears under its name only when
  complete (``encode_mp4`` encodes to a hidden temporary name in the same folder and renames it).
  """
  path = pathlib.Path(path)
  frames = np.asarray(frames)
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
    raise ValueError(f"frames for {path} must be uint8 RGB [T, H, W, 3] with T >= 1, got {frames.dtype} {frames.shape}")
  _, h, w, _ = frames.shape
  if h % 2 or w % 2:
    raise ValueError(f"{path}: H.264 yuv420p needs an even frame height and width, got {w}x{h} (W x H)")
  if isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not math.isfinite(fps) or fps <= 0:
    raise ValueError(f"{path}: fps must be a positive number, got {fps!r}")
  path.parent.mkdir(parents=True, exist_ok=True)
  encode_mp4(frames, path, float(fps), crf=crf)
  return path


# ---------------------------------------------------------------------------------------------------------------
# Images.


def contact_sheet(
  keyframes: Sequence[np.ndarray],
  labels: Sequence[str] | None = None,
  *,
  columns: int = SHEET_COLUMNS,
  scale: int | None = None,
) -> np.ndarray:
  """Keyframes in a grid, each over a strip with its label ("1", "2", ... by default); RGB uint8.

  ``scale`` is the whole enlargement factor (nearest neighbour); None picks the smallest one that makes a tile at
  least ``SHEET_MIN_TILE_WIDTH`` pixels wide (x3 for 96 x 64 frames, x1 for 480 x 720). Labels are drawn with
  OpenCV's Hershey font, which has ASCII glyphs only (others show as "?"), and shortened with "..." to fit a tile.
  """
  if not keyframes:
    raise ValueError("contact_sheet needs at least one keyframe")
  images = [_check_image(k, f"keyframe {i + 1}") for i, k in enumerate(keyframes)]
  if len({im.shape for im in images}) != 1:
    raise ValueError(f"keyframes must share one size, got {sorted({im.shape[:2] for im in images})} (H, W)")
  labels = [str(i + 1) for i in range(len(images))] if labels is None else [str(label) for label in labels]
  if len(labels) != len(images):
    raise ValueError(f"contact_sheet got {len(images)} keyframes but {len(labels)} labels")
  if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
    raise ValueError(f"columns must be an integer >= 1, got {columns!r}")
  h, w, _ = images[0].shape
  if scale is None:
    scale = max(1, -(-SHEET_MIN_TILE_WIDTH // w))
  if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
    raise ValueError(f"scale must be a whole factor >= 1 or None, got {scale!r}")
  cols = min(columns, len(images))
  rows = -(-len(images) // cols)
  tile_h, tile_w = h * scale + SHEET_LABEL_HEIGHT, w * scale
  sheet = np.empty((SHEET_GAP + rows * (tile_h + SHEET_GAP), SHEET_GAP + cols * (tile_w + SHEET_GAP), 3), np.uint8)
  sheet[:] = SHEET_BACKGROUND
  for i, (image, label) in enumerate(zip(images, labels, strict=True)):
    top = SHEET_GAP + (i // cols) * (tile_h + SHEET_GAP)
    left = SHEET_GAP + (i % cols) * (tile_w + SHEET_GAP)
    big = cv2.resize(image, (tile_w, h * scale), interpolation=cv2.INTER_NEAREST)
    sheet[top : top + h * scale, left : left + tile_w] = big
    _draw_label(sheet, label, top + h * scale, left, tile_w)
  return sheet


def _draw_label(sheet: np.ndarray, label: str, top: int, left: int, width: int) -> None:
  font, size, thickness, pad = cv2.FONT_HERSHEY_SIMPLEX, 0.6, 1, 6
  text = label.encode("ascii", "replace").decode()
  fits = lambda t: cv2.getTextSize(t, font, size, thickness)[0][0] <= width - 2 * pad
  if not fits(text):
    while text and not fits(text + "..."):
      text = text[:-1]
    text += "..."
  (_, text_h), _ = cv2.getTextSize(text, font, size, thickness)
  baseline = top + (SHEET_LABEL_HEIGHT + text_h) // 2
  cv2.putText(sheet, text, (left + pad, baseline), font, size, SHEET_TEXT, thickness, cv2.LINE_AA)


def png_bytes(image: np.ndarray) -> bytes:
  """An RGB uint8 [H, W, 3] image encoded as PNG."""
  image = _check_image(image, "image")
  ok, data = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
  if not ok:
    raise RuntimeError(f"PNG encoding failed for an image of shape {image.shape}")
  return data.tobytes()


def write_png(path: str | os.PathLike, image: np.ndarray) -> pathlib.Path:
  """Writes an RGB uint8 [H, W, 3] image as PNG through a temporary name and a rename; returns the path."""
  path = pathlib.Path(path)
  write_atomic(path, png_bytes(image))
  return path


def _check_image(image: Any, what: str) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3 or 0 in image.shape:
    raise ValueError(f"{what} must be a uint8 RGB image [H, W, 3], got {image.dtype} {image.shape}")
  return np.ascontiguousarray(image)


# ---------------------------------------------------------------------------------------------------------------
# The storyboard report.

_CSS = f"""
:root {{ color-scheme: light; }}
body {{ margin: 0; background: #f6f6f4; color: #1f1f1f; font: 15px/1.45 system-ui, sans-serif; }}
main {{ max-width: 1240px; margin: 0 auto; padding: 20px; }}
h1 {{ margin: 0 0 4px; font-size: 26px; }}
h2 {{ margin: 28px 0 10px; font-size: 19px; }}
.summary {{ margin: 0; color: #555; }}
video {{ display: block; width: 100%; background: #222; }}
.movie video {{ max-width: 768px; }}
.board {{ display: grid; gap: 16px; grid-template-columns: repeat(auto-fill, minmax({REPORT_CARD_MIN_WIDTH}px, 1fr)); }}
.shot {{ background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 10px; }}
.shot h3 {{ margin: 8px 0 4px; font-size: 16px; }}
.shot h3 span {{ color: #666; font-weight: normal; }}
.keyframe {{ display: block; width: 100%; height: auto; image-rendering: pixelated; }}
.missing {{ aspect-ratio: 3 / 2; display: grid; place-items: center; background: #e6e6e6; color: #777; }}
.caption {{ margin: 4px 0 8px; }}
table {{ border-collapse: collapse; margin-top: 8px; font-size: 14px; }}
td, th {{ border-bottom: 1px solid #e4e4e4; padding: 3px 12px 3px 0; text-align: left; }}
td.num {{ font-variant-numeric: tabular-nums; }}
"""


def write_report(
  path: str | os.PathLike,
  *,
  title: str,
  shots: Sequence[Mapping[str, Any]],
  movie: str | os.PathLike | None = "movie.mp4",
  metrics: Mapping[str, Any] | None = None,
  notes: Sequence[str] = (),
) -> pathlib.Path:
  """Writes the storyboard page ``report.html``; returns its path.

  One static file: inline CSS, no script, nothing fetched from the network. Keyframes are embedded as PNG data
  URIs, so the storyboard shows wherever the file is opened; the movie and the clips are linked by paths relative
  to the report (they play when the page sits in its run folder).

  Each shot is a mapping with ``caption`` (required) and optional ``keyframe`` (RGB uint8 [H, W, 3], or the path of
  a PNG/JPEG, relative paths taken from the report's folder), ``clip`` (a video path relative to the report),
  ``duration`` (seconds) and ``metrics`` (a mapping, shown like the run's metrics). Metrics tables flatten nested
  mappings to dotted names, round numbers and show None as an en dash. Everything is HTML-escaped.
  """
  path = pathlib.Path(path)
  cards = [_card(path.parent, shot, i) for i, shot in enumerate(shots)]
  total = sum(float(s["duration"]) for s in shots if s.get("duration") is not None)
  summary = f"{len(cards)} shot{'s' if len(cards) != 1 else ''}" + (f", {total:.1f} s" if total else "")
  parts = [
    "<!doctype html>",
    '<html lang="en"><head><meta charset="utf-8">',
    '<meta name="viewport" content="width=device-width, initial-scale=1">',
    f"<title>{_esc(title)}</title><style>{_CSS}</style></head>",
    f'<body><main><header><h1>{_esc(title)}</h1><p class="summary">{summary}</p></header>',
  ]
  if movie is not None:
    parts.append(f'<section class="movie"><h2>Movie</h2>{_video(movie, "the whole movie")}</section>')
  parts.append(f'<section><h2>Storyboard</h2><div class="board">{"".join(cards)}</div></section>')
  if metrics:
    parts.append(f"<section><h2>Metrics</h2>{_table(metrics)}</section>")
  if notes:
    items = "".join(f"<li>{_esc(note)}</li>" for note in notes)
    parts.append(f"<section><h2>Notes</h2><ul>{items}</ul></section>")
  parts.append("</main></body></html>\n")
  write_atomic(path, "\n".join(parts).encode("utf-8"))
  return path


def _card(folder: pathlib.Path, shot: Mapping[str, Any], index: int) -> str:
  name = f"shot {index + 1}"
  if not isinstance(shot, Mapping):
    raise ValueError(f"report {name} must be a mapping with keys {', '.join(SHOT_KEYS)}, got {type(shot).__name__}")
  unknown = [k for k in shot if k not in SHOT_KEYS]
  if unknown:
    raise ValueError(f"report {name} has unknown keys {unknown}; allowed keys: {', '.join(SHOT_KEYS)}")
  if not isinstance(shot.get("caption"), str):
    raise ValueError(f"report {name} needs a caption string, got {shot.get('caption')!r}")
  keyframe = shot.get("keyframe")
  if keyframe is None:
    picture = '<div class="missing">no keyframe</div>'
  else:
    uri, (w, h) = _image_uri(folder, keyframe, name)
    alt = f"Keyframe of {name}"
    picture = f'<img class="keyframe" src="{uri}" width="{w}" height="{h}" alt="{alt}">'
  duration = shot.get("duration")
  seconds = f" <span>{float(duration):.1f} s</span>" if duration is not None else ""
  parts = [
    f'<article class="shot" id="shot-{index + 1}">{picture}',
    f"<h3>Shot {index + 1}{seconds}</h3>",
    f'<p class="caption">{_esc(shot["caption"])}</p>',
  ]
  if shot.get("clip") is not None:
    parts.append(_video(shot["clip"], f"the clip of {name}"))
  if shot.get("metrics"):
    parts.append(_table(shot["metrics"]))
  parts.append("</article>")
  return "".join(parts)


def _image_uri(folder: pathlib.Path, keyframe: Any, name: str) -> tuple[str, tuple[int, int]]:
  """A data URI and the (width, height) of a keyframe given as an array or an image file."""
  if isinstance(keyframe, str | os.PathLike):
    file = folder / keyframe
    mime = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}.get(file.suffix.lower())
    if mime is None:
      raise ValueError(f"report {name}: keyframe {str(keyframe)!r} must be a .png or .jpg file")
    try:
      data = file.read_bytes()
    except OSError as e:
      raise ValueError(f"report {name}: cannot read keyframe {file} ({e.strerror or e})") from None
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if decoded is None:
      raise ValueError(f"report {name}: keyframe {file} is not a readable image")
    h, w = decoded.shape[:2]
  else:
    image = _check_image(keyframe, f"report {name} keyframe")
    mime, data = "image/png", png_bytes(image)
    h, w = image.shape[:2]
  return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}", (w, h)


def _video(target: str | os.PathLike, what: str) -> str:
  if not isinstance(target, str | os.PathLike):
    raise ValueError(f"the video path for {what} must be a string or path, got {target!r}")
  relative = pathlib.PurePath(target)
  src = pathlib.Path(target).as_uri() if relative.is_absolute() else urllib.parse.quote(relative.as_posix())
  return f'<video controls preload="metadata" src="{_esc(src)}" aria-label="{_esc(what)}"></video>'


def _table(metrics: Mapping[str, Any]) -> str:
  if not isinstance(metrics, Mapping):
    raise ValueError(f"metrics must be a mapping of names to values, got {type(metrics).__name__}")
  rows = "".join(
    f'<tr><th scope="row">{_esc(k)}</th><td class="num">{_esc(format_value(v))}</td></tr>'
    for k, v in flatten(metrics).items()
  )
  return f'<table class="metrics">{rows}</table>'


def flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"a": {"b": 1}, "c": 2} -> {"a.b": 1, "c": 2}, in insertion order."""
  out = {}
  for key, value in metrics.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten(value, f"{name}."))
    else:
      out[name] = value
  return out


def format_value(value: Any) -> str:
  """A metric as shown: 4 significant digits, whole numbers from 1000 up, None as an en dash."""
  if value is None:
    return MISSING
  if isinstance(value, np.ndarray):
    value = value.item() if value.size == 1 else value.tolist()
  if isinstance(value, bool | np.bool_):
    return "true" if value else "false"
  if isinstance(value, numbers.Integral):
    return str(int(value))
  if isinstance(value, numbers.Real):
    v = float(value)
    if not math.isfinite(v):
      return str(v)
    return f"{v:.0f}" if 1000 <= abs(v) < 1e15 else f"{v:.4g}"
  if isinstance(value, list | tuple):
    return ", ".join(format_value(v) for v in value)
  return str(value)


def _esc(text: Any) -> str:
  return html.escape(str(text), quote=True)


# ---------------------------------------------------------------------------------------------------------------
# The run folder.


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Yields a hidden sibling folder ``.NAME.partial-XXXXXXXX`` to fill; publishes it as ``out_dir`` on success.

  On success an existing ``out_dir`` is replaced: it is renamed aside, the new folder renamed in, then the old one
  deleted (if the second rename fails the old folder is put back). On an exception the temporary folder is deleted
  and any previous ``out_dir`` is left as it was. A killed process can leave a ``.NAME.partial-*`` folder behind;
  it is never read and is safe to delete.
  """
  final = pathlib.Path(out_dir)
  if final.exists() and not final.is_dir():
    raise FileExistsError(f"output folder {final} exists and is not a folder")
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = _fresh_sibling(final, "partial")
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  _fsync_tree(tmp)
  if not final.exists():
    os.rename(tmp, final)
    return
  old = _fresh_sibling(final, "old")
  os.rename(final, old)  # over the empty placeholder folder just made
  try:
    os.rename(tmp, final)
  except BaseException:
    os.rename(old, final)
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  shutil.rmtree(old, ignore_errors=True)


def _fresh_sibling(final: pathlib.Path, kind: str) -> pathlib.Path:
  """A new empty hidden folder next to ``final``; mkdir (not mkdtemp) so the folder gets the usual permissions."""
  while True:
    candidate = final.parent / f".{final.name}.{kind}-{secrets.token_hex(4)}"
    try:
      candidate.mkdir()
      return candidate
    except FileExistsError:
      continue


def _fsync_tree(folder: pathlib.Path) -> None:
  """Flushes file contents before the rename publishes them, so a crash after the rename cannot lose them."""
  for path in folder.rglob("*"):
    if path.is_file():
      with open(path, "rb") as f:
        os.fsync(f.fileno())
