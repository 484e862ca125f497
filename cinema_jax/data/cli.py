"""``cinema-jax synth`` and ``cinema-jax ingest``: the data pipeline's commands.

  cinema-jax synth --out DIR [--config configs/data.py[:variant]] [--num-films N] [--seed S] [--config.a.b=v ...]
  cinema-jax ingest PATHS... --out DIR [--config configs/data.py[:variant]] [--quiet] [--config.a.b=v ...]

``ingest`` prints one line ``skipped PATH: REASON`` per file it could not use, then a summary; it exits 0 when the
data set holds at least one of the given videos (written now or by an earlier run), 1 when nothing could be
ingested, 2 on a usage or config error. Both also run as ``python -m cinema_jax.data.cli synth|ingest ...``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cinema_jax import config as config_lib

DEFAULT_CONFIG = "configs/data.py"


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  args, rest = parser.parse_known_args(list(argv))
  bad = [a for a in rest if not a.startswith("--config.")]
  if bad:
    parser.error(f"unrecognized arguments: {' '.join(bad)} (config overrides look like --config.key=value)")
  return args, rest


def _load(spec: str, overrides: list[str], prog: str):
  try:
    return config_lib.load_config(spec, overrides)
  except config_lib.ConfigError as e:
    print(f"{prog}: config error: {e}", file=sys.stderr)
    return None


def synth_main(argv: Sequence[str]) -> int:
  parser = argparse.ArgumentParser(
    prog="cinema-jax synth", description="Write the synthetic film data set: NAME.mp4 + NAME.json + NAME.gt.npz."
  )
  parser.add_argument("--out", required=True, help="output folder (films already there with the same seed are kept)")
  parser.add_argument("--config", default=DEFAULT_CONFIG, help="config file[:variant] (default: %(default)s)")
  parser.add_argument("--num-films", type=int, default=None, help="films to write (default: config synth.num_films)")
  parser.add_argument("--seed", type=int, default=None, help="seed of the first film (default: config synth.seed)")
  parser.add_argument("--quiet", action="store_true", help="no progress bar")
  args, overrides = _parse(parser, argv)
  config = _load(args.config, overrides, "cinema-jax synth")
  if config is None:
    return 2
  from cinema_jax.data import synthetic

  s = config.synth
  num = s.num_films if args.num_films is None else args.num_films
  seed = s.seed if args.seed is None else args.seed
  paths = synthetic.generate_films(
    args.out, num, seed=seed, crf=s.crf, track_grid=tuple(s.track_grid), progress=not args.quiet,
    **synthetic.film_options(s),
  )  # fmt: skip
  print(
    f"wrote {len(paths)} films ({s.width}x{s.height} @ {s.fps:g} fps, seeds {seed}..{seed + num - 1}) to {args.out}"
  )
  return 0


def ingest_main(argv: Sequence[str]) -> int:
  parser = argparse.ArgumentParser(
    prog="cinema-jax ingest", description="Ingest videos (files or folders) into shards for the grain loaders."
  )
  parser.add_argument("paths", nargs="+", help="video files or folders of videos")
  parser.add_argument("--out", required=True, help="data set folder (finished videos in it are skipped)")
  parser.add_argument("--config", default=DEFAULT_CONFIG, help="config file[:variant] (default: %(default)s)")
  parser.add_argument("--quiet", action="store_true", help="no progress bars")
  args, overrides = _parse(parser, argv)
  config = _load(args.config, overrides, "cinema-jax ingest")
  if config is None:
    return 2
  from cinema_jax.data import ingest, shards

  def say(line: str) -> None:
    print(line, flush=True)

  try:
    report = ingest.ingest(args.paths, args.out, config.ingest, progress=not args.quiet, on_skip=say)
  except ingest.SettingsMismatch as e:
    print(f"cinema-jax ingest: {e}", file=sys.stderr)
    return 2
  totals = shards.load_manifest(args.out)["totals"]
  print(
    f"ingested {len(report.ingested)} videos ({len(report.present)} already present, {len(report.skipped)} skipped); "
    f"{args.out}: {totals['videos']} videos, {totals['shots']} shots, {totals['clips']} clips "
    f"({totals['control_clips']} with control maps)"
  )
  return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  commands = {"synth": synth_main, "ingest": ingest_main}
  if not argv or argv[0] not in commands:
    print(f"usage: python -m cinema_jax.data.cli {{{','.join(commands)}}} ...", file=sys.stderr)
    return 2
  return commands[argv[0]](argv[1:])


if __name__ == "__main__":
  sys.exit(main())
