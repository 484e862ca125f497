"""The Mosaic GPU (Hopper) kernels: lowering and interpret mode on any machine, compiled numerics on a Hopper GPU.

On the CPU the tests (1) lower forward and backward for CUDA with ``jax.export`` (the whole Pallas -> Mosaic GPU
lowering runs here, shared-memory budget included; the final PTX compilation happens on the device) and check which
inputs fall back to the Triton kernels; (2) run the kernels' traced bodies in ``mosaic_gpu_interpret`` (one thread per
warpgroup, barriers counted) against XLA attention; (3) check that the interpreter catches a deadlocked barrier
protocol. On a Hopper GPU the compiled kernels are compared with XLA. Outputs and dq, dk, dv within 2e-2 (bf16/f16
inputs, compared in float32), exact zeros on rows that see nothing.
"""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export, lax
from jax.experimental import pallas as pl

import cinema_kernels as ck
from cinema_jax.attention import masks
from cinema_jax.bench.attention import benchmark_mask
from cinema_kernels import _compat, mosaic_gpu, mosaic_gpu_interpret
from tests.test_kernels import grads, kernel_masks, make_qkv, rel_err, xla
from tests.test_kernels_lowering import export_or_skip

SIZES = ck.default_block_sizes("mosaic_gpu")


def _is_hopper():
  if jax.default_backend() != "gpu":
    return False
  cc = getattr(jax.devices()[0], "compute_capability", "0")
  return int(str(cc).split(".")[0]) >= 9


def needs_hopper(test):
  """Marked ``hopper`` (``-m hopper`` selects the hardware checks) and skipped without a Hopper GPU."""
  skip = pytest.mark.skipif(not _is_hopper(), reason="needs an NVIDIA Hopper (or newer) GPU")
  return pytest.mark.hopper(skip(test))


def _targets(fn, *specs):
  triton = "__gpu$xla.gpu.triton"
  checks = [export.DisabledSafetyCheck.custom_call(triton)]
  text = export_or_skip(fn, *specs, platform="cuda", checks=checks).mlir_module()
  return text.count("custom_call @mosaic_gpu"), text.count(f"custom_call @{triton}")


def _mask_of(kind, length):
  seg = np.repeat(np.arange(4), -(-length // 4))[:length].astype(np.int32)
  if kind == "none":
    return lambda _: None
  if kind == "ids":  # keyframe segments or frame block-causal, the MM-DiT's hybrid layout, with padding
    keep = np.arange(length) < length - 37
    return lambda _: (
      (masks.SegmentMask(seg) | masks.BlockCausalMask(np.arange(length) // 100)) & masks.padding_mask(keep)
    )
  return lambda ids: masks.SegmentMask(ids) | masks.BlockCausalMask(ids)  # traced: in-graph summaries


@pytest.mark.parametrize("case", [("none", jnp.float16, 64), ("ids", jnp.bfloat16, 128), ("traced", jnp.bfloat16, 64)])
def test_forward_and_backward_lower_to_mosaic_gpu(case):
  kind, dtype, d = case
  b, length, h = 1, 1000, 2  # not a multiple of the tiles: padded
  spec = jax.ShapeDtypeStruct((b, length, h, d), dtype)
  ids = jax.ShapeDtypeStruct((b, length), jnp.int32)
  mask_of = _mask_of(kind, length)

  def fwd(q, k, v, ids):
    return ck.block_sparse_attention(q, k, v, mask_of(ids), flavour="mosaic_gpu", interpret=False)

  def loss(q, k, v, ids):
    return jax.grad(lambda q, k, v: fwd(q, k, v, ids).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)

  assert _targets(fwd, spec, spec, spec, ids) == (1, 0)
  assert _targets(loss, spec, spec, spec, ids) == (3, 0)  # forward, dq, dk/dv


# Backward tiles: 64 or 128 rows per CTA (one or two consumers) x 64 or 128 columns per list entry (one or two parts).
# Backward tiles the Mosaic GPU kernels take; the first is the default (DEFAULT_BLOCK_SIZES["mosaic_gpu"]).
BWD_TILES = [(128, 128), (64, 64), (64, 128), (128, 64)]
assert BWD_TILES[0] == ck.DEFAULT_BLOCK_SIZES["mosaic_gpu"].bwd


@pytest.mark.parametrize("bwd", BWD_TILES, ids=lambda t: f"{t[0]}x{t[1]}")
def test_every_backward_tile_shape_lowers_to_mosaic_gpu(bwd):
  length = 1000
  spec = jax.ShapeDtypeStruct((1, length, 2, 128), jnp.bfloat16)
  mask_of = _mask_of("ids", length)
  sizes = ck.BlockSizes(128, 128, *bwd)

  def loss(q, k, v):
    f = lambda q, k, v: ck.block_sparse_attention(  # noqa: E731
      q, k, v, mask_of(None), flavour="mosaic_gpu", interpret=False, block_sizes=sizes
    )
    return jax.grad(lambda q, k, v: f(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)

  assert _targets(loss, spec, spec, spec) == (3, 0)


def test_inputs_outside_the_scope_run_the_triton_kernels():
  length = 256
  f32 = jax.ShapeDtypeStruct((1, length, 2, 64), jnp.float32)
  bf16 = jax.ShapeDtypeStruct((1, length, 2, 64), jnp.bfloat16)
  dense = masks.DenseMask(np.tril(np.ones((length, length), bool)))

  def run(mask=None, sizes=None):
    return lambda q, k, v: ck.block_sparse_attention(
      q, k, v, mask, flavour="mosaic_gpu", interpret=False, block_sizes=sizes
    )

  assert _targets(run(), f32, f32, f32) == (0, 1)  # float32: no 16-bit WGMMA
  assert _targets(run(dense), bf16, bf16, bf16) == (0, 1)  # stored dense tiles
  assert _targets(run(None, ck.BlockSizes(64, 64)), bf16, bf16, bf16) == (0, 1)  # forward needs 128-row tiles
  bwd_256 = ck.BlockSizes(128, 128, 256, 64)  # backward CTAs of 256 rows: more consumers than registers allow
  assert (
    mosaic_gpu.supports(
      bf16, ck.prepare_mask(None, bf16, bf16, block_sizes=bwd_256, flavour="mosaic_gpu", interpret=False)
    )
    is False
  )
  assert _targets(run(), bf16, bf16, bf16) == (1, 0)


# ------------------------------------------------------------------------------------------------ interpret mode


@pytest.mark.parametrize("name", ["segment_random", "block_causal", "hybrid", "goldenmem", "full"])
def test_interpreted_kernels_match_xla_on_the_mask_zoo(name, rng):
  b, length = 2, 300  # padded to 384: partial tiles check positions; fully masked rows in two of the masks
  mask = kernel_masks(rng, length, b)[name]
  q, k, v = make_qkv(1, b, length, length, 2, 64, jnp.bfloat16)
  _check(q, k, v, mask, interpret=True)


@pytest.mark.parametrize("ctas", ["1", "4", "12"])
def test_the_persistent_forward_walks_any_share_of_items(ctas, rng, monkeypatch):
  # 12 items (2 samples x 2 heads x 3 rows of 128): one CTA walks them all, four walk 3 each, twelve walk one each.
  # Items alternate query buffers and the key/value ring runs on across them.
  monkeypatch.setenv(mosaic_gpu.FWD_CTAS_ENV, ctas)
  assert mosaic_gpu.forward_ctas(12, interpret=True) == int(ctas)
  b, length = 2, 300
  keep = np.arange(length)[None] < np.array([[300], [100]])  # sample 1: rows 1 and 2 see nothing (empty items)
  mask = kernel_masks(rng, length, b)["goldenmem"] & masks.padding_mask(keep)
  q, k, v = make_qkv(4, b, length, length, 2, 64, jnp.bfloat16)
  out = ck.block_sparse_attention(q, k, v, mask, flavour="mosaic_gpu", interpret=True)
  ref = xla(*(x.astype(jnp.float32) for x in (q, k, v)), mask)
  assert rel_err(out, ref) < 2e-2
  assert np.all(np.asarray(out, np.float32)[1, 100:] == 0)


def test_forward_ctas_follow_the_override_and_the_items(monkeypatch):
  monkeypatch.delenv(mosaic_gpu.FWD_CTAS_ENV, raising=False)
  sms = mosaic_gpu._sm_count()
  if jax.default_backend() != "gpu":
    assert sms == 132  # no GPU to ask: an H100's SMs
  assert mosaic_gpu.forward_ctas(3072, interpret=False) == (sms if mosaic_gpu.PERSISTENT_BY_DEFAULT else 3072)
  monkeypatch.setattr(mosaic_gpu, "PERSISTENT_BY_DEFAULT", True)
  assert mosaic_gpu.forward_ctas(3072, interpret=False) == sms  # even rows: persistent
  assert mosaic_gpu.forward_ctas(3072, interpret=False, even_rows=False) == 3072  # uneven rows: one CTA per item
  assert mosaic_gpu.forward_ctas(5, interpret=False) == 5  # never more CTAs than items
  monkeypatch.setattr(mosaic_gpu, "PERSISTENT_BY_DEFAULT", False)
  monkeypatch.setenv(mosaic_gpu.FWD_CTAS_ENV, "sm")
  assert mosaic_gpu.forward_ctas(3072, interpret=False, even_rows=False) == sms
  spec = jax.ShapeDtypeStruct((1, 1024, 2, 64), jnp.bfloat16)
  even = [
    ck.prepare_mask(m, spec, spec, block_sizes=SIZES, flavour="mosaic_gpu", interpret=False).even_rows
    for m in (
      None,
      benchmark_mask("8-segment", 1024),
      benchmark_mask("causal", 1024),
    )
  ]
  assert even == [True, True, False]
  monkeypatch.setenv(mosaic_gpu.FWD_CTAS_ENV, "zero")
  with pytest.raises(ValueError, match="CINEMA_MOSAIC_GPU_FWD_CTAS must be a positive integer or 'sm'"):
    mosaic_gpu.forward_ctas(8, interpret=False)


def _check_forward_and_lse(q, k, v, mask):
  """The interpreted forward alone: its output against XLA's, its lse against the reference log-sum-exp (``+inf``
  on rows that see no key, which the backward never reads, so gradients would not tell)."""
  km = ck.prepare_mask(mask, q, k, flavour="mosaic_gpu", interpret=True)
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))  # noqa: E731
  scale = q.shape[-1] ** -0.5
  out, lse, _ = mosaic_gpu.forward(pad(q, km.q_pad), pad(k, km.kv_pad), pad(v, km.kv_pad), km, scale, interpret=True)
  b, lq, _, _ = q.shape
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  assert rel_err(out[:, :lq], xla(*f32, mask)) < 2e-2
  dense = np.broadcast_to(np.asarray(mask.to_dense(lq, k.shape[1])), (b, lq, k.shape[1]))
  scores = jnp.einsum("bqhd,bkhd->bhqk", f32[0], f32[1], precision="highest") * scale
  ref = np.asarray(jax.nn.logsumexp(jnp.where(dense[:, None], scores, -jnp.inf), axis=-1))  # [B, H, Lq]
  lse = np.asarray(lse[:, :, :lq])
  blind = np.broadcast_to(~dense.any(-1)[:, None], lse.shape)
  assert blind.any() and np.all(np.isposinf(lse[blind]))
  np.testing.assert_allclose(lse[~blind], ref[~blind], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
  "ctas, steps, d, length",
  [("100", "3", 128, 600), ("4", "4", 64, 300), ("1", "3", 64, 300)],
  ids=["one-per-item-3-slots-d128", "persistent-4-slots-d64", "one-cta-3-slots-d64"],
)
def test_a_deeper_forward_ring_matches_xla(ctas, steps, d, length, rng, monkeypatch):
  # One CTA per item keeps one query buffer (rows of up to 5 blocks refill the three slots); CTAs walking several
  # items keep two, and their rows start at ring slots other than 0. Beside a ring deeper than two slots the lse rows
  # go out from registers.
  monkeypatch.setenv(mosaic_gpu.FWD_CTAS_ENV, ctas)
  monkeypatch.setenv(mosaic_gpu.FWD_STEPS_ENV, steps)
  b = 2
  keep = np.arange(length)[None] < np.array([[length], [100]])  # sample 1: rows from 100 on see nothing
  mask = kernel_masks(rng, length, b)["goldenmem"] & masks.padding_mask(keep)
  q, k, v = make_qkv(6, b, length, length, 2, d, jnp.bfloat16)
  _check_forward_and_lse(q, k, v, mask)


def test_the_two_slot_forward_stores_lse_through_shared_memory(rng, monkeypatch):
  monkeypatch.setenv(mosaic_gpu.FWD_CTAS_ENV, "2")
  monkeypatch.delenv(mosaic_gpu.FWD_STEPS_ENV, raising=False)
  b, length = 2, 300
  keep = np.arange(length)[None] < np.array([[length], [100]])
  mask = kernel_masks(rng, length, b)["hybrid"] & masks.padding_mask(keep)
  q, k, v = make_qkv(8, b, length, length, 2, 64, jnp.bfloat16)
  _check_forward_and_lse(q, k, v, mask)


def test_the_forward_ring_follows_the_override_where_it_fits(monkeypatch):
  monkeypatch.delenv(mosaic_gpu.FWD_STEPS_ENV, raising=False)
  assert mosaic_gpu.forward_ring(2, 128, 128, 2) == 2
  monkeypatch.setenv(mosaic_gpu.FWD_STEPS_ENV, "3")
  assert mosaic_gpu.forward_ring(1, 128, 128, 2) == 3
  assert mosaic_gpu.forward_ring(2, 128, 64, 2) == 3
  with pytest.raises(ValueError, match=r"FWD_STEPS=3: the forward would need 264344 bytes of shared memory \(2 query"):
    mosaic_gpu.forward_ring(2, 128, 128, 2)
  monkeypatch.setenv(mosaic_gpu.FWD_STEPS_ENV, "1")
  with pytest.raises(ValueError, match="CINEMA_MOSAIC_GPU_FWD_STEPS must be an integer >= 2, got '1'"):
    mosaic_gpu.forward_ring(1, 128, 128, 2)


def test_a_three_slot_forward_ring_lowers_beside_one_query_buffer(monkeypatch):
  # Mosaic GPU's own launch check counts every byte (alignment, barriers): three 128 x 128 slots at D = 128 fit with
  # one query buffer and the lse rows out of shared memory (they did not with them: 128 bytes over).
  monkeypatch.setenv(mosaic_gpu.FWD_STEPS_ENV, "3")
  monkeypatch.setenv(mosaic_gpu.FWD_CTAS_ENV, "100")  # at least one per item: 16 items (2 heads x 8 rows)
  spec = jax.ShapeDtypeStruct((1, 1000, 2, 128), jnp.bfloat16)
  mask = _mask_of("ids", 1000)(None)

  def fwd():  # a fresh function each time: the settings are read when it is traced
    return lambda q, k, v: ck.block_sparse_attention(q, k, v, mask, flavour="mosaic_gpu", interpret=False)

  assert _targets(fwd(), spec, spec, spec) == (1, 0)
  monkeypatch.setenv(mosaic_gpu.FWD_CTAS_ENV, "4")  # persistent: two query buffers
  with pytest.raises(ValueError, match="CINEMA_MOSAIC_GPU_FWD_STEPS=3: the forward would need"):
    _targets(fwd(), spec, spec, spec)


@pytest.mark.parametrize(
  "name, ctas, steps, d",
  [
    ("goldenmem", "100", "2", 64),  # one CTA per item; rows with full and partial tiles, rows seeing nothing
    ("segment_random", "4", "2", 128),  # persistent: the turns and the ring run on across items
    ("hybrid", "1", "3", 64),  # one CTA walks every item through a three-slot ring
    ("padding", "100", "2", 64),  # no mask but the padding: tiles full but at the ends
  ],
)
def test_the_overlapped_forward_matches_xla(name, ctas, steps, d, rng, monkeypatch):
  # Each tile's softmax beside the previous tile's p v, the output rescaled after: the interpreter holds the WGMMAs
  # in flight until their waits, so a slot released early or an accumulator read too soon would raise.
  monkeypatch.setenv(mosaic_gpu.FWD_OVERLAP_ENV, "1")
  monkeypatch.setenv(mosaic_gpu.FWD_CTAS_ENV, ctas)
  monkeypatch.setenv(mosaic_gpu.FWD_STEPS_ENV, steps)
  b, length = 2, 300
  keep = np.arange(length)[None] < np.array([[length], [100]])  # sample 1: rows from 100 on see nothing
  mask = masks.padding_mask(keep)
  if name != "padding":
    mask = kernel_masks(rng, length, b)[name] & mask
  q, k, v = make_qkv(9, b, length, length, 2, d, jnp.bfloat16)
  _check_forward_and_lse(q, k, v, mask)


def test_the_overlapped_forward_without_a_mask_and_its_gradients(monkeypatch):
  # No mask: no ids, every tile full (the first tile's softmax masks nothing); the backward reads its lse.
  monkeypatch.setenv(mosaic_gpu.FWD_OVERLAP_ENV, "1")
  monkeypatch.setenv(mosaic_gpu.FWD_CTAS_ENV, "3")
  q, k, v = make_qkv(10, 1, 384, 384, 2, 64, jnp.bfloat16)
  _check(q, k, v, None, interpret=True)


def test_the_overlapped_forward_lowers_and_its_setting_is_checked(monkeypatch):
  monkeypatch.setenv(mosaic_gpu.FWD_OVERLAP_ENV, "1")
  spec = jax.ShapeDtypeStruct((1, 1000, 2, 128), jnp.bfloat16)
  mask = _mask_of("ids", 1000)(None)
  fwd = lambda q, k, v: ck.block_sparse_attention(q, k, v, mask, flavour="mosaic_gpu", interpret=False)  # noqa: E731
  assert _targets(fwd, spec, spec, spec) == (1, 0)
  plan = mosaic_gpu.forward_plan(spec, ck.prepare_mask(mask, spec, spec, flavour="mosaic_gpu"), interpret=False)
  assert plan.overlap
  monkeypatch.setenv(mosaic_gpu.FWD_OVERLAP_ENV, "yes")
  with pytest.raises(ValueError, match="CINEMA_MOSAIC_GPU_FWD_OVERLAP must be 0 or 1, got 'yes'"):
    mosaic_gpu.forward_overlap()


@pytest.mark.parametrize("bwd", BWD_TILES[1:], ids=lambda t: f"{t[0]}x{t[1]}")
def test_interpreted_backward_tiles_match_xla(bwd, rng):
  # Two consumers share each listed block, and a listed 128-block may be empty for one of them or for one 64-part:
  # the element mask (and padding) must still hide everything there.
  b, length = 2, 300
  mask = kernel_masks(rng, length, b)["hybrid"]
  q, k, v = make_qkv(3, b, length, length, 2, 128, jnp.float16)
  _check(q, k, v, mask, sizes=ck.BlockSizes(128, 128, *bwd), interpret=True)


@pytest.mark.parametrize("bwd", [(64, 64), (128, 128)], ids=lambda t: f"{t[0]}x{t[1]}")
def test_the_producers_load_exactly_the_non_empty_tiles(bwd, rng):
  # Skipping, proved on the Mosaic GPU kernels themselves: every TMA load of a key/value (or query/dO) block is a
  # non-empty tile of the mask's own block summary, and every non-empty tile is loaded once (per head).
  b, length, h = 2, 300, 2
  mask = kernel_masks(rng, length, b)["hybrid"]
  q, k, v = make_qkv(6, b, length, length, h, 64, jnp.bfloat16)
  sizes = ck.BlockSizes(128, 128, *bwd)

  def non_empty(bq, bkv):
    return h * int((mask.block_summary(bq, bkv, q_len=length, kv_len=length) != masks.EMPTY).sum())

  def ours(q, k, v):
    return ck.block_sparse_attention(q, k, v, mask, flavour="mosaic_gpu", interpret=True, block_sizes=sizes)

  with mosaic_gpu_interpret.count_loads() as loads:
    jax.block_until_ready(grads(ours, q, k, v))
  # Operands: forward (index, counts, q, k, v, ids...); dq and dk/dv (index, counts, q, k, v, dO, lse, delta, ...).
  items = b * h * (384 // 128)
  assert loads[("fwd_kernel", 2)] == 2 * items  # each item's queries, in two consumer halves
  assert loads[("fwd_kernel", 3)] == loads[("fwd_kernel", 4)] == non_empty(128, 128)
  assert loads[("dq_kernel", 3)] == loads[("dq_kernel", 4)] == non_empty(*bwd)
  assert loads[("dkv_kernel", 2)] == loads[("dkv_kernel", 5)] == loads[("dkv_kernel", 6)] == non_empty(*bwd)
  dense = h * b * (384 // bwd[0]) * (384 // bwd[1])
  assert non_empty(*bwd) < dense  # the mask does skip tiles


def _fill_ring(x_ref, ring, ready, used):
  """The producer of the small rings below: four blocks through two slots, refilling a slot once it is released."""
  plgpu = _compat.plgpu()
  for i in range(4):
    if i >= 2:
      plgpu.barrier_wait(used.at[i % 2])
    plgpu.copy_gmem_to_smem(x_ref.at[i], ring.at[i % 2], ready.at[i % 2])


def _store(out, o_ref):
  plgpu = _compat.plgpu()
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(out, o_ref)
  plgpu.wait_smem_to_gmem(0)


def _ring(x, consumer_releases: bool):
  """A two-slot TMA ring walked four times: the kernels' producer/consumer protocol, small."""
  plgpu = _compat.plgpu()

  def body(x_ref, o_ref):
    def scoped(ring, out, ready, used):
      wg = lax.axis_index("wg")

      @pl.when(wg == 0)
      def _consumer():
        for i in range(4):
          plgpu.barrier_wait(ready.at[i % 2])
          out[i] = ring[i % 2] * 2.0
          if consumer_releases:
            plgpu.barrier_arrive(used.at[i % 2])
        _store(out, o_ref)

      pl.when(wg == 1)(lambda: _fill_ring(x_ref, ring, ready, used))

    pl.run_scoped(
      scoped,
      plgpu.SMEM((2, 128), jnp.float32),
      plgpu.SMEM((4, 128), jnp.float32),
      plgpu.Barrier(num_barriers=2),
      plgpu.Barrier(num_barriers=2),
      collective_axes="wg",
    )

  kernel = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct(x.shape, x.dtype), num_threads=2, thread_name="wg")
  return mosaic_gpu_interpret.interpret(kernel, x)


def test_the_interpreter_runs_a_ring_and_catches_a_deadlock():
  x = jnp.arange(4 * 128, dtype=jnp.float32).reshape(4, 128)
  np.testing.assert_array_equal(_ring(x, consumer_releases=True), 2 * x)
  before = threading.active_count()
  # Without the consumer's releases the producer waits forever for slot 0: reported, not hung.
  with pytest.raises(Exception, match="deadlock"):
    jax.block_until_ready(_ring(x, consumer_releases=False))
  assert threading.active_count() <= before


def _wgmma_ring(x, w, release: str):
  """A consumer multiplies each of four [64, 64] blocks brought through a two-slot ring by ``w``: by two WGMMAs in
  flight at once (``x_i w`` and ``x_i (2 w)``), the first read with ``wait_n=1``. ``release``: the slot is released
  "after" both were waited for, "before" (a WGMMA in flight still reads it), or "early" reads the second accumulator
  with one WGMMA still allowed in flight (its own)."""
  plgpu = _compat.plgpu()

  def body(x_ref, w_ref, o_ref):
    def scoped(ring, w_smem, w2_smem, out, ready, w_ready, used):
      wg = lax.axis_index("wg")

      @pl.when(wg == 0)
      def _consumer():
        plgpu.barrier_wait(w_ready)
        for i in range(4):
          plgpu.barrier_wait(ready.at[i % 2])

          def products(acc, acc2, i=i):
            plgpu.wgmma(acc, ring.at[i % 2], w_smem)
            plgpu.wgmma(acc2, ring.at[i % 2], w2_smem)
            if release == "before":
              plgpu.barrier_arrive(used.at[i % 2])
            first = plgpu.wgmma_accumulator_load(acc, wait_n=1)
            second = plgpu.wgmma_accumulator_load(acc2, wait_n=1 if release == "early" else 0)
            return first + second

          ACC = plgpu.ACC((64, 64), jnp.float32)
          out[i] = pl.run_scoped(products, ACC, ACC)
          if release != "before":
            plgpu.barrier_arrive(used.at[i % 2])
        _store(out, o_ref)

      @pl.when(wg == 1)
      def _producer():
        plgpu.copy_gmem_to_smem(w_ref.at[0], w_smem, w_ready)
        plgpu.copy_gmem_to_smem(w_ref.at[1], w2_smem, w_ready)
        _fill_ring(x_ref, ring, ready, used)

    pl.run_scoped(
      scoped,
      mosaic_gpu._smem((2, 64, 64), jnp.bfloat16),
      mosaic_gpu._smem((64, 64), jnp.bfloat16),
      mosaic_gpu._smem((64, 64), jnp.bfloat16),
      plgpu.SMEM((4, 64, 64), jnp.float32),
      plgpu.Barrier(num_barriers=2),
      plgpu.Barrier(num_arrivals=2),
      plgpu.Barrier(num_barriers=2),
      collective_axes="wg",
    )

  out_type = jax.ShapeDtypeStruct((4, 64, 64), jnp.float32)
  kernel = plgpu.kernel(body, out_type=out_type, num_threads=2, thread_name="wg")
  return mosaic_gpu_interpret.interpret(kernel, x, jnp.stack([w, 2 * w]))


def test_the_interpreter_holds_wgmmas_in_flight_until_a_wait(monkeypatch):
  keys = jax.random.split(jax.random.key(5), 2)
  x = jax.random.normal(keys[0], (4, 64, 64), jnp.float32).astype(jnp.bfloat16)
  w = jax.random.normal(keys[1], (64, 64), jnp.float32).astype(jnp.bfloat16)
  expected = 3 * jnp.einsum("ikd,dn->ikn", x.astype(jnp.float32), w.astype(jnp.float32), precision="highest")
  np.testing.assert_allclose(_wgmma_ring(x, w, "after"), expected, rtol=1e-5, atol=1e-4)
  # A slot released while a WGMMA in flight reads it: the producer's refill overwrites the operand on the GPU. The
  # consumer yields after the release; a long yield here makes the refill come first on any machine.
  monkeypatch.setattr(mosaic_gpu_interpret, "_WGMMA_PAUSE", 0.5)
  with pytest.raises(Exception, match="a TMA load of warpgroup 1 overwrites shared memory that a WGMMA of warpgroup 0"):
    jax.block_until_ready(_wgmma_ring(x, w, "before"))
  with pytest.raises(Exception, match="reads a WGMMA accumulator while a WGMMA writing it is in flight"):
    jax.block_until_ready(_wgmma_ring(x, w, "early"))


def test_scope():
  q = jnp.zeros((1, 256, 2, 128), jnp.bfloat16)
  km = ck.prepare_mask(None, q, q, block_sizes=SIZES, flavour="mosaic_gpu", interpret=False)
  assert mosaic_gpu.supports(q, km)
  assert not mosaic_gpu.supports(q.astype(jnp.float32), km)
  assert not mosaic_gpu.supports(jnp.zeros((1, 256, 2, 32), jnp.bfloat16), km)


# ------------------------------------------------------------------------------------------------ on a Hopper GPU


def _check(q, k, v, mask, tol=2e-2, sizes=None, interpret=None):
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]

  def ours(q, k, v):
    return ck.block_sparse_attention(q, k, v, mask, flavour="mosaic_gpu", block_sizes=sizes, interpret=interpret)

  out = ours(q, k, v)
  ref = xla(*f32, mask)
  assert rel_err(out, ref) < tol
  if mask is not None:
    lq, lkv = q.shape[1], k.shape[1]
    dense = np.broadcast_to(np.asarray(mask.to_dense(lq, lkv)), (q.shape[0], lq, lkv))
    blind = ~dense.any(-1)
    assert np.all(np.asarray(out.astype(jnp.float32))[blind] == 0)
  g = grads(ours, q, k, v)
  g_ref = grads(lambda q, k, v: xla(q, k, v, mask), *f32)
  for name, a, r in zip("qkv", g, g_ref, strict=True):
    assert np.all(np.isfinite(np.asarray(a, np.float32))), name
    assert rel_err(a, r) < tol, name


@needs_hopper
@pytest.mark.parametrize("name", ["segment_random", "block_causal", "hybrid", "goldenmem", "full"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_matches_xla_on_the_mask_zoo(name, dtype, rng):
  b, length = 2, 600  # padded to 640: partial tiles check positions
  mask = kernel_masks(rng, length, b)[name]
  q, k, v = make_qkv(1, b, length, length, 2, 64, dtype)
  _check(q, k, v, mask)


@needs_hopper
@pytest.mark.parametrize("name", ["dense", "8-segment", "frame-causal", "goldenmem"])
def test_matches_xla_on_the_benchmark_masks_head_dim_128(name):
  length = 2048
  mask = benchmark_mask(name, length)
  q, k, v = make_qkv(2, 1, length, length, 4, 128, jnp.bfloat16)
  _check(q, k, v, mask)


@needs_hopper
@pytest.mark.parametrize("bwd", BWD_TILES[1:], ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize("name", ["segment_random", "hybrid", "goldenmem"])
def test_backward_tiles_match_xla(name, bwd, rng):
  # Two consumers share each listed block, and a listed 128-block may be empty for one of them or for one 64-part:
  # the element mask (and padding) must still hide everything there.
  b, length = 2, 600
  mask = kernel_masks(rng, length, b)[name]
  q, k, v = make_qkv(3, b, length, length, 2, 128, jnp.bfloat16)
  _check(q, k, v, mask, sizes=ck.BlockSizes(128, 128, *bwd))


@needs_hopper
@pytest.mark.parametrize("name", ["8-segment", "goldenmem"])
def test_the_persistent_forward_matches_xla_on_hopper(name, monkeypatch):
  # 7 CTAs for 64 items: each walks 9 or 10, alternating query buffers, the ring running on across items.
  monkeypatch.setenv(mosaic_gpu.FWD_CTAS_ENV, "7")
  length = 2048
  mask = benchmark_mask(name, length)
  q, k, v = make_qkv(5, 1, length, length, 4, 128, jnp.bfloat16)
  _check(q, k, v, mask)


@needs_hopper
@pytest.mark.parametrize("name, length", [("8-segment", 4096), ("goldenmem", 2048)])
def test_a_three_slot_forward_ring_matches_xla_on_hopper(name, length, monkeypatch):
  # One CTA per item: one query buffer, three key/value slots refilled (rows of 4 to 16 blocks), the lse rows stored
  # from registers.
  monkeypatch.setenv(mosaic_gpu.FWD_STEPS_ENV, "3")
  monkeypatch.delenv(mosaic_gpu.FWD_CTAS_ENV, raising=False)
  monkeypatch.setattr(mosaic_gpu, "PERSISTENT_BY_DEFAULT", False)
  mask = benchmark_mask(name, length)
  q, k, v = make_qkv(7, 1, length, length, 4, 128, jnp.bfloat16)
  _check(q, k, v, mask)


@needs_hopper
@pytest.mark.parametrize(
  "name, length, ctas", [("8-segment", 4096, None), ("goldenmem", 2048, None), ("frame-causal", 2048, "sm")]
)
def test_the_overlapped_forward_matches_xla_on_hopper(name, length, ctas, monkeypatch):
  # Each tile's softmax beside the previous tile's p v: full and partial rows, one CTA per item and persistent.
  monkeypatch.setenv(mosaic_gpu.FWD_OVERLAP_ENV, "1")
  monkeypatch.setattr(mosaic_gpu, "PERSISTENT_BY_DEFAULT", False)
  if ctas is None:
    monkeypatch.delenv(mosaic_gpu.FWD_CTAS_ENV, raising=False)
  else:
    monkeypatch.setenv(mosaic_gpu.FWD_CTAS_ENV, ctas)
  mask = benchmark_mask(name, length)
  q, k, v = make_qkv(11, 1, length, length, 4, 128, jnp.bfloat16)
  _check(q, k, v, mask)


@needs_hopper
def test_dispatcher_picks_mosaic_gpu_on_hopper():
  assert ck.resolve_flavour() == ("mosaic_gpu", False)
