"""Story files: the demo story speaks the synthetic films' caption grammar; bad files fail with one clear message."""

import dataclasses
import pathlib
import re

import pytest

from cinema_jax.data import synthetic
from cinema_jax.pipelines import story_file
from cinema_jax.pipelines.story_file import StoryError, load_story, parse_story, shot_frames

GOOD = """\
title: A test
characters:
  - name: Ada
    description: the red circle
shots:
  - caption: Ada waits.
    duration: 2.0
  - caption: Ada hops.
    duration: 1.5
    seed: 4
"""


def _alternation(words):
  return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


def _caption_pattern():
  """The grammar of ``synthetic.shot_caption`` as a regex over the cast, settings, actions and camera moves."""
  actor = (
    rf"(?P<name{{k}}>{_alternation(c.name for c in synthetic.CAST)}), "
    rf"the (?P<colour{{k}}>{_alternation(c.colour for c in synthetic.CAST)}) "
    rf"(?P<shape{{k}}>{_alternation(c.shape for c in synthetic.CAST)}), "
    rf"(?P<action{{k}}>{_alternation(synthetic.ACTIONS.values())})"
  )
  wheres = _alternation(s.where[0].upper() + s.where[1:] for s in synthetic.SETTINGS)
  return re.compile(
    rf"(?P<where>{wheres}), {actor.format(k=0)}(?: while {actor.format(k=1)})?\. "
    rf"The camera (?P<camera>{_alternation(synthetic.CAMERA_MOVES.values())})\."
  )


def _rebuild(match):
  """The synthetic Shot a caption describes, with its caption written by the generator's own ``shot_caption``."""
  setting = next(s for s in synthetic.SETTINGS if s.where[0].upper() + s.where[1:] == match["where"])
  cast = {c.name: c for c in synthetic.CAST}
  action = {phrase: name for name, phrase in synthetic.ACTIONS.items()}
  actors = tuple(
    synthetic.Actor(cast[match[f"name{k}"]], action[match[f"action{k}"]], (0.0, 0.0), (0.0, 0.0), (5.0, 5.0), 0.0)
    for k in (0, 1)
    if match[f"name{k}"]
  )
  camera = {phrase: name for name, phrase in synthetic.CAMERA_MOVES.items()}[match["camera"]]
  shot = synthetic.Shot(setting, actors, camera, ((0.0, 0.0), (0.0, 0.0)), (1.0, 1.0), 24, "")
  return dataclasses.replace(shot, caption=synthetic.shot_caption(shot))


def test_demo_story_captions_are_the_synthetic_grammar():
  story = load_story(pathlib.Path(__file__).parents[1] / "stories" / "demo.yaml")
  assert len(story.shots) == 5 and story.title
  pattern = _caption_pattern()
  shots = []
  for i, shot in enumerate(story.shots):
    match = pattern.fullmatch(shot.caption)
    assert match, f"shot {i + 1} caption does not follow the synthetic grammar: {shot.caption!r}"
    rebuilt = _rebuild(match)
    assert rebuilt.caption == shot.caption  # colour and shape belong to the name, word for word
    shots.append(rebuilt)
    assert 2.0 <= shot.duration <= 2.5
    named = [a.character.name for a in rebuilt.actors]
    assert [c.name for c in story.characters_in(i)] == [c.name for c in story.characters if c.name in named]
  assert all(a.setting != b.setting for a, b in zip(shots, shots[1:], strict=False)), "a cut must change the setting"
  assert sum(len(s.actors) == 2 for s in shots) <= 1
  cast = {c.name: c for c in synthetic.CAST}
  assert 2 <= len(story.characters) <= 3
  for character in story.characters:
    assert character.description == f"the {cast[character.name].colour} {cast[character.name].shape}"
    assert sum(character in story.characters_in(i) for i in range(len(story.shots))) >= 2, "characters recur"
  assert any(s.seed is not None for s in story.shots) and any(s.seed is None for s in story.shots)


def test_good_story_parses(tmp_path):
  clip = tmp_path / "control" / "depth.mp4"
  clip.parent.mkdir()
  clip.write_bytes(b"not checked beyond existence")
  path = tmp_path / "story.yaml"
  path.write_text(
    GOOD + "  - caption: |\n      Ada   walks\n      away.\n    duration: 3\n    control: control/depth.mp4\n"
  )
  story = load_story(path)
  assert story.title == "A test" and story.source == path
  assert story.characters == (story_file.Character("Ada", "the red circle"),)
  assert [s.caption for s in story.shots] == ["Ada waits.", "Ada hops.", "Ada walks away."]
  assert [s.duration for s in story.shots] == [2.0, 1.5, 3.0] and isinstance(story.shots[2].duration, float)
  assert [s.seed for s in story.shots] == [None, 4, None]
  assert story.shots[2].control == clip.resolve() and story.shots[0].control is None
  assert story.duration == 6.5
  with pytest.raises(dataclasses.FrozenInstanceError):
    story.title = "other"


def test_parse_story_from_data_resolves_control_against_the_source(tmp_path):
  (tmp_path / "ctl.mp4").write_bytes(b"")
  data = {"title": "T", "shots": [{"caption": "x", "duration": 1, "control": "ctl.mp4"}]}
  story = parse_story(data, tmp_path / "made_up.yaml")
  assert story.characters == () and story.shots[0].control == (tmp_path / "ctl.mp4").resolve()


def _error(tmp_path, text, name="story.yaml"):
  path = tmp_path / name
  path.write_text(text)
  with pytest.raises(StoryError) as info:
    load_story(path)
  message = str(info.value)
  assert "\n" not in message, "one message on one line"
  return message.replace(str(tmp_path) + "/", "")


def test_bad_duration_names_file_line_field_and_value(tmp_path):
  text = GOOD + "  - caption: third\n    duration: abc\n"
  assert _error(tmp_path, text) == (
    "story.yaml, line 12: shots[2].duration must be a positive number of seconds, got 'abc'"
  )


@pytest.mark.parametrize(
  "text, expected",
  [
    ("", "story.yaml: the file is empty"),
    ("- a\n- b\n", "story.yaml: the top level must be a mapping with keys title, characters, shots, got a list"),
    ("title: t\nshots: [\n  {caption: a\n", "story.yaml, line 4: not valid YAML"),
    ("title: t\nshots: []\n", "story.yaml, line 2: shots is empty"),
    ("title: t\n", "story.yaml: shots is missing"),
    ("title: t\nshots: {caption: a}\n", "shots must be a list of shots, got a mapping"),
    ("shots: [{caption: a, duration: 1}]\n", "title is missing"),
    ("title: yes\nshots: [{caption: a, duration: 1}]\n", "title must be a string, got True (quote it"),
    (
      "title: t\nshot: []\n",
      "story.yaml, line 2: the story has an unknown key 'shot' (did you mean 'shots'?); "
      "allowed keys: title, characters, shots",
    ),
    (
      GOOD + "  - captoin: a\n    duration: 1\n",
      "line 11: shots[2] has an unknown key 'captoin' (did you mean 'caption'?); "
      "allowed keys: caption, duration, seed, control",
    ),
    (GOOD + "  - duration: 1\n", "line 11: shots[2].caption is missing (a non-empty string)"),
    (GOOD + "  - caption: '  '\n    duration: 1\n", "line 11: shots[2].caption is empty"),
    (GOOD + "  - caption: 12\n    duration: 1\n", "line 11: shots[2].caption must be a string, got 12"),
    (GOOD + "  - caption: a\n", "shots[2].duration is missing"),
    (GOOD + "  - caption: a\n    duration: 0\n", "shots[2].duration must be a positive number of seconds, got 0"),
    (GOOD + "  - caption: a\n    duration: -1.5\n", "got -1.5"),
    (GOOD + "  - caption: a\n    duration: .inf\n", "got inf"),
    (GOOD + "  - caption: a\n    duration: true\n", "shots[2].duration must be a positive number of seconds, got True"),
    (GOOD + "  - caption: a\n    duration: 1\n    seed: true\n", "line 13: shots[2].seed must be an integer"),
    (
      GOOD + "  - caption: a\n    duration: 1\n    seed: 1.5\n",
      "shots[2].seed must be an integer in [0, 2**32), got 1.5",
    ),
    (GOOD + "  - caption: a\n    duration: 1\n    seed: -1\n", "got -1"),
    (GOOD + "  - caption: a\n    duration: 1\n    seed: 4294967296\n", "got 4294967296"),
    (GOOD + "  - caption: a\n    duration: 1\n    control: 5\n", "shots[2].control must be the path of a video file"),
    (
      GOOD + "  - caption: a\n    duration: 1\n    control: nowhere/depth.mp4\n",
      "line 13: shots[2].control: no such video file 'nowhere/depth.mp4' (looked for ",
    ),
    (GOOD + "  - a caption\n", "line 11: shots[2] must be a mapping with keys caption, duration, seed, control, got"),
    (
      GOOD + "  - caption: a\n    caption: b\n    duration: 1\n",
      "line 12: not valid YAML: the key 'caption' appears twice",
    ),
    (
      "title: t\ncharacters:\n  - {name: Bo, description: x}\n  - {name: Bo, description: y}\n"
      "shots: [{caption: a, duration: 1}]\n",
      "line 4: characters[1].name repeats the character name 'Bo'",
    ),
    (
      "title: t\ncharacters: [{name: Bo}]\nshots: [{caption: a, duration: 1}]\n",
      "characters[0].description is missing",
    ),
    ("title: t\ncharacters: [Bo]\nshots: [{caption: a, duration: 1}]\n", "characters[0] must be a mapping"),
    ("title: t\ncharacters: Bo\nshots: [{caption: a, duration: 1}]\n", "characters must be a list"),
  ],
)
def test_bad_story_files_give_one_clear_error(tmp_path, text, expected):
  assert expected in _error(tmp_path, text)


def test_unreadable_story_files(tmp_path):
  with pytest.raises(StoryError, match=r"missing\.yaml: no such story file$"):
    load_story(tmp_path / "missing.yaml")
  with pytest.raises(StoryError, match="is a folder"):
    load_story(tmp_path)
  (tmp_path / "latin1.yaml").write_bytes(b"title: caf\xe9\n")
  with pytest.raises(StoryError, match="is not UTF-8 text"):
    load_story(tmp_path / "latin1.yaml")


def test_characters_in_matches_whole_names_only():
  story = parse_story(
    {
      "title": "t",
      "characters": [{"name": n, "description": "d"} for n in ("Bo", "Ada", "Al", "Mary Ann")],
      "shots": [
        {"caption": "Bob meets Ada by the boat.", "duration": 1},
        {"caption": "Al's hat; Mary Ann and bo.", "duration": 1},
        {"caption": "Nobody.", "duration": 1},
      ],
    },
    "s.yaml",
  )
  assert [c.name for c in story.characters_in(0)] == ["Ada"]
  assert [c.name for c in story.characters_in(1)] == ["Al", "Mary Ann"]
  assert story.characters_in(2) == []


def test_shot_frames_rounds_to_multiples_with_a_floor():
  story = parse_story(
    {"title": "t", "shots": [{"caption": "x", "duration": d} for d in (2.0, 2.5, 0.01, 1.04, 1.125)]}, "s.yaml"
  )
  assert shot_frames(story, 12) == [24, 30, 1, 12, 14]  # 13.5 rounds half up
  assert shot_frames(story, 12, multiple=4, minimum=5) == [24, 32, 8, 12, 12]
  assert shot_frames(story, 24, minimum=25) == [48, 60, 25, 25, 27]
  for bad in ({"fps": 0}, {"fps": float("nan")}, {"fps": 12, "multiple": 0}, {"fps": 12, "minimum": True}):
    with pytest.raises(ValueError, match="must be"):
      shot_frames(story, **bad)
