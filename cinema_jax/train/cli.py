"""``cinema-jax train --config configs/X.py:variant --workdir DIR [--config.a.b=v ...]``.

Multi-process runs pass ``--coordinator host:port --num-processes N --process-id I`` (or the
``CINEMA_JAX_COORDINATOR`` / ``CINEMA_JAX_NUM_PROCESSES`` / ``CINEMA_JAX_PROCESS_ID`` variables); TPU VMs, SLURM
and mpirun are detected without them (``cinema_jax.parallel.initialize``). Every process runs the same command.
"""

from __future__ import annotations

import argparse
import sys

USAGE = "cinema-jax train --config configs/X.py:variant --workdir DIR [--config.key=value ...]"


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="cinema-jax train", usage=USAGE, description=__doc__.splitlines()[0])
  p.add_argument("--config", required=True, help="config file and variant, e.g. configs/train_keyframes.py:tiny")
  p.add_argument("--workdir", required=True, help="checkpoints and TensorBoard files; a second run resumes here")
  p.add_argument("--coordinator", default=None, help="host:port of process 0 (multi-process runs)")
  p.add_argument("--num-processes", type=int, default=None, help="processes in the job")
  p.add_argument("--process-id", type=int, default=None, help="this process's index in [0, num-processes)")
  return p


def train_main(argv: list[str]) -> int:
  """Entry of the ``train`` subcommand; returns the exit status."""
  args, rest = parser().parse_known_args(argv)
  unknown = [a for a in rest if not a.startswith("--config.")]
  if unknown:
    print(f"cinema-jax train: unknown arguments {unknown}; usage: {USAGE}", file=sys.stderr)
    return 2
  # Start the multi-process runtime before anything touches a device.
  from cinema_jax.parallel import initialize

  try:
    initialize(args.coordinator, args.num_processes, args.process_id)
  except ValueError as e:
    print(f"cinema-jax train: {e}", file=sys.stderr)
    return 2
  from cinema_jax.config import ConfigError, load_config
  from cinema_jax.train.metrics import NonFiniteError
  from cinema_jax.train.trainer import train_and_evaluate

  try:
    config = load_config(args.config, rest)
  except ConfigError as e:
    print(f"cinema-jax train: {e}", file=sys.stderr)
    return 2
  import jax

  from cinema_jax.parallel import resolve_mesh_shape

  try:  # a mesh that does not fit the devices is a configuration mistake: one line, not a traceback
    resolve_mesh_shape(config.mesh.to_dict(), jax.device_count())
  except ValueError as e:
    print(
      f"cinema-jax train: config mesh does not fit this machine: {e} (set --config.mesh.data=... or run with "
      "XLA_FLAGS=--xla_force_host_platform_device_count=8 on a CPU)",
      file=sys.stderr,
    )
    return 2
  try:
    result = train_and_evaluate(config, args.workdir)
  except NonFiniteError as e:
    print(f"cinema-jax train: {e}", file=sys.stderr)
    return 1
  return 3 if result.preempted else 0


def export_main(argv: list[str]) -> int:
  """``cinema-jax export WORKDIR [--out FILE]``: the sampling parameters of a run's newest readable checkpoint."""
  p = argparse.ArgumentParser(prog="cinema-jax export", description=export_main.__doc__.split(": ", 1)[1])
  p.add_argument("workdir", help="a training workdir (its checkpoints/ folder is read)")
  p.add_argument("--out", default=None, help="output file (default: WORKDIR/params.safetensors)")
  args = p.parse_args(argv)
  from cinema_jax.train.export import ParamsFileError, export_from_workdir

  try:
    path = export_from_workdir(args.workdir, args.out)
  except ParamsFileError as e:
    print(f"cinema-jax export: {e}", file=sys.stderr)
    return 2
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(train_main(sys.argv[1:]))
