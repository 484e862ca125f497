"""The Mosaic GPU kernels' in-kernel profile: regions lower with the profiler's buffer, the region bound is checked
before anything runs, and a trace is summarised into per-CTA cycles by region (hand-computed trace)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import cinema_kernels as ck
from cinema_jax.attention import masks
from cinema_kernels import mosaic_gpu, mosaic_gpu_profile


def _event(name, ph, start_ns, cycles, sm, tid):
  # As the profiler dumps them: ts = (the warpgroup's start on the global timer + cycles since its first event) / 1e3.
  return {"name": name, "ph": ph, "ts": (start_ns + cycles) / 1e3, "pid": 1 + sm, "tid": tid}


def _trace(path):
  events = []
  for cta, start in enumerate([1000, 10000]):  # two CTAs on SM 0, the second starting 9 us after the first
    base = 3 * cta  # three warpgroups a CTA: consumers 0 and 1, the producer last
    for wg, (pro, qk, epi) in enumerate([(2000, 3000, 1000), (3000, 2000, 2000)]):
      t = 0
      for name, length in (("prologue", pro), ("qk", qk), ("epilogue", epi)):
        events += [
          _event(name, "B", start, t, 0, base + wg + 1),
          _event(name, "E", start, t + length, 0, base + wg + 1),
        ]
        t += length
    for name, (a, b) in (("load_q", (0, 500)), ("load_kv", (500, 1500))):
      events += [_event(name, "B", start, a, 0, base + 3), _event(name, "E", start, b, 0, base + 3)]
  path.write_text(json.dumps({"displayTimeUnit": "ns", "traceEvents": events}))
  return path


def test_a_trace_is_summarised_per_cta_and_region(tmp_path):
  p = mosaic_gpu_profile.summarise(_trace(tmp_path / "fwd_kernel-1234-trace.json"))
  assert (p.kernel, p.ctas, p.sms, p.warpgroups) == ("fwd_kernel", 2, 1, 3)
  assert p.span_kcycles == pytest.approx(7.0)  # the slower consumer: 3 + 2 + 2 k cycles
  assert p.regions == pytest.approx(
    {
      ("consumer", "prologue"): 2.5,
      ("consumer", "qk"): 2.5,
      ("consumer", "epilogue"): 1.5,
      ("producer", "load_q"): 0.5,
      ("producer", "load_kv"): 1.0,
    }
  )
  assert p.start_interval_us == pytest.approx(9.0)
  assert p.gap_us(clock_ghz=1.0) == pytest.approx(2.0)  # 9 us between starts, 7 k cycles = 7 us busy
  text = mosaic_gpu_profile.format_summary(p, clock_ghz=1.0)
  assert "2 CTAs on 1 SMs" in text and "idle between CTAs 2.00 us" in text


def test_a_file_that_is_not_a_trace_is_named(tmp_path):
  bad = tmp_path / "x-1-trace.json"
  bad.write_text("{not json")
  with pytest.raises(ValueError, match="x-1-trace.json: not a Mosaic GPU profiler trace"):
    mosaic_gpu_profile.summarise(bad)
  bad.write_text(json.dumps({"traceEvents": [{"name": "qk", "ph": "B", "ts": 0, "pid": 1, "tid": 1}]}))
  with pytest.raises(ValueError, match="no producer warpgroup"):
    mosaic_gpu_profile.summarise(bad)


def _lowered_results(monkeypatch, fn, *specs, profile_dir=None):
  # The profiler's dump is a host callback, which lowers for CUDA only where a GPU is present: stubbed here, so that
  # the kernels themselves (with their regions and the profiler's buffer) lower on the CPU.
  monkeypatch.setattr(jax.debug, "callback", lambda *a, **k: None)
  if profile_dir is None:
    text = export.export(jax.jit(fn), platforms=["cuda"])(*specs).mlir_module()
  else:
    with mosaic_gpu.profiling(profile_dir):
      text = export.export(jax.jit(fn), platforms=["cuda"])(*specs).mlir_module()
  return [line.split("->")[-1] for line in text.splitlines() if "custom_call @mosaic_gpu" in line]


def test_profiled_kernels_lower_with_the_profilers_buffer(monkeypatch, tmp_path):
  length = 1024
  spec = jax.ShapeDtypeStruct((1, length, 2, 128), jnp.bfloat16)
  mask = masks.SegmentMask(np.arange(length, dtype=np.int32) * 8 // length)

  def make_loss():  # a fresh function each time: a traced one keeps its kernels (profiling is read at trace time)
    def f(q, k, v):
      return ck.block_sparse_attention(q, k, v, mask, flavour="mosaic_gpu", interpret=False).astype(jnp.float32).sum()

    return lambda q, k, v: jax.grad(f, argnums=(0, 1, 2))(q, k, v)

  plain = _lowered_results(monkeypatch, make_loss(), spec, spec, spec)
  profiled = _lowered_results(monkeypatch, make_loss(), spec, spec, spec, profile_dir=tmp_path)
  assert len(plain) == len(profiled) == 3  # forward, dq, dk/dv
  assert not any("ui32" in r for r in plain)
  # One buffer per kernel: CTAs x warpgroups x (4 entries per region + 3). Forward: 16 items of one listed block,
  # 5 regions (prologue, qk, softmax, pv, epilogue); backward: 8 rows of 128 x 2 heads, 3 regions.
  assert [r.count("ui32") for r in profiled] == [1, 1, 1]
  assert "tensor<960xui32>" in profiled[0]  # 16 x 3 x (4 x 5)
  assert all("tensor<576xui32>" in r for r in profiled[1:])  # 16 x 3 x (4 x 3)


def test_more_regions_than_the_buffer_holds_are_refused_before_running(monkeypatch, tmp_path):
  length = 128 * 216  # dense: 216 listed blocks a row, 2 + 3 x 216 = 650 forward regions > 640
  spec = jax.ShapeDtypeStruct((1, length, 1, 128), jnp.bfloat16)

  def fwd(q, k, v):
    return ck.block_sparse_attention(q, k, v, None, flavour="mosaic_gpu", interpret=False)

  with pytest.raises(ValueError, match="profiling the fwd_kernel kernel needs 650 regions per warpgroup"):
    _lowered_results(monkeypatch, fwd, spec, spec, spec, profile_dir=tmp_path)


def test_profiling_leaves_the_interpreter_alone(tmp_path, rng):
  q = jnp.asarray(rng.standard_normal((1, 128, 1, 64)), jnp.bfloat16)
  with mosaic_gpu.profiling(tmp_path):
    out = ck.block_sparse_attention(q, q, q, None, flavour="mosaic_gpu", interpret=True)
  ref = jax.nn.dot_product_attention(*(x.astype(jnp.float32) for x in (q, q, q)))
  assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) < 2e-2
  assert not list(tmp_path.iterdir())
