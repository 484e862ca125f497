"""What `make demo` runs: a story becomes a movie, from synthetic films to the HTML report, on the CPU.

Steps (all under ``demo.root``, default ``runs/story``):

1. ``cinema-jax synth``: the synthetic films the demo models were trained on (configs/data.py:story: 480 films of
   3-5 shots, 96 x 64 at 12 fps, captions and ground truth beside each; about a minute).
2. ``cinema-jax ingest``: shots by PySceneDetect, captions from the sidecars, keyframes and 8-frame clips in shards.
3. Models: by default the parameters shipped in demo/ (written by the two `cinema-jax train` runs that
   demo/README.md records); with ``demo.train=True`` (``make demo TRAIN=1``) both models are trained here on the
   ingested films instead, with exactly those commands.
4. ``cinema-jax story stories/demo.yaml``: keyframes with GoldenMem memory, clips by diffusion forcing, movie.mp4,
   clips/, keyframes.png, metrics.json and report.html in ``runs/story/movie``.

The run ends with the checks the story is held to: shots detected in the movie = shots in the story, no NaN or
constant frames, motion (dynamic degree > 0), and adherence on the synthetic world's colours and shapes.
"""

from __future__ import annotations

import pathlib
import sys
import time

import ml_collections


def _step(title: str) -> float:
  print(f"\n== {title}", flush=True)
  return time.perf_counter()


def _done(t0: float) -> None:
  print(f"   ({time.perf_counter() - t0:.0f} s)", flush=True)


def checks(metrics: dict) -> list[tuple[str, bool, str]]:
  """(name, passed, figure) of the demo's acceptance checks; checks of metrics that were not computed are left out."""
  frames, video, adh = metrics["frames"], metrics.get("video"), metrics.get("adherence")
  out = [
    ("no NaN latents", frames["nonfinite_latents"] == 0, str(frames["nonfinite_latents"])),
    ("no constant frames", frames["constant_frames"] == 0, f"{frames['constant_frames']} of {frames['frames']}"),
  ]
  if video:
    shots = metrics["story"]["shots"]
    out.insert(
      0, ("shots detected = shots in the story", video.get("num_shots") == shots, f"{video.get('num_shots')} / {shots}")
    )
    dyn = video.get("dynamic_degree")
    out.append(("objects move (dynamic degree > 0)", (dyn or 0) > 0, f"{dyn}"))
  if adh:
    for name, key, floor in (
      ("captioned character present >= 70%", "presence", 0.7),
      ("character keeps its colour >= 80%", "colour_consistency", 0.8),
    ):
      value = adh.get(key)  # None: nothing to score (e.g. no character in two shots)
      out.append((name, value is not None and value >= floor, "n/a" if value is None else f"{value:.0%}"))
  return out


def main(config: ml_collections.ConfigDict) -> int:
  from cinema_jax.data import cli as data_cli
  from cinema_jax.pipelines import story as story_lib
  from cinema_jax.pipelines.story_file import load_story

  d = config.demo
  root = pathlib.Path(d.root)
  films, data, out = root / "films", root / "data", root / "movie"
  start = time.perf_counter()

  t0 = _step(f"synthetic films -> {films}")
  count = [] if d.num_films is None else ["--num-films", str(d.num_films)]
  if data_cli.synth_main(["--out", str(films), "--config", d.data_config, *count]) != 0:
    return 1
  _done(t0)
  t0 = _step(f"ingest -> {data}")
  if data_cli.ingest_main([str(films), "--out", str(data), "--config", d.data_config]) != 0:
    return 1
  _done(t0)

  if d.train:
    from cinema_jax.train.cli import train_main

    for name, section in (("keyframes", config.keyframes), ("video", config.video)):
      t0 = _step(f"train the {name} model -> {root / name}")
      overrides = [f"--config.{o}" for o in section.overrides]  # the story loads the model with them too
      code = train_main(["--config", section.config, "--workdir", str(root / name), f"--config.data.root={data}",
                         *overrides])  # fmt: skip
      if code != 0:
        return code
      _done(t0)
    config = ml_collections.ConfigDict(config.to_dict())
    config.keyframes.params = str(root / "keyframes")
    config.video.params = str(root / "video")

  t0 = _step(f"story {d.story} -> {out}")
  try:
    story = load_story(d.story)
    models = story_lib.load_models(config)
    metrics = story_lib.render_story(story, models, out, config)
  except (ValueError, story_lib.StoryRenderError) as e:
    print(f"cinema-jax demo: {e}", file=sys.stderr)
    return 2
  _done(t0)

  _step("outputs")
  story_lib.print_summary(out, metrics)
  results = checks(metrics)
  print()
  for name, passed, figure in results:
    print(f"  [{'ok' if passed else 'FAIL'}] {name}: {figure}")
  failed = sum(not passed for _, passed, _ in results)
  print(f"\ndemo finished in {time.perf_counter() - start:.0f} s; open {out / 'report.html'} in a browser")
  if failed:
    print(f"{failed} of {len(results)} checks failed", file=sys.stderr)
  return 1 if failed else 0
