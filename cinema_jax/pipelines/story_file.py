"""Story files: the YAML a user writes to describe a movie, read and checked before anything is generated.

A story has a title, a cast of named characters and a list of shots; each shot has a caption, a duration in
seconds, an optional seed and an optional control video (a path relative to the story file). The format and its
rules are documented in docs/story.md; ``stories/demo.yaml`` is an example.

Validation stops at the first problem and raises one ``StoryError`` whose message names the file, the line, the
field (``shots[2].duration``: indices count from 0, as in the file's list) and what was wrong, so a bad story fails
before any output folder is touched.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

TOP_KEYS = ("title", "characters", "shots")
CHARACTER_KEYS = ("name", "description")
SHOT_KEYS = ("caption", "duration", "seed", "control")
SEED_LIMIT = 2**32  # seeds must fit both numpy's generators and a uint32 PRNG key


class StoryError(ValueError):
  """A story file that cannot be used; the message names the file, line, field and problem."""

  def __init__(self, source: str | os.PathLike, message: str, *, path: tuple = (), line: int | None = None):
    self.source, self.message, self.path, self.line = str(source), message, tuple(path), line
    where = self.source if line is None else f"{self.source}, line {line}"
    super().__init__(f"{where}: {message}")


@dataclasses.dataclass(frozen=True)
class Character:
  name: str
  description: str  # e.g. "the red circle"


@dataclasses.dataclass(frozen=True)
class StoryShot:
  caption: str  # whitespace collapsed to single spaces
  duration: float  # seconds, > 0
  seed: int | None = None  # fixes this shot's noise; None leaves the choice to the pipeline
  control: pathlib.Path | None = None  # an existing video file, resolved against the story file's folder


@dataclasses.dataclass(frozen=True)
class Story:
  title: str
  characters: tuple[Character, ...]
  shots: tuple[StoryShot, ...]
  source: pathlib.Path

  @property
  def duration(self) -> float:
    """Total length in seconds."""
    return sum(shot.duration for shot in self.shots)

  def characters_in(self, shot_index: int) -> list[Character]:
    """The characters whose name appears as a whole word in the shot's caption, in cast order.

    Case-sensitive: names are proper nouns, and "Bo" must not match "bo" in a sentence like "bo staff".
    """
    caption = self.shots[shot_index].caption
    return [c for c in self.characters if re.search(rf"(?<!\w){re.escape(c.name)}(?!\w)", caption)]


def shot_frames(story: Story, fps: float, *, multiple: int = 1, minimum: int = 1) -> list[int]:
  """Frames per shot: duration * fps rounded half up to a multiple of ``multiple``, and never below ``minimum``.

  When rounding lands below ``minimum`` the shot gets the smallest multiple of ``multiple`` that reaches it, so every
  count is a multiple (a model's temporal stride or window) and long enough for the model.
  """
  if not _positive_number(fps):
    raise ValueError(f"fps must be a positive number, got {fps!r}")
  for name, value in (("multiple", multiple), ("minimum", minimum)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
  floor = -(-minimum // multiple) * multiple
  return [max(floor, math.floor(shot.duration * fps / multiple + 0.5) * multiple) for shot in story.shots]


# ---------------------------------------------------------------------------------------------------------------
# Reading.


class _Loader(yaml.SafeLoader):
  """The safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the last silently)."""

  def construct_mapping(self, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
      if key_node.tag == "tag:yaml.org,2002:merge":
        continue
      key = self.construct_object(key_node, deep=True)
      try:
        duplicate = key in seen
      except TypeError:  # an unhashable key: let the base class report it
        break
      if duplicate:
        raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} appears twice", key_node.start_mark)
      seen.add(key)
    return super().construct_mapping(node, deep=deep)


def load_story(path: str | os.PathLike) -> Story:
  """Reads and validates a story file; raises ``StoryError`` naming the first problem."""
  path = pathlib.Path(path)
  try:
    text = path.read_text(encoding="utf-8")
  except FileNotFoundError:
    raise StoryError(path, "no such story file") from None
  except IsADirectoryError:
    raise StoryError(path, "is a folder, not a story file") from None
  except UnicodeDecodeError as e:
    raise StoryError(path, f"is not UTF-8 text (byte {e.start})") from None
  except OSError as e:
    raise StoryError(path, f"cannot be read ({e.strerror or e})") from None
  try:
    data = yaml.load(text, Loader=_Loader)
  except yaml.YAMLError as e:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    raise StoryError(path, f"not valid YAML: {problem}", line=None if mark is None else mark.line + 1) from None
  try:
    return parse_story(data, path)
  except StoryError as e:
    raise StoryError(path, e.message, path=e.path, line=_line_of(text, e.path)) from None


def _line_of(text: str, path: tuple) -> int | None:
  """1-based line of the node at ``path`` (keys and indices) in the YAML text, or of its deepest existing parent."""
  if not path:  # a problem with the file as a whole
    return None
  try:
    node = yaml.compose(text, Loader=_Loader)
  except yaml.YAMLError:
    return None
  line = None if node is None else node.start_mark.line + 1
  for step in path:
    if isinstance(node, yaml.MappingNode):
      match = [(k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == str(step)]
      if not match:
        break
      key, node = match[0]
      line = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode) and isinstance(step, int) and 0 <= step < len(node.value):
      node = node.value[step]
      line = node.start_mark.line + 1
    else:
      break
  return line


# ---------------------------------------------------------------------------------------------------------------
# Validation.


def parse_story(data: Any, source: str | os.PathLike) -> Story:
  """A ``Story`` from the loaded YAML value; ``source`` names the file in errors and anchors control paths."""
  source = pathlib.Path(source)
  if data is None:
    raise StoryError(source, "the file is empty; a story needs at least a title and shots")
  if not isinstance(data, Mapping):
    raise StoryError(source, f"the top level must be a mapping with keys {', '.join(TOP_KEYS)}, got {_show(data)}")
  _check_keys(source, data, TOP_KEYS, ())
  title = _text(source, data, "title", ())
  characters = _characters(source, data.get("characters", []))
  if "shots" not in data:
    raise StoryError(source, "shots is missing: a story needs a list of at least one shot")
  shots = data["shots"]
  if not isinstance(shots, Sequence) or isinstance(shots, str):
    raise StoryError(source, f"shots must be a list of shots, got {_show(shots)}", path=("shots",))
  if not shots:
    raise StoryError(source, "shots is empty: a story needs at least one shot", path=("shots",))
  parsed = tuple(_shot(source, shot, i) for i, shot in enumerate(shots))
  return Story(title=title, characters=characters, shots=parsed, source=source)


def _characters(source: pathlib.Path, value: Any) -> tuple[Character, ...]:
  if value is None:
    return ()
  if not isinstance(value, Sequence) or isinstance(value, str):
    raise StoryError(
      source, f"characters must be a list of {{name, description}} entries, got {_show(value)}", path=("characters",)
    )
  out: dict[str, Character] = {}
  for i, entry in enumerate(value):
    path = ("characters", i)
    if not isinstance(entry, Mapping):
      raise StoryError(
        source, f"{_field(path)} must be a mapping with keys name, description, got {_show(entry)}", path=path
      )
    _check_keys(source, entry, CHARACTER_KEYS, path)
    name = _text(source, entry, "name", path)
    if name in out:
      raise StoryError(source, f"{_field(path + ('name',))} repeats the character name {name!r}", path=(*path, "name"))
    out[name] = Character(name=name, description=_text(source, entry, "description", path))
  return tuple(out.values())


def _shot(source: pathlib.Path, value: Any, index: int) -> StoryShot:
  path = ("shots", index)
  if not isinstance(value, Mapping):
    raise StoryError(
      source, f"{_field(path)} must be a mapping with keys {', '.join(SHOT_KEYS)}, got {_show(value)}", path=path
    )
  _check_keys(source, value, SHOT_KEYS, path)
  caption = _text(source, value, "caption", path)
  if "duration" not in value:
    raise StoryError(source, f"{_field(path + ('duration',))} is missing (seconds, e.g. 2.5)", path=path)
  duration = value["duration"]
  if not _positive_number(duration):
    raise StoryError(
      source,
      f"{_field(path + ('duration',))} must be a positive number of seconds, got {_show(duration)}",
      path=(*path, "duration"),
    )
  seed = value.get("seed")
  if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT):
    raise StoryError(
      source, f"{_field(path + ('seed',))} must be an integer in [0, 2**32), got {_show(seed)}", path=(*path, "seed")
    )
  control = value.get("control")
  if control is not None:
    if not isinstance(control, str) or not control.strip():
      raise StoryError(
        source,
        f"{_field(path + ('control',))} must be the path of a video file, got {_show(control)}",
        path=(*path, "control"),
      )
    resolved = (source.parent / control).resolve()
    if not resolved.is_file():
      raise StoryError(
        source,
        f"{_field(path + ('control',))}: no such video file {control!r} (looked for {resolved})",
        path=(*path, "control"),
      )
    control = resolved
  return StoryShot(caption=caption, duration=float(duration), seed=seed, control=control)


def _text(source: pathlib.Path, mapping: Mapping, key: str, path: tuple) -> str:
  """A required non-empty string field, whitespace collapsed (block scalars bring newlines and indentation)."""
  field = _field((*path, key))
  if key not in mapping:
    raise StoryError(source, f"{field} is missing (a non-empty string)", path=path)
  value = mapping[key]
  if not isinstance(value, str):
    hint = " (quote it: YAML reads yes/no/on/off/true/false as booleans)" if isinstance(value, bool) else ""
    raise StoryError(source, f"{field} must be a string, got {_show(value)}{hint}", path=(*path, key))
  text = " ".join(value.split())
  if not text:
    raise StoryError(source, f"{field} is empty", path=(*path, key))
  return text


def _check_keys(source: pathlib.Path, mapping: Mapping, allowed: tuple[str, ...], path: tuple) -> None:
  for key in mapping:
    if key not in allowed:
      close = difflib.get_close_matches(str(key), allowed, n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      owner = _field(path) if path else "the story"
      raise StoryError(
        source,
        f"{owner} has an unknown key {key!r}{hint}; allowed keys: {', '.join(allowed)}",
        path=(*path, key),
      )


def _positive_number(value: Any) -> bool:
  """True for finite numbers > 0; YAML's ``true`` is a bool, and bools are not numbers here."""
  return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value) and value > 0


def _field(path: tuple) -> str:
  """("shots", 2, "duration") -> "shots[2].duration"."""
  out = ""
  for step in path:
    out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else str(step))
  return out


def _show(value: Any) -> str:
  if isinstance(value, Mapping):
    return "a mapping"
  if isinstance(value, list | tuple):
    return "a list"
  if value is None:
    return "nothing"
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + "..."
