"""``cinema-jax bench attention``: the quick CPU run prints every mask for ours and XLA with ratios, and the Mosaic
GPU scheme line says which forward (persistent or one CTA per item) and backward tiles a mask gets."""

import json

import jax
import jax.numpy as jnp

from cinema_jax.bench import attention as bench


def test_quick_run_times_every_mask_with_ratios(tmp_path, capsys):
  out = tmp_path / "records.json"
  assert bench.main(["--quick", "--json", str(out)]) == 0
  records = json.loads(out.read_text())["records"]
  seen = {(r["mask"], r["impl"], r["direction"]) for r in records}
  for mask in bench.MASK_NAMES:
    for impl in ("pallas", "xla"):
      for direction in ("fwd", "fwd+bwd"):
        assert (mask, impl, direction) in seen
  assert all(r["ms"] > 0 and r["ratio"] > 0 and r["reference"] == "xla dense" for r in records)
  dense_xla = [r["ratio"] for r in records if r["mask"] == "dense" and r["impl"] == "xla"]
  assert dense_xla == [1.0, 1.0]  # the reference itself
  assert "x ref dense" in capsys.readouterr().out


def test_the_scheme_follows_the_rows_of_the_mask(monkeypatch):
  from cinema_kernels import mosaic_gpu

  monkeypatch.delenv(mosaic_gpu.FWD_CTAS_ENV, raising=False)
  monkeypatch.setattr(mosaic_gpu, "PERSISTENT_BY_DEFAULT", True)
  q = jax.ShapeDtypeStruct((1, 4096, 24, 128), jnp.bfloat16)
  even = bench._kernel_scheme(q, bench.benchmark_mask("8-segment", 4096))
  uneven = bench._kernel_scheme(q, bench.benchmark_mask("frame-causal", 4096))
  assert "(persistent)" in even and "bwd tiles 64x64" in even
  assert uneven.startswith("fwd 768 CTAs (one per item)")  # 24 heads x 32 rows of 128
