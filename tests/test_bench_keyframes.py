"""``cinema-jax bench keyframes --quick``: the table runs and GoldenMem's cost stops growing (structure only: token
counts and compiled memory; timings are the benchmark's business, not a test's)."""

import pytest

from cinema_jax import bench
from cinema_jax.bench import keyframes


def test_registered():
  assert "keyframes" in bench.available()
  assert bench.load("keyframes") is keyframes


def test_quick_run_shows_flat_goldenmem_and_growing_full_history():
  lines = []
  result = keyframes.run(["--quick"], log=lines.append)
  text = "\n".join(lines)
  assert "ms / keyframe" in text and "GoldenMem: keyframe 13 / keyframe 8" in text
  gm = {r["history"]: r for r in result["rows"] if r["goldenmem"]}
  full = {r["history"]: r for r in result["rows"] if not r["goldenmem"]}
  assert sorted(gm) == sorted(full) == [1, 7, 12]
  # 4 x 4-token frames: pyramid 4, 2, 1 -> three slots once k >= 3; the sequence and the program stop growing.
  assert gm[7]["slots"] == gm[12]["slots"] == 3
  assert gm[7]["image_tokens"] == gm[12]["image_tokens"] == 16 + 4 + 1 + 16
  assert gm[12]["memory_bytes"] == gm[7]["memory_bytes"]
  assert gm[12]["context"] <= 1.62
  assert result["goldenmem_ratio"][1] == pytest.approx(1.0)
  # Without GoldenMem every keyframe stays at full size: tokens and compiled memory grow with k.
  assert full[1]["image_tokens"] < full[7]["image_tokens"] < full[12]["image_tokens"] == 13 * 16
  assert full[1]["memory_bytes"] < full[7]["memory_bytes"] < full[12]["memory_bytes"]
  assert result["full_ratio"][1] > 1.1


def test_bad_compare_pair_is_named():
  with pytest.raises(SystemExit):
    keyframes._parse(["--compare", "7"])
