"""Orbax checkpoints: the train state, the data iterator's position and the config, with fallback on corruption.

Layout: ``workdir/checkpoints/<step>/{state, data, config}``. Saves are asynchronous (arrays are copied to host
before ``save`` returns, files are written in the background and published by an atomic rename, so a process
killed mid-write leaves no half checkpoint that looks complete). ``max_to_keep`` bounds the disk; preemption
notices (``reached_preemption``) force a save at the current step.

Restore takes an abstract state whose leaves carry the *current* mesh's shardings: a checkpoint written on 8 devices
restores onto 4 (or onto a different fsdp/tensor split) because every array is read straight into its new shards.
A checkpoint that cannot be read (truncated files, a missing item) is reported and the previous one is tried.
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

import orbax.checkpoint as ocp

ITEMS = ("state", "data", "config")


class Checkpointer:
  def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int, every: int, use_async: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      save_interval_steps=max(every, 1),
      enable_async_checkpointing=use_async,
      create=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def save(self, step: int, state: Any, data_state: dict, config_json: str, *, force: bool = False) -> bool:
    """Saves when ``step`` is on the interval (or ``force``); returns whether a save started."""
    return self.manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(json.loads(config_json)),
      ),
      force=force,
    )

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """(step, state, data_state) of the newest readable checkpoint, or None when there is none."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(
          step,
          args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
        )
      except Exception as e:  # noqa: BLE001 - any read failure means: this checkpoint is unusable
        print(
          f"checkpoint at step {step} in {self.directory} cannot be read ({type(e).__name__}: "
          f"{str(e).splitlines()[0] if str(e) else ''}); falling back to the previous checkpoint",
          file=sys.stderr,
          flush=True,
        )
        continue
      return step, restored["state"], dict(restored["data"])
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
