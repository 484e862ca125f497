"""Exact resume: a run SIGKILLed at random steps (3 times) and resumed ends bitwise equal to an uninterrupted run.

Every run is ``python -m cinema_jax.train.cli`` in its own process (what ``cinema-jax train`` runs); the processes
share a persistent compilation cache so that only the first one compiles.
"""

import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cinema_jax.config import load_config
from cinema_jax.parallel import make_mesh
from cinema_jax.train import tasks
from cinema_jax.train.checkpoint import Checkpointer
from cinema_jax.train.state import build_state

ROOT = pathlib.Path(__file__).resolve().parent.parent
SPEC = "configs/train_keyframes.py:tiny"
OVERRIDES = [
  "--config.train.progress=False",
  "--config.train.stage_steps=(6,10)",
  "--config.train.stage_lengths=(2,3)",
  "--config.model.depth=1",
  "--config.model.depth_single_blocks=1",
  "--config.checkpoint.every=1",
  "--config.checkpoint.keep=3",
]
TOTAL = 16


def _env(cache: pathlib.Path) -> dict:
  env = dict(os.environ)
  env.update(
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
    JAX_COMPILATION_CACHE_DIR=str(cache),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )
  return env


def _start(workdir: pathlib.Path, env: dict) -> subprocess.Popen:
  cmd = [sys.executable, "-m", "cinema_jax.train.cli", "--config", SPEC, "--workdir", str(workdir), *OVERRIDES]
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _saved_steps(workdir: pathlib.Path) -> list[int]:
  d = workdir / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _final_state(workdir: pathlib.Path):
  config = load_config(SPEC, OVERRIDES)
  task = tasks.make_task(config)
  mesh = make_mesh(config.mesh.to_dict())
  spec = build_state(task, config, mesh, tuple(config.sharding_rules), task.example_batch(2, 8))
  ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=3, every=1)
  step, state, _ = ckpt.restore(spec.abstract)
  ckpt.close()
  assert step == TOTAL
  return state


@pytest.mark.slow
def test_sigkill_at_random_steps_then_resume_is_bitwise_exact(tmp_path):
  env = _env(tmp_path / "cache")
  straight = _start(tmp_path / "straight", env)
  out, _ = straight.communicate(timeout=300)
  assert straight.returncode == 0, out

  rng = np.random.default_rng(0)
  workdir = tmp_path / "killed"
  kills = []
  for target in sorted(rng.choice(np.arange(2, TOTAL - 3), size=3, replace=False)):
    proc = _start(workdir, env)
    deadline = time.monotonic() + 300
    while not any(s >= target for s in _saved_steps(workdir)):
      assert proc.poll() is None, proc.stdout.read()
      assert time.monotonic() < deadline
      time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.2))  # land anywhere in a step: mid-compute, mid-save
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    kills.append(max(_saved_steps(workdir)))
  assert len(kills) == 3 and kills == sorted(kills) and kills[-1] < TOTAL
  resumed = _start(workdir, env)
  out, _ = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, out
  assert "resuming from the checkpoint at step" in out

  a, b = _final_state(tmp_path / "straight"), _final_state(workdir)
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 10
  for x, y in zip(leaves_a, leaves_b, strict=True):  # params, Adam moments, EMA, step: bit for bit
    np.testing.assert_array_equal(jax.device_get(x), jax.device_get(y))


def test_sigterm_saves_the_current_step_and_stops(tmp_path):
  # SIGTERM (a preempted VM's notice) mid-run: the run checkpoints the step it is at, exits with status 3, and a
  # second run resumes from exactly that step to the end.
  env = _env(tmp_path / "cache")
  workdir = tmp_path / "terminated"
  proc = _start(workdir, env)
  deadline = time.monotonic() + 300
  while not any(s >= 3 for s in _saved_steps(workdir)):
    assert proc.poll() is None, proc.stdout.read()
    assert time.monotonic() < deadline
    time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 3, out
  stopped = max(_saved_steps(workdir))
  assert f"preemption notice: saved step {stopped} and stopped" in out and 3 <= stopped < TOTAL
  resumed = _start(workdir, env)
  out, _ = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, out
  assert f"resuming from the checkpoint at step {stopped}" in out
  assert max(_saved_steps(workdir)) == TOTAL
