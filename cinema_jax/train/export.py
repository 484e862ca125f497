"""Trained parameters as one safetensors file: what sampling, the story pipeline and the shipped demo load.

A checkpoint holds the whole train state (Adam moments, EMA, data position); sampling needs only the parameters,
preferably their exponential moving average. ``export_params`` writes them flat (keys are the parameter paths joined
with "/", e.g. ``text/block_0/qkv/kernel``) in float32 with the config as JSON in the file's metadata, under a
temporary name renamed into place. ``load_params`` reads them back as the nested dict the modules take.
``train_and_evaluate`` exports ``WORKDIR/params.safetensors`` at the end of a single-process run;
``export_from_workdir`` (``cinema-jax export WORKDIR``) does the same from the newest readable checkpoint of any run,
in one process (it reads the arrays whole, so run it where the state fits in host memory).
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
from typing import Any

import numpy as np

from cinema_jax import safetensors_files

FORMAT = "cinema_jax.params.v1"
FILENAME = "params.safetensors"


class ParamsFileError(ValueError):
  """A parameter file that is missing, unreadable or not one of ours."""


def _flatten(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(_flatten(value, name + "/"))
    else:
      out[name] = np.ascontiguousarray(np.asarray(value, np.float32))
  return out


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
  tree: dict = {}
  for name, value in flat.items():
    node = tree
    *parents, leaf = name.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def export_params(params: Any, path: str | os.PathLike, *, config_json: str, step: int, source: str) -> pathlib.Path:
  """Writes ``params`` (a nested dict of arrays) to ``path`` atomically; returns the path."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  metadata = {"format": FORMAT, "config": config_json, "step": str(int(step)), "source": source}
  return safetensors_files.write(path, _flatten(params), metadata)


def load_params(path: str | os.PathLike) -> tuple[dict, dict]:
  """(params, metadata) of a file written by ``export_params``; metadata["config"] is the config as a dict."""
  path = pathlib.Path(path)
  metadata, flat = safetensors_files.read(path, ParamsFileError, "parameter file")
  if metadata.get("format") != FORMAT:
    raise ParamsFileError(f"parameter file {path} is not a {FORMAT} export (format {metadata.get('format')!r})")
  try:
    metadata["config"] = json.loads(metadata.get("config", "{}"))
  except json.JSONDecodeError as e:
    raise ParamsFileError(f"parameter file {path} has a corrupt config in its metadata: {e}") from e
  return _unflatten(flat), metadata


def export_from_workdir(workdir: str | os.PathLike, out: str | os.PathLike | None = None) -> pathlib.Path:
  """Exports the EMA (else the parameters) of the newest checkpoint in ``workdir/checkpoints``."""
  import orbax.checkpoint as ocp

  workdir = pathlib.Path(workdir)
  root = (workdir / "checkpoints").absolute()
  steps = sorted(
    (int(p.name) for p in root.glob("[0-9]*") if p.name.isdigit() and (p / "state").is_dir()), reverse=True
  )
  if not steps:
    raise ParamsFileError(f"no checkpoint in {root} to export")
  for step in steps:  # newest first; an unreadable checkpoint falls back to the previous one, as a resume does
    try:
      state = ocp.StandardCheckpointer().restore(root / str(step) / "state")
      config_json = (root / str(step) / "config" / "metadata").read_text(encoding="utf-8")
    except Exception as e:  # noqa: BLE001 - any read failure means: this checkpoint is unusable
      print(f"checkpoint at step {step} in {root} cannot be read ({type(e).__name__}); trying the previous one",
            file=sys.stderr)  # fmt: skip
      continue
    source = "ema" if state.get("ema") is not None else "params"
    return export_params(state[source], out or workdir / FILENAME, config_json=config_json, step=step, source=source)
  raise ParamsFileError(f"no readable checkpoint in {root} to export")
