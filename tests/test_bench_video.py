"""``cinema-jax bench rollout`` and ``cinema-jax bench video-dit`` run and report meaningful figures."""

import re

import pytest

from cinema_jax import bench, cli
from cinema_jax.bench import video_dit as bench_video_dit
from cinema_jax.models import video_dit


def test_benchmarks_are_registered():
  assert {"rollout", "video-dit"} <= set(bench.available())


def test_rollout_benchmark_reports_flat_memory(capsys):
  code = cli.main(["bench", "rollout", "--windows", "2", "3", "--repeats", "1"])
  out = capsys.readouterr().out
  assert code in (0, 1)  # PASS/FAIL is the benchmark's verdict on timings; tests never judge wall time
  rows = [line.split() for line in out.splitlines() if re.match(r"^\s+[23]\s+\d+\s", line)]
  assert [r[0] for r in rows] == ["2", "3"]
  assert [r[1] for r in rows] == ["14", "20"]  # W + (n - 1)(W - O) latent frames, W = 8, O = 2
  # Live JAX arrays after the longest run hold no more than after the short one: windows are not kept.
  live_short, live_long = (float(r[5]) for r in rows)
  assert live_long <= 1.05 * live_short
  assert re.search(r"peak live JAX arrays 3 / 2 windows: [\d.]+", out)
  assert "peak RSS 3 / 2 windows" in out and "time per window 3 / 2 windows" in out


def test_video_dit_benchmark_beside_diffusers(capsys):
  code = cli.main(["bench", "video-dit", "--diffusers", "--iters", "2", "--warmup", "1", "--frames", "4"])
  out = capsys.readouterr().out
  assert code == 0
  rel = float(re.search(r"relative L2 difference ours vs diffusers = ([0-9.e+-]+)", out).group(1))
  assert rel < 1e-4
  assert "ours (jax.jit)" in out and "diffusers (PyTorch eager)" in out


def test_video_dit_benchmark_bf16_block_causal(capsys):
  code = cli.main(
    [
      "bench",
      "video-dit",
      "--diffusers",
      "--dtype",
      "bfloat16",
      "--causal-block-size",
      "2",
      "--frames",
      "4",
      "--iters",
      "1",
      "--warmup",
      "1",
      "--config.model.fps_embedding=False",
    ]
  )
  out = capsys.readouterr().out
  assert code == 0 and "block-causal over 2 frames" in out and "bfloat16" in out
  rel = float(re.search(r"relative L2 difference ours vs diffusers = ([0-9.e+-]+)", out).group(1))
  assert rel < 3e-2


def test_flop_count_reproduces_the_performance_anchor():
  """performance.md: SkyReels 1.3B, 9 x 68 x 120 latents (18,360 tokens) + 512 text, 345.9 ms = 318 TFLOP/s."""
  from cinema_jax import config as config_lib

  model = video_dit.from_config(config_lib.load_config("configs/video.py:skyreels_1p3b").model)
  flops = bench_video_dit.dense_flops(model, 1, 9, 68, 120, 512)
  assert flops / 0.3459 / 1e12 == pytest.approx(318, rel=0.01)
