"""``cinema-jax <command>``: the command line.

Commands take ``--config configs/x.py[:variant]`` plus any number of ``--config.key.sub=value`` overrides.

  cinema-jax demo   [--config configs/story.py] [--config.a.b=v ...]  run the demo (``make demo``)
  cinema-jax config SPEC [--config.a.b=v ...]                         print a resolved config
  cinema-jax bench NAME [benchmark options]                           run a benchmark (cinema_jax/bench/NAME.py)
  cinema-jax synth --out DIR [--config configs/data.py[:variant]] [--num-films N] [--seed S]
  cinema-jax ingest PATHS... --out DIR [--config configs/data.py[:variant]]   one line per skipped file
  cinema-jax train --config configs/X.py:variant --workdir DIR [--config.a.b=v ...]   train (resumes from DIR)
  cinema-jax export WORKDIR [--out FILE]                              params.safetensors of a run's checkpoint
  cinema-jax story STORY.yaml --out DIR [--config configs/story.py] [--config.a.b=v ...]   story -> movie + report
  cinema-jax eval VIDEO [--reference REF] [--json]                     video metrics
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cinema_jax import config as config_lib


def _split_overrides(parser: argparse.ArgumentParser, rest: Sequence[str]) -> list[str]:
  bad = [a for a in rest if not a.startswith("--config.")]
  if bad:
    parser.error(f"unrecognized arguments: {' '.join(bad)} (config overrides look like --config.key=value)")
  return list(rest)


def _cmd_config(args, overrides) -> int:
  print(config_lib.load_config(args.spec, overrides))
  return 0


def _cmd_demo(args, overrides) -> int:
  from cinema_jax import demo  # jax starts only for commands that need it

  return demo.main(config_lib.load_config(args.config, overrides))


def _cmd_bench(args, rest) -> int:
  from cinema_jax import bench

  try:
    module = bench.load(args.name)
  except KeyError as e:
    print(f"cinema-jax bench: {e.args[0]}", file=sys.stderr)
    return 2
  return module.main(list(rest))


def _cmd_synth(args, rest) -> int:
  from cinema_jax.data import cli as data_cli

  return data_cli.synth_main(list(rest))


def _cmd_ingest(args, rest) -> int:
  from cinema_jax.data import cli as data_cli

  return data_cli.ingest_main(list(rest))


def _cmd_train(args, rest) -> int:
  from cinema_jax.train.cli import train_main

  return train_main(list(rest))


def _cmd_export(args, rest) -> int:
  from cinema_jax.train.cli import export_main

  return export_main(list(rest))


def _cmd_story(args, rest) -> int:
  from cinema_jax.pipelines.story import story_main

  return story_main(list(rest))


def _cmd_eval(args, rest) -> int:
  from cinema_jax.eval.cli import main as eval_main

  return eval_main(list(rest))


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="cinema-jax", description="Story-driven long-form video diffusion in JAX.")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  p = sub.add_parser("demo", help="run the demo on the embedded default (what `make demo` runs)")
  p.add_argument("--config", default="configs/story.py", help="config file[:variant] (default: %(default)s)")
  p.set_defaults(run=_cmd_demo)
  p = sub.add_parser("config", help="print a config after variants and overrides")
  p.add_argument("spec", help="config file[:variant], e.g. configs/base.py:fsdp")
  p.set_defaults(run=_cmd_config)
  p = sub.add_parser("bench", help="run a benchmark and print its table (see cinema_jax/bench/)", add_help=False)
  p.add_argument("name", help="benchmark name, e.g. keyframes, rollout, video-dit, attention")
  p.set_defaults(run=_cmd_bench, passthrough=True)
  # The data commands parse their own options (add_help=False lets --help reach them).
  p = sub.add_parser(
    "synth", help="write the synthetic film data set (mp4 + JSON sidecar + ground truth)", add_help=False
  )
  p.set_defaults(run=_cmd_synth, passthrough=True)
  p = sub.add_parser(
    "ingest", help="ingest videos into shards for the grain loaders (PATHS... --out DIR)", add_help=False
  )
  p.set_defaults(run=_cmd_ingest, passthrough=True)
  p = sub.add_parser("train", help="train a model: --config configs/X.py:variant --workdir DIR", add_help=False)
  p.set_defaults(run=_cmd_train, passthrough=True)
  p = sub.add_parser("export", help="sampling parameters of a training run: WORKDIR [--out FILE]", add_help=False)
  p.set_defaults(run=_cmd_export, passthrough=True)
  p = sub.add_parser("story", help="render a story file: STORY.yaml --out DIR (movie, clips, report)", add_help=False)
  p.set_defaults(run=_cmd_story, passthrough=True)
  p = sub.add_parser("eval", help="video metrics of VIDEO [--reference REF] [--json]", add_help=False)
  p.set_defaults(run=_cmd_eval, passthrough=True)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
  # Benchmarks parse their own options; other commands take only config overrides.
  overrides = rest if getattr(args, "passthrough", False) else _split_overrides(parser, rest)
  try:
    return args.run(args, overrides)
  except config_lib.ConfigError as e:
    print(f"cinema-jax: config error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
