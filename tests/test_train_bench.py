"""``cinema-jax bench train`` on the tiny video config: a row per stage, MFU from --peak-tflops."""

import re

from cinema_jax.bench import train as bench_train


def test_bench_train_prints_a_row_per_stage(capsys):
  rc = bench_train.main(
    [
      "--config",
      "configs/train_video.py:tiny",
      "--iters",
      "2",
      "--peak-tflops",
      "0.001",
      "--config.train.progress=False",
    ]
  )
  out = capsys.readouterr().out
  assert rc == 0, out
  assert "vs stage 0" in out and "MFU" in out
  rows = [line for line in out.splitlines() if re.match(r"^\s*[24]\s", line)]
  assert len(rows) == 2, out
  # tokens/step: 8 clips x frames x (8 / 2)^2 tokens per frame
  assert rows[0].split()[1] == str(8 * 2 * 16) and rows[1].split()[1] == str(8 * 4 * 16)
  assert rows[0].split()[4] == "1.00" and rows[0].split()[6].endswith("%")
