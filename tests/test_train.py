"""The trainer in-process: stages, frozen parameters, EMA, metrics, checkpoints (keep N, other mesh, corruption),
the NaN guard and the optimiser schedule. One tiny keyframe run (two stages) serves most tests."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cinema_jax.config import load_config
from cinema_jax.parallel import make_mesh
from cinema_jax.train import NonFiniteError, tasks, train_and_evaluate
from cinema_jax.train import optimizer as opt_lib
from cinema_jax.train.checkpoint import Checkpointer
from cinema_jax.train.metrics import check_finite, throughput
from cinema_jax.train.state import build_state

TINY = [
  "--config.train.progress=False",
  "--config.train.stage_steps=(2,2)",
  "--config.train.stage_lengths=(2,3)",
  "--config.optimizer.frozen=('txt_in',)",
  "--config.checkpoint.every=1",
  "--config.checkpoint.keep=2",
  "--config.train.peak_tflops=1.0",
]


class CountingTask(tasks.KeyframeTask):
  """Counts traces of the loss per keyframe count (one per compiled step)."""

  traces: dict

  def loss(self, params, batch, key):
    self.traces[batch["y"].shape[1]] = self.traces.get(batch["y"].shape[1], 0) + 1
    return super().loss(params, batch, key)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("kf")
  config = load_config("configs/train_keyframes.py:tiny", TINY)
  task = CountingTask(config)
  task.traces = {}
  result = train_and_evaluate(config, workdir, task=task)
  return config, workdir, task, result


def _spec(config, devices=None):
  task = tasks.make_task(config)
  mesh = make_mesh(config.mesh.to_dict(), devices)
  example = task.example_batch(config.train.stage_lengths[0], config.train.batch_size)
  return build_state(task, config, mesh, tuple(config.sharding_rules), example)


def test_stages_switch_data_and_compiled_step(run):
  config, _, task, result = run
  assert [h["step"] for h in result.history] == [0, 1, 2, 3]
  assert [h["length"] for h in result.history] == [2, 2, 3, 3]
  assert [h["stage"] for h in result.history] == [0, 0, 1, 1]
  # one trace (hence one compiled step) per stage; gradient of the loss traces it once each
  assert task.traces == {2: 1, 3: 1}
  # tokens per step follow the stage: 8 samples x K x (4 caption + 64 image tokens)
  for h in result.history:
    expected = 8 * h["length"] * 68
    assert h["tokens_per_s"] * h["step_time"] == pytest.approx(expected, rel=1e-9)


def test_metrics_finite_and_consistent(run):
  _, workdir, _, result = run
  for h in result.history:
    for name in ("loss", "grad_norm", "param_norm", "update_norm"):
      assert np.isfinite(h[name])
    assert h["loss"] > 0 and h["grad_norm"] > 0 and h["param_norm"] > 0
    # warm-up starts at learning rate 0: the first update is exactly zero, later ones are not
    assert (h["update_norm"] == 0) == (h["step"] == 0)
    assert h["mfu"] == pytest.approx(h["tflops_per_device"] / 1.0)
  # the final param norm reported is the norm of the returned parameters
  norm = float(optax.tree.norm(result.state.params))
  assert result.history[-1]["param_norm"] == pytest.approx(norm, rel=1e-6)
  events = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert events and events[0].stat().st_size > 0


def test_frozen_parameters_get_exactly_zero_updates_and_ema_tracks(run):
  config, _, _, result = run
  initial = _spec(config).init()
  for name in result.state.params:
    a = jax.device_get(initial.params[name])
    b = jax.device_get(result.state.params[name])
    same = all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    assert same == (name == "txt_in"), name
  # EMA: after 4 steps with decay 0.9 from p0, ema = 0.9^4 p0 + sum_i 0.1 * 0.9^(3-i) p_i; frozen: ema = p0 exactly
  np.testing.assert_array_equal(
    jax.device_get(result.state.ema["txt_in"]["kernel"]), jax.device_get(initial.params["txt_in"]["kernel"])
  )
  moved = jax.device_get(result.state.ema["img_in"]["kernel"] - initial.params["img_in"]["kernel"])
  full = jax.device_get(result.state.params["img_in"]["kernel"] - initial.params["img_in"]["kernel"])
  assert 0 < np.abs(moved).sum() < np.abs(full).sum()


def test_checkpoints_keep_n_with_config_and_data_position(run):
  config, workdir, _, _ = run
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [3, 4]
  saved = json.loads((workdir / "checkpoints/4/config/metadata").read_text())
  assert saved["train"]["stage_lengths"] == [2, 3] and saved["optimizer"]["frozen"] == ["txt_in"]
  data = json.loads((workdir / "checkpoints/4/data/metadata").read_text())
  assert data == {"stage": 1, "iterator": {"next_index": 2}}


def test_restore_onto_a_4_device_mesh(run):
  config, workdir, _, result = run
  spec = _spec(config, jax.devices()[:4])
  ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=2, every=1)
  step, state, data = ckpt.restore(spec.abstract)
  ckpt.close()
  assert step == 4 and data["stage"] == 1
  leaf = state.params["double_blocks"]["img_attn"]["qkv"]["kernel"]
  assert (
    len(leaf.sharding.device_set) == 4
    and leaf.sharding.spec == spec.shardings.params["double_blocks"]["img_attn"]["qkv"]["kernel"].spec
  )
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(result.state), strict=True):
    np.testing.assert_array_equal(jax.device_get(a), jax.device_get(b))


def test_truncated_latest_checkpoint_falls_back(run, tmp_path, capfd):
  config, workdir, _, _ = run
  shutil.copytree(workdir / "checkpoints", tmp_path / "checkpoints")
  data_files = [p for p in (tmp_path / "checkpoints/4/state").rglob("*") if p.is_file() and p.stat().st_size > 0]
  for p in data_files:  # cut every file of the newest state in half
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
  spec = _spec(config)
  ckpt = Checkpointer(tmp_path / "checkpoints", max_to_keep=2, every=1)
  step, state, data = ckpt.restore(spec.abstract)
  ckpt.close()
  assert step == 3 and int(state.step) == 3 and data == {"stage": 1, "iterator": {"next_index": 1}}
  err = capfd.readouterr().err
  assert "checkpoint at step 4" in err and "cannot be read" in err and "previous checkpoint" in err


def test_nan_in_loss_stops_with_step_and_metric(tmp_path):
  config = load_config(
    "configs/train_keyframes.py:tiny",
    ["--config.train.progress=False", "--config.train.stage_steps=(4,)", "--config.train.stage_lengths=(2,)",
     "--config.checkpoint.enabled=False"],
  )  # fmt: skip

  class PoisonedTask(tasks.KeyframeTask):
    def synthetic_record(self, seed, stage, index, length):
      sample = super().synthetic_record(seed, stage, index, length)
      if index >= 2 * 8:  # every record of the third batch (step 2)
        sample["img"] = np.full_like(sample["img"], np.nan)
      return sample

  with pytest.raises(NonFiniteError, match=r"loss is nan at step 2"):
    train_and_evaluate(config, tmp_path, task=PoisonedTask(config))


def test_check_finite_names_the_first_bad_metric():
  check_finite({"loss": 1.0, "grad_norm": 2.0}, 5)
  with pytest.raises(NonFiniteError, match=r"grad_norm is inf at step 7"):
    check_finite({"loss": 1.0, "grad_norm": float("inf")}, 7)


def test_throughput_and_mfu_by_hand():
  out = throughput(0.5, 1000, 4e12, 4, 2.0)  # 4 TFLOP in 0.5 s on 4 devices = 2 TFLOP/s per device
  assert out["tokens_per_s"] == 2000 and out["tflops_per_device"] == pytest.approx(2.0)
  assert out["mfu"] == pytest.approx(1.0)
  assert "mfu" not in throughput(0.5, 1000, 4e12, 4, None)


def test_schedule_warmup_then_cosine():
  config = load_config(
    "configs/train_keyframes.py:tiny",
    ["--config.optimizer.learning_rate=1.0", "--config.optimizer.warmup_steps=4", "--config.optimizer.end_factor=0.0",
     "--config.train.stage_steps=(4,4)"],
  )  # fmt: skip
  lr = opt_lib.learning_rate_schedule(config)
  assert [float(lr(s)) for s in (0, 2, 4)] == pytest.approx([0.0, 0.5, 1.0])
  # cosine over the remaining 4 steps: 0.5 (1 + cos(pi s / 4))
  assert [float(lr(4 + s)) for s in (1, 2, 4)] == pytest.approx([0.5 * (1 + np.cos(np.pi / 4)), 0.5, 0.0], abs=1e-6)
  config.optimizer.schedule = "linear"
  with pytest.raises(ValueError, match="unknown learning-rate schedule 'linear'"):
    opt_lib.learning_rate_schedule(config)


def test_frozen_labels_and_all_frozen_error():
  params = {"a": {"kernel": jnp.ones((2, 2))}, "b": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
  labels = opt_lib.parameter_labels(params, ("^b/",))
  assert labels == {"a": {"kernel": "train"}, "b": {"kernel": "frozen", "bias": "frozen"}}
  config = load_config("configs/train_keyframes.py:tiny", ["--config.optimizer.frozen=('.',)"])
  with pytest.raises(ValueError, match="freezes every parameter"):
    opt_lib.make_optimizer(config, params)


def test_gradient_accumulation_matches_the_full_batch():
  # Micro-batches draw different keys than the full batch, so compare a loss without randomness.
  from cinema_jax.train.state import TrainState
  from cinema_jax.train.step import make_step_fn

  class Quadratic:
    def loss(self, params, batch, key):
      return jnp.mean(jnp.square(batch["x"] @ params["w"] - batch["y"])), {}

  config = load_config("configs/train_keyframes.py:tiny", ["--config.optimizer.ema_decay=0.0"])
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}
  batch = {
    "x": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
    "y": jnp.asarray(rng.normal(size=(8, 2)), jnp.float32),
  }
  out = {}
  for accum in (1, 4):
    config.train.grad_accum_steps = accum
    tx = opt_lib.make_optimizer(config, params)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), None)
    new, metrics = jax.jit(make_step_fn(Quadratic(), config, tx))(state, batch)
    out[accum] = (new.params["w"], metrics)
  np.testing.assert_allclose(out[1][0], out[4][0], rtol=1e-6, atol=1e-7)
  for name in ("loss", "grad_norm", "update_norm"):
    np.testing.assert_allclose(out[1][1][name], out[4][1][name], rtol=1e-6)


def test_preemption_notice_saves_and_stops(tmp_path, monkeypatch):
  config = load_config(
    "configs/train_video.py:tiny",
    ["--config.train.progress=False", "--config.train.stage_steps=(5,)", "--config.train.stage_lengths=(2,)",
     "--config.checkpoint.every=100", "--config.checkpoint.use_async=False"],
  )  # fmt: skip
  monkeypatch.setattr(Checkpointer, "reached_preemption", lambda self, step: step == 2)
  result = train_and_evaluate(config, tmp_path)
  assert result.preempted and result.step == 2 and len(result.history) == 2
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps[-1] == 2  # the notice forced a save off the 100-step interval
  data = json.loads((tmp_path / "checkpoints/2/data/metadata").read_text())
  assert data == {"stage": 0, "iterator": {"next_index": 2}}


def test_train_main_rejects_bad_arguments(capsys):
  from cinema_jax.train.cli import train_main

  assert train_main(["--config", "configs/train_keyframes.py:tiny", "--workdir", "w", "--bogus"]) == 2
  assert "unknown arguments ['--bogus']" in capsys.readouterr().err
  assert train_main(["--config", "configs/train_keyframes.py:tiny", "--workdir", "w", "--config.train.nope=1"]) == 2
  assert "unknown config key 'train.nope'" in capsys.readouterr().err
  assert train_main(["--config", "configs/train_keyframes.py:tiny", "--workdir", "w", "--num-processes", "2"]) == 2
  assert "incomplete multi-process spec" in capsys.readouterr().err


def test_stage_spec_errors():
  from cinema_jax.train import stages

  config = load_config("configs/train_video.py:tiny", ["--config.train.stage_lengths=(2,4,8)"])
  with pytest.raises(ValueError, match=r"stage_steps \(3, 3\) and train.stage_lengths \(2, 4, 8\)"):
    stages(config)
  config = load_config("configs/train_video.py:tiny")
  assert stages(config) == [(0, 3, 2), (3, 6, 4)]
