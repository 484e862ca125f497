"""``cinema-jax bench attention``: the quick CPU run prints every mask for ours and XLA with ratios, and the Mosaic
GPU scheme line says which forward (persistent or one CTA per item) and backward tiles a mask gets."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
  # On the CPU splash runs interpreted, so ours also gets its ratio to splash with the same mask.
  ours = [r for r in records if r["impl"] == "pallas"]
  assert {(r["mask"], r["direction"]) for r in records if r["impl"] == "splash"} == {
    (r["mask"], r["direction"]) for r in ours
  }
  assert all(r["ratio_splash"] > 0 for r in ours)
  dense_xla = [r["ratio"] for r in records if r["mask"] == "dense" and r["impl"] == "xla"]
  assert dense_xla == [1.0, 1.0]  # the reference itself
  out = capsys.readouterr().out
  assert "x ref dense" in out and "x splash" in out
  assert out.count("skipping cudnn: it runs on NVIDIA GPUs, this is cpu") == 1  # said once, not per mask


def test_the_scheme_follows_the_rows_of_the_mask(monkeypatch):
  from cinema_kernels import mosaic_gpu

  monkeypatch.delenv(mosaic_gpu.FWD_CTAS_ENV, raising=False)
  monkeypatch.setattr(mosaic_gpu, "PERSISTENT_BY_DEFAULT", True)
  q = jax.ShapeDtypeStruct((1, 4096, 24, 128), jnp.bfloat16)
  even = bench._kernel_scheme(q, bench.benchmark_mask("8-segment", 4096))
  uneven = bench._kernel_scheme(q, bench.benchmark_mask("frame-causal", 4096))
  assert "(persistent)" in even and "bwd tiles 128x128" in even
  assert uneven.startswith("fwd 768 CTAs (one per item), 2-slot ring")  # 24 heads x 32 rows of 128
  monkeypatch.setenv(mosaic_gpu.FWD_STEPS_ENV, "3")
  assert "(one per item), 3-slot ring, bwd" in bench._kernel_scheme(q, bench.benchmark_mask("frame-causal", 4096))
  monkeypatch.setenv(mosaic_gpu.FWD_OVERLAP_ENV, "1")
  scheme = bench._kernel_scheme(q, bench.benchmark_mask("frame-causal", 4096))
  assert "(one per item), 3-slot ring, overlapped softmax, bwd" in scheme


def test_any_tile_flag_overrides_and_the_others_keep_the_defaults():
  from cinema_kernels import BlockSizes

  assert bench.tile_override(bench._parse([])) is None
  # A bare backward override once fell through (only --block-q turned overrides on): the kernels kept 64 x 64.
  sizes = bench.tile_override(bench._parse(["--block-q-bwd", "64", "--block-kv-bwd", "32"]))
  assert sizes == BlockSizes(block_q=128, block_kv=128, block_q_bwd=64, block_kv_bwd=32)  # CPU: interpret defaults
  assert bench.tile_override(bench._parse(["--block-kv", "64"])) == BlockSizes(block_q=128, block_kv=64)


def test_on_hopper_the_backward_follows_forward_tiles_given_alone(monkeypatch):
  from cinema_kernels import DEFAULT_BLOCK_SIZES, BlockSizes

  monkeypatch.setattr(bench, "_kernel_tiles_in_force", lambda: ("mosaic_gpu", False, DEFAULT_BLOCK_SIZES["mosaic_gpu"]))

  def tiles(*flags):
    return bench.tile_override(bench._parse(list(flags)))

  assert tiles("--block-kv", "64") == BlockSizes(128, 64)  # backward = forward, as in a config
  assert tiles("--block-q-bwd", "64", "--block-kv-bwd", "64") == BlockSizes(128, 128, 64, 64)
  assert tiles("--block-q-bwd", "64") == BlockSizes(128, 128, 64, 128)  # the other side keeps the backend's


def test_each_record_reaches_the_json_file_as_it_is_measured(tmp_path, monkeypatch):
  # A run cut short (a time limit, a crash in a later mask) keeps the records measured so far.
  path = tmp_path / "records.json"
  seen = []

  def write(records):
    bench._write_json(str(path), records)
    seen.append(len(json.loads(path.read_text())["records"]))

  args = dict(batch=1, heads=2, head_dim=64, dtype=jnp.float32, iters=1, warmup=1, backward=False, xla_max_length=128)
  records = bench.run([128], ["dense", "8-segment"], ["xla"], on_record=write, **args)
  assert seen == [1, 2] and len(records) == 2
  assert not list(tmp_path.glob(".*.partial"))


def test_time_call_warms_up_for_the_seconds_asked(monkeypatch):
  from cinema_jax.bench import timing

  now = [0.0]

  def clock():  # a fake clock: each reading is 10 ms after the last, whatever the machine's load
    now[0] += 0.01
    return now[0]

  monkeypatch.setattr(timing.time, "perf_counter", clock)
  calls = []

  def fn():
    calls.append(1)
    return jnp.zeros(())

  timing.time_call(fn, warmup=1, iters=2)
  assert len(calls) == 3
  calls.clear()
  timing.time_call(fn, warmup=1, iters=2, warmup_seconds=0.1)
  assert len(calls) == 3 + 9  # readings at +10, +20, ..., +100 ms: nine more calls before the deadline


def test_time_call_queues_calls_and_divides_by_their_number(monkeypatch):
  from cinema_jax.bench import timing

  now = [0.0]
  monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])
  calls = []

  def fn():  # each call takes 4 ms of the fake clock
    calls.append(1)
    now[0] += 0.004
    return jnp.zeros(())

  seconds = timing.time_call(fn, warmup=1, iters=3, queue=5)
  assert len(calls) == 1 + 3 * 5
  assert seconds == pytest.approx(0.004)
  with pytest.raises(ValueError, match="queue must be >= 1"):
    timing.time_call(fn, queue=0)


def test_queued_times_join_the_records_and_the_table():
  args = dict(batch=1, heads=2, head_dim=64, dtype=jnp.float32, iters=1, warmup=1, backward=False, xla_max_length=128)
  records = bench.run([128], ["dense"], ["xla"], queue=3, **args)
  assert records[0]["ms_queued"] > 0
  header = bench.table(records).splitlines()[0].split()
  assert header[header.index("ms") + 1 : header.index("ms") + 3] == ["queued", "ms"]
  plain = bench.run([128], ["dense"], ["xla"], **args)
  assert "ms_queued" not in plain[0] and "queued" not in bench.table(plain)


@pytest.mark.parametrize("queue", ["1", "-2"])
def test_a_queue_of_one_call_is_refused(queue, capsys):
  with pytest.raises(SystemExit):
    bench.main(["--queue", queue, "--quick"])
  assert "--queue takes N >= 2" in capsys.readouterr().err


def test_kernel_profiles_need_the_mosaic_gpu_kernels(tmp_path, capsys):
  assert bench.main(["--profile-kernels", str(tmp_path), "--lengths", "256", "--masks", "8-segment"]) == 2
  assert "--profile-kernels needs the Mosaic GPU kernels (a Hopper GPU)" in capsys.readouterr().err


@pytest.mark.parametrize("name", bench.MASK_NAMES)
def test_splash_computes_the_same_attention_as_xla(name):
  # The TPU reference must attend exactly as ours and XLA do (mask, scale, layout), or its ratio means nothing.
  from cinema_jax.bench.splash import splash_attention_fn

  length = 384  # three 128-token splash tiles a side: empty, partial and full tiles, not one tile for all
  keys = jax.random.split(jax.random.key(3), 4)
  q, k, v = (jax.random.normal(key, (2, length, 2, 64), jnp.float32) for key in keys[:3])
  do = jax.random.normal(keys[3], q.shape, jnp.float32)
  mask = bench.benchmark_mask(name, length)
  ours = splash_attention_fn(mask, name, length, interpret=True)
  ref = bench._attention_fn("xla", mask, name, length)
  out, vjp = jax.vjp(ours, q, k, v)
  out_ref, vjp_ref = jax.vjp(ref, q, k, v)
  np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-5)
  for grad, grad_ref in zip(vjp(do), vjp_ref(do), strict=True):
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-4, atol=1e-4)


def test_splash_names_a_length_it_cannot_tile():
  from cinema_jax.bench.splash import splash_attention_fn, splash_block

  assert [splash_block(n) for n in (128, 384, 1024, 16384)] == [128, 128, 512, 512]
  fn = splash_attention_fn(None, "dense", 200, interpret=True)
  x = jnp.zeros((1, 200, 2, 64))
  with pytest.raises(ValueError, match="splash attention needs L a multiple of 128, got L = 200"):
    fn(x, x, x)


def test_a_failing_set_up_or_queue_leaves_the_rest_of_the_table(monkeypatch):
  from cinema_jax.bench import timing

  def no_splash(*args, **kwargs):
    raise ImportError("no splash attention in this JAX")

  real_time_call = timing.time_call

  def time_call(*args, queue=1, **kwargs):
    if queue > 1:
      raise MemoryError("out of memory holding the queued outputs")
    return real_time_call(*args, **kwargs)

  monkeypatch.setattr(bench, "splash_attention_fn", no_splash)
  monkeypatch.setattr(timing, "time_call", time_call)
  args = dict(batch=1, heads=2, head_dim=64, dtype=jnp.float32, iters=1, warmup=1, backward=True, xla_max_length=128)
  records = bench.run([128], ["dense"], ["splash", "xla"], queue=2, **args)
  assert [(r["impl"], r["direction"]) for r in records] == [
    ("splash", "fwd"),
    ("splash", "fwd+bwd"),
    ("xla", "fwd"),
    ("xla", "fwd+bwd"),
  ]
  assert all(r["ms"] is None and r["error"].startswith("ImportError: no splash") for r in records[:2])
  assert all(
    r["ms"] > 0 and r["ms_queued"] is None and r["queued_error"].startswith("MemoryError") for r in records[2:]
  )


def test_a_refused_kernel_setting_is_a_failed_record_not_a_crash(monkeypatch):
  from cinema_kernels import DEFAULT_BLOCK_SIZES, mosaic_gpu

  monkeypatch.setattr(bench, "_kernel_tiles_in_force", lambda: ("mosaic_gpu", False, DEFAULT_BLOCK_SIZES["mosaic_gpu"]))
  monkeypatch.setenv(mosaic_gpu.FWD_STEPS_ENV, "3")
  monkeypatch.setenv(mosaic_gpu.FWD_CTAS_ENV, "2")  # 4 items: persistent, two query buffers leave no room
  args = dict(batch=1, heads=2, head_dim=128, dtype=jnp.bfloat16, iters=1, warmup=1, backward=False, xla_max_length=256)
  records = bench.run([256], ["dense"], ["pallas", "xla"], **args)
  assert records[0]["ms"] is None and "CINEMA_MOSAIC_GPU_FWD_STEPS=3: the forward would need" in records[0]["error"]
  assert records[1]["ms"] > 0
  # Inputs outside the Mosaic GPU kernels' scope run the Triton kernels: no scheme to name.
  assert bench._kernel_scheme(jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.float32), None) is None


# A profile as a GPU writes it: CUPTI's stream lines beside lines that repeat their spans, and a host plane.
_GPU_PROFILE = """
planes {
  id: 1 name: "/device:GPU:0"
  lines { id: 7 name: "Stream #7(Kernel,MemcpyH2D)" timestamp_ns: 1000
    events { metadata_id: 1 offset_ps: 0 duration_ps: 600000000 }
    events { metadata_id: 2 offset_ps: 700000000 duration_ps: 50000000 }
    events { metadata_id: 1 offset_ps: 900000000 duration_ps: 640000000 }
    events { metadata_id: 2 offset_ps: 1600000000 duration_ps: 70000000 } }
  lines { id: 8 name: "Stream #9(Kernel)" timestamp_ns: 1000
    events { metadata_id: 3 offset_ps: 0 duration_ps: 20000000 } }
  lines { id: 9 name: "XLA Ops" timestamp_ns: 1000 events { metadata_id: 4 offset_ps: 0 duration_ps: 900000000 } }
  lines { id: 10 name: "CUPTI overhead" timestamp_ns: 1000
    events { metadata_id: 5 offset_ps: 0 duration_ps: 5000000 }
    events { metadata_id: 3 offset_ps: 9000000 duration_ps: 40000000 stats { metadata_id: 1 uint64_value: 77 } } }
  event_metadata { key: 1 value { id: 1 name: "fwd_kernel" } }
  event_metadata { key: 2 value { id: 2 name: "MemcpyH2D" } }
  event_metadata { key: 3 value { id: 3 name: "loop_fusion" } }
  event_metadata { key: 4 value { id: 4 name: "custom-call.1" } }
  event_metadata { key: 5 value { id: 5 name: "overhead" } }
  stat_metadata { key: 1 value { id: 1 name: "correlation_id" } }
}
planes {
  id: 2 name: "/host:CPU"
  lines { id: 1 name: "python" timestamp_ns: 1000 events { metadata_id: 1 offset_ps: 0 duration_ps: 9000000000 } }
  event_metadata { key: 1 value { id: 1 name: "PjitFunction(fn)" } }
}
"""


def test_device_time_adds_up_the_stream_events_per_call():
  from jax.profiler import ProfileData

  from cinema_jax.bench import timing

  measured = timing.device_time_from_profile(ProfileData.from_text_proto(_GPU_PROFILE), calls=2)
  # Two calls: the kernel 0.60 + 0.64 ms, the copies 0.05 + 0.07 ms, a fusion 0.02 ms on one stream and 0.04 ms on
  # a stream whose line the tracer named for its own records (a launch: it has a correlation id); neither the ops
  # line (it repeats the streams' spans), the tracer's own overhead nor the host counts.
  assert list(measured.kernels) == ["fwd_kernel", "MemcpyH2D", "loop_fusion"]  # longest first
  np.testing.assert_allclose(list(measured.kernels.values()), [0.62, 0.06, 0.03], rtol=1e-9)
  np.testing.assert_allclose(measured.ms, 0.71, rtol=1e-9)


def test_device_time_takes_the_ops_line_where_a_plane_has_no_streams():
  from jax.profiler import ProfileData

  from cinema_jax.bench import timing

  tpu = _GPU_PROFILE.replace("/device:GPU:0", "/device:TPU:0").replace('name: "Stream #', 'name: "Core #')
  tpu = tpu.replace('name: "CUPTI overhead"', 'name: "Steps"')
  measured = timing.device_time_from_profile(ProfileData.from_text_proto(tpu), calls=3)
  assert measured.kernels == pytest.approx({"custom-call.1": 0.3})


def test_device_time_names_a_profile_without_device_activity():
  from jax.profiler import ProfileData

  from cinema_jax.bench import timing

  host_only = _GPU_PROFILE[_GPU_PROFILE.index("planes {\n  id: 2") :]
  with pytest.raises(RuntimeError, match=r"no device activity .*planes: \['/host:CPU'\]"):
    timing.device_time_from_profile(ProfileData.from_text_proto(host_only), calls=1)
  with pytest.raises(ValueError, match="calls must be >= 1"):
    timing.device_time_from_profile(ProfileData.from_text_proto(_GPU_PROFILE), calls=0)
  # A real trace on the CPU holds host threads only: the same error, from the profiler's own output.
  fn = jax.jit(lambda x: x * 2)
  x = jnp.ones((8,))
  fn(x)
  with pytest.raises(RuntimeError, match="no device activity"):
    timing.device_time(fn, x, calls=2)


def test_device_times_join_the_records_and_a_failing_trace_leaves_the_timings(monkeypatch, capsys):
  from cinema_jax.bench import timing

  traced = []

  def device_time(fn, *args, calls):
    traced.append(calls)
    return timing.DeviceTime(ms=0.5, kernels={"fwd_kernel_with_a_very_long_mangled_name" * 3: 0.4, "copy": 0.1})

  monkeypatch.setattr(timing, "device_time", device_time)
  args = dict(batch=1, heads=2, head_dim=64, dtype=jnp.float32, iters=3, warmup=1, backward=False, xla_max_length=128)
  records = bench.run([128], ["dense"], ["xla"], device_time=True, **args)
  assert traced == [3]  # as many calls traced as timed
  assert records[0]["ms"] > 0 and records[0]["ms_device"] == 0.5 and list(records[0]["kernels"].values()) == [0.4, 0.1]
  assert (
    "(device 0.500: " + ("fwd_kernel_with_a_very_long_mangled_name" * 2)[:48] + " 0.400, copy 0.100)"
    in capsys.readouterr().out
  )
  header = bench.table(records).splitlines()[0].split()
  assert header[header.index("ms") + 1 : header.index("ms") + 3] == ["device", "ms"]

  def no_tracer(fn, *args, calls):
    raise RuntimeError("the profile holds no device activity")

  monkeypatch.setattr(timing, "device_time", no_tracer)
  records = bench.run([128], ["dense"], ["xla"], device_time=True, **args)
  assert records[0]["ms"] > 0 and records[0]["ms_device"] is None
  assert records[0]["device_error"] == "RuntimeError: the profile holds no device activity"
  assert "device" not in bench.table(records)


def test_the_json_carries_the_per_call_floor(tmp_path, capsys):
  out = tmp_path / "records.json"
  assert bench.main(["--quick", "--masks", "dense", "--impls", "xla", "--json", str(out)]) == 0
  payload = json.loads(out.read_text())
  assert 0 < payload["call_floor_ms"] < min(r["ms"] for r in payload["records"])
  assert "a trivial jitted call, waited for:" in capsys.readouterr().out


def test_each_block_sparse_forward_is_checked_against_xla(monkeypatch, capsys):
  args = dict(batch=1, heads=2, head_dim=64, dtype=jnp.float32, iters=1, warmup=1, backward=True, xla_max_length=128)
  records = bench.run([128], ["8-segment"], ["pallas", "xla"], **args)
  checked = [r for r in records if "err" in r]
  assert [(r["impl"], r["direction"]) for r in checked] == [("pallas", "fwd")]  # not XLA itself, nor gradients
  assert checked[0]["err"] < 1e-5 and not checked[0]["wrong"]
  assert "err vs XLA" in bench.table(records)

  # A kernel that computes something else is marked, and fails the run, however fast it is.
  real = bench._attention_fn

  def wrong_kernel(impl, mask, name, length):
    fn = real(impl, mask, name, length)
    return (lambda q, k, v: fn(q, k, v)[:, ::-1]) if impl == "pallas" else fn

  monkeypatch.setattr(bench, "_attention_fn", wrong_kernel)
  records = bench.run([128], ["8-segment"], ["pallas"], **args)
  assert records[0]["err"] > 0.5 and records[0]["wrong"]
  assert "WRONG" in bench.table(records) and "WRONG" in capsys.readouterr().out
  code = bench.main(["--quick", "--masks", "8-segment", "--impls", "pallas"])
  assert code == 1
  assert "pallas at L=128 8-segment is off XLA's output by" in capsys.readouterr().err


def test_a_failing_check_leaves_the_timing(monkeypatch):
  def no_memory(*args):
    raise MemoryError("no room for the reference's scores")

  monkeypatch.setattr(bench, "output_error", no_memory)
  args = dict(batch=1, heads=2, head_dim=64, dtype=jnp.float32, iters=1, warmup=1, backward=False, xla_max_length=128)
  records = bench.run([128], ["causal"], ["pallas"], **args)
  assert records[0]["ms"] > 0 and records[0].get("err") is None
  assert records[0]["check_error"] == "MemoryError: no room for the reference's scores"
  assert bench.error_tolerance(jnp.bfloat16) == 2e-2 and bench.error_tolerance("float32") == 1e-4
