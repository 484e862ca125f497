"""Captioners: one caption per detected shot, plus a synopsis of the video.

The interface is a callable ``captioner(video_path, shots, fps) -> FilmCaptions`` that raises ``MissingCaption``
when it has no caption for the video or for one of its shots (ingest then skips the video with that reason). A
vision-language captioner plugs in by implementing the same call and registering in ``CAPTIONERS``.

``SidecarCaptioner`` reads a file beside the video with the same stem, trying in order:

* ``STEM.json``: ``{"shots": [{"start": int, "end": int, "caption": str}, ...], "synopsis": str}`` with frame
  ranges end exclusive (the synthetic films' sidecar), or ``{"captions": [str, ...], "synopsis": str}`` with one
  caption per detected shot, in order. ``synopsis`` is optional. A caption or synopsis that is not a string is a
  ``BadSidecar`` error naming the file and the field.
* ``STEM.srt``: subtitles; a shot's caption is the text of every cue that overlaps it in time, in order.
* ``STEM.txt``: one line per detected shot, or a single line used for every shot.

Ranged captions (JSON ``shots``, SRT cues) are matched to detected shots by overlap: a shot takes the caption of
the JSON shot it overlaps most, or the text of all cues it overlaps. Without a synopsis, the synopsis is the shot
captions joined in order.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from collections.abc import Sequence
from typing import Protocol

Shots = Sequence[tuple[int, int]]


class MissingCaption(ValueError):
  """No usable caption for a video or one of its shots."""


class BadSidecar(MissingCaption):
  """A caption sidecar whose fields have the wrong type (e.g. a number where text belongs)."""


def _text(value, source: pathlib.Path, field: str) -> str:
  if not isinstance(value, str):
    raise BadSidecar(f"caption sidecar {source.name}: {field} must be a string, not {type(value).__name__} {value!r}")
  return value


@dataclasses.dataclass(frozen=True)
class FilmCaptions:
  shots: list[str]
  synopsis: str


class Captioner(Protocol):
  def __call__(self, video_path: pathlib.Path, shots: Shots, fps: float) -> FilmCaptions: ...


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
  return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


def _finish(captions: list[str], synopsis: str | None, shots: Shots, source: pathlib.Path) -> FilmCaptions:
  for i, (text, (start, end)) in enumerate(zip(captions, shots, strict=True)):
    if not text.strip():
      raise MissingCaption(f"missing caption for shot {i} (frames {start}-{end}) in {source.name}")
  captions = [c.strip() for c in captions]
  return FilmCaptions(captions, (synopsis or "").strip() or " ".join(captions))


def _from_json(source: pathlib.Path, shots: Shots) -> FilmCaptions:
  try:
    data = json.loads(source.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise MissingCaption(f"unreadable caption sidecar {source.name}: {e}") from e
  if not isinstance(data, dict):
    raise MissingCaption(f"caption sidecar {source.name} is not a JSON object")
  synopsis = data.get("synopsis")
  if synopsis is not None:
    _text(synopsis, source, "'synopsis'")
  if isinstance(data.get("captions"), list):
    texts = [_text(c, source, f"'captions'[{i}]") for i, c in enumerate(data["captions"])]
    if len(texts) != len(shots):
      raise MissingCaption(f"{source.name} has {len(texts)} captions for {len(shots)} detected shots")
    return _finish(texts, synopsis, shots, source)
  ranged = data.get("shots")
  if not isinstance(ranged, list) or not ranged:
    raise MissingCaption(f"caption sidecar {source.name} has neither 'shots' nor 'captions'")
  try:
    spans = [((float(s["start"]), float(s["end"])), s.get("caption", "")) for s in ranged]
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    raise MissingCaption(f"caption sidecar {source.name}: a shot lacks start/end ({e})") from e
  spans = [(span, _text(text, source, f"'shots'[{i}].caption")) for i, (span, text) in enumerate(spans)]
  texts = []
  for shot in shots:
    best = max(spans, key=lambda span: _overlap(span[0], shot))
    texts.append(best[1] if _overlap(best[0], shot) > 0 else "")
  return _finish(texts, synopsis, shots, source)


_CUE_TIME = re.compile(r"(\d+):(\d+):(\d+)[,.](\d+)\s*-->\s*(\d+):(\d+):(\d+)[,.](\d+)")


def _seconds(h: str, m: str, s: str, ms: str) -> float:
  return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 10 ** len(ms)


def read_srt(source: pathlib.Path) -> list[tuple[float, float, str]]:
  """(start s, end s, text) of every cue of an SRT file."""
  cues = []
  text = source.read_text(encoding="utf-8-sig").replace("\r\n", "\n")
  for block in re.split(r"\n\s*\n", text.strip()):
    lines = block.split("\n")
    for k, line in enumerate(lines):
      match = _CUE_TIME.search(line)
      if match:
        g = match.groups()
        cues.append((_seconds(*g[:4]), _seconds(*g[4:]), " ".join(x.strip() for x in lines[k + 1 :] if x.strip())))
        break
  return cues


def _from_srt(source: pathlib.Path, shots: Shots, fps: float) -> FilmCaptions:
  try:
    cues = read_srt(source)
  except (OSError, UnicodeDecodeError) as e:
    raise MissingCaption(f"unreadable subtitles {source.name}: {e}") from e
  if not cues:
    raise MissingCaption(f"subtitles {source.name} hold no cues")
  texts = []
  for start, end in shots:
    span = (start / fps, end / fps)
    texts.append(" ".join(t for a, b, t in cues if _overlap((a, b), span) > 0))
  return _finish(texts, None, shots, source)


def _from_txt(source: pathlib.Path, shots: Shots) -> FilmCaptions:
  try:
    lines = [line.strip() for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
  except (OSError, UnicodeDecodeError) as e:
    raise MissingCaption(f"unreadable caption file {source.name}: {e}") from e
  if len(lines) == 1:
    return _finish(lines * len(shots), lines[0], shots, source)
  if len(lines) != len(shots):
    raise MissingCaption(f"{source.name} has {len(lines)} caption lines for {len(shots)} detected shots")
  return _finish(lines, None, shots, source)


@dataclasses.dataclass(frozen=True)
class SidecarCaptioner:
  """Captions from ``STEM.json``, ``STEM.srt`` or ``STEM.txt`` beside the video (first found wins)."""

  def __call__(self, video_path: pathlib.Path, shots: Shots, fps: float) -> FilmCaptions:
    video_path = pathlib.Path(video_path)
    tried = []
    for suffix in (".json", ".srt", ".txt"):
      source = video_path.with_suffix(suffix)
      tried.append(source.name)
      if source.exists():
        if suffix == ".json":
          return _from_json(source, shots)
        if suffix == ".srt":
          return _from_srt(source, shots, fps)
        return _from_txt(source, shots)
    raise MissingCaption(f"missing caption: no sidecar (looked for {', '.join(tried)})")


CAPTIONERS = {"sidecar": SidecarCaptioner}


def get_captioner(name: str, **options) -> Captioner:
  if name not in CAPTIONERS:
    raise KeyError(f"unknown captioner {name!r}; choose one of {', '.join(CAPTIONERS)}")
  return CAPTIONERS[name](**options)
