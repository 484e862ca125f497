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


def _trace(path):
  # Written by JAX's own dump (ProfilerSpec.dump, numpy only), from a buffer laid out as the kernels fill it: per
  # warpgroup [start on the global timer (ns), SM, words used, then (region | ENTER/EXIT, SM clock) pairs].
  from jax.experimental.mosaic.gpu import profiler

  spec = profiler.ProfilerSpec(4 * 8)
  buffer = np.zeros((2, 3, 4 * 8), np.uint32)  # 2 CTAs x 3 warpgroups (consumers 0 and 1, the producer last)
  regions = {
    0: [("prologue", 2000), ("qk", 3000), ("epilogue", 1000)],
    1: [("prologue", 3000), ("qk", 2000), ("epilogue", 2000)],
    2: [("load_q", 500), ("load_kv", 1000)],
  }
  for cta, start in enumerate([1000, 10000]):  # both on SM 0, the second starting 9 us after the first
    for wg, spans in regions.items():
      words, clock = [], 5000
      for name, length in spans:
        tag = spec.intern_name(name)
        words += [tag | spec.ENTER, clock, tag | spec.EXIT, clock + length]
        clock += length + 12  # recording an event takes the profiler about a dozen cycles
      buffer[cta, wg, : 3 + len(words)] = [start, 0, len(words), *words]
  with open(path, "w") as f:
    spec.dump(buffer.reshape(-1), f, grid=(2,), block=(384,))
  return path


def test_a_trace_is_summarised_per_cta_and_region(tmp_path):
  p = mosaic_gpu_profile.summarise(_trace(tmp_path / "fwd_kernel-1234-trace.json"))
  assert (p.kernel, p.ctas, p.sms, p.warpgroups) == ("fwd_kernel", 2, 1, 3)
  # The dump takes its estimate of the profiler's own cost (11 cycles an event here) off each event: 0.05 k cycles.
  approx = lambda x: pytest.approx(x, abs=0.05)  # noqa: E731
  assert p.span_kcycles == approx(7.0)  # the slower consumer: 3 + 2 + 2 k cycles
  assert p.regions == approx(
    {
      ("consumer", "prologue"): 2.5,
      ("consumer", "qk"): 2.5,
      ("consumer", "epilogue"): 1.5,
      ("producer", "load_q"): 0.5,
      ("producer", "load_kv"): 1.0,
    }
  )
  assert p.start_interval_us == pytest.approx(9.0)
  assert p.gap_us(clock_ghz=1.0) == approx(2.0)  # 9 us between starts, 7 k cycles = 7 us busy
  assert not p.co_resident(clock_ghz=1.0)
  assert p.co_resident(clock_ghz=0.5) and p.gap_us(clock_ghz=0.5) is None  # 14 us busy: the CTAs overlapped
  text = mosaic_gpu_profile.format_summary(p, clock_ghz=1.0)
  assert "2 CTAs on 1 SMs" in text and "idle between CTAs 2.0" in text


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
  # Words: CTAs x warpgroups x 4 per region of room, room = the kernel's regions + 2 (Mosaic GPU's Init and the
  # header). Forward: 16 items of one listed block, 5 regions (prologue, qk, softmax, pv, epilogue); backward: 8 rows
  # of 128 x 2 heads, 3 regions (prologue, step, epilogue).
  assert "tensor<1344xui32>" in profiled[0]  # 16 x 3 x 4 x 7
  assert all("tensor<960xui32>" in r for r in profiled[1:])  # 16 x 3 x 4 x 5


def test_more_regions_than_the_buffer_holds_are_refused_before_running(monkeypatch, tmp_path):
  length = 128 * 213  # dense: 213 listed blocks a row, 2 + 3 x 213 + 2 = 643 forward regions > 640
  spec = jax.ShapeDtypeStruct((1, length, 1, 128), jnp.bfloat16)

  def fwd(q, k, v):
    return ck.block_sparse_attention(q, k, v, None, flavour="mosaic_gpu", interpret=False)

  with pytest.raises(ValueError, match="profiling the fwd_kernel kernel needs 643 regions per warpgroup"):
    _lowered_results(monkeypatch, fwd, spec, spec, spec, profile_dir=tmp_path)


@pytest.mark.parametrize("kernel", ["fwd_kernel", "dq_kernel", "dkv_kernel"])
def test_interpreted_kernels_keep_to_the_regions_they_declare(kernel, monkeypatch, rng):
  # Interpreted, a kernel entering more named regions than it declares for its profile buffer is an error. The
  # declared counts are exact here (3 rows of 3 listed blocks, one item per CTA): one fewer must fail, so the check
  # and the counts both bite.
  call = mosaic_gpu._kernel_call

  def one_fewer(body, out_type, grid, consumers, interpret, regions=0):
    name = getattr(body, "func", body).__name__.strip("_")
    return call(body, out_type, grid, consumers, interpret, regions - 1 if name == kernel else regions)

  q = jnp.asarray(rng.standard_normal((1, 384, 1, 64)), jnp.bfloat16)

  def loss(q, k, v):
    return ck.block_sparse_attention(q, k, v, None, flavour="mosaic_gpu", interpret=True).astype(jnp.float32).sum()

  grad = jax.grad(loss, argnums=(0, 1, 2))
  monkeypatch.setenv(mosaic_gpu.FWD_CTAS_ENV, "3")
  jax.block_until_ready(grad(q, q, q))  # as declared: passes
  monkeypatch.setattr(mosaic_gpu, "_kernel_call", one_fewer)
  with pytest.raises(Exception, match=f"{kernel}: warpgroup . of CTA .* entered .* named regions, more than"):
    jax.block_until_ready(jax.grad(lambda q, k, v: loss(q, k, v) * 1.0, argnums=(0, 1, 2))(q, q, q))
