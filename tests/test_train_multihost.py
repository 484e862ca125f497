"""Multi-host: 2 local CPU processes x 2 devices train 3 steps with the losses and parameters of 1 process x 4."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from cinema_jax.config import load_config
from cinema_jax.parallel import make_mesh
from cinema_jax.train import tasks
from cinema_jax.train.checkpoint import Checkpointer
from cinema_jax.train.state import build_state

ROOT = pathlib.Path(__file__).resolve().parent.parent
SPEC = "configs/train_video.py:tiny"  # the faster model to compile; the trainer is what is tested
OVERRIDES = [
  "--config.train.progress=False",
  "--config.train.stage_steps=(3,)",
  "--config.train.stage_lengths=(2,)",
  "--config.checkpoint.every=3",
  "--config.checkpoint.use_async=False",
]
# Runs the trainer and prints its losses as the last line (every process sees the same global scalars).
RUNNER = """
import json, sys
from cinema_jax.parallel import initialize
initialize()
import jax
from cinema_jax.config import load_config
from cinema_jax.train import train_and_evaluate
result = train_and_evaluate(load_config(sys.argv[1], sys.argv[3:]), sys.argv[2])
print(json.dumps({"process": jax.process_index(), "devices": jax.device_count(), "local": jax.local_device_count(),
                  "loss": [h["loss"] for h in result.history]}))
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(workdir, devices_per_process, num_processes, port):
  procs = []
  for pid in range(num_processes):
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
    if num_processes > 1:
      env.update(
        CINEMA_JAX_COORDINATOR=f"localhost:{port}",
        CINEMA_JAX_NUM_PROCESSES=str(num_processes),
        CINEMA_JAX_PROCESS_ID=str(pid),
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",  # cross-process collectives on the CPU backend
      )
    cmd = [sys.executable, "-c", RUNNER, SPEC, str(workdir), *OVERRIDES]
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  return procs


def _final_params(workdir):
  config = load_config(SPEC, OVERRIDES)
  task = tasks.make_task(config)
  spec = build_state(task, config, make_mesh(config.mesh.to_dict()), tuple(config.sharding_rules),
                     task.example_batch(2, 8))  # fmt: skip
  ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=3, every=3)
  step, state, _ = ckpt.restore(spec.abstract)
  ckpt.close()
  assert step == 3
  return jax.device_get(state.params)


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  procs = _launch(tmp_path / "multi", 2, 2, _free_port()) + _launch(tmp_path / "single", 4, 1, None)
  outs = []
  for p in procs:
    out, err = p.communicate(timeout=400)
    assert p.returncode == 0, err[-3000:]
    outs.append(json.loads(out.strip().splitlines()[-1]))
  multi, single = outs[:2], outs[2]
  assert [(o["process"], o["devices"], o["local"]) for o in multi] == [(0, 4, 2), (1, 4, 2)]
  assert (single["devices"], single["local"]) == (4, 4)
  assert len(single["loss"]) == 3
  for o in multi:
    np.testing.assert_allclose(o["loss"], single["loss"], rtol=1e-6, atol=1e-6)
  a, b = _final_params(tmp_path / "multi"), _final_params(tmp_path / "single")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
  # only process 0 writes TensorBoard files
  assert len(list((tmp_path / "multi" / "tensorboard").glob("events.*"))) == 1
