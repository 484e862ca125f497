"""Block-sparse flash attention for Hopper GPUs through Pallas Mosaic GPU: warp-specialised, TMA, WGMMA.

Letters: B batch, H heads, L length, D head dim, R rows of tiles, S list length, N id leaves.

Every kernel walks rows of tiles (the backward: one CTA per (head, row of tiles, sample); the forward: a list of CTAs
that walk such items in turn) with a **producer** warpgroup that walks the row's tile list
(``TileLists``: full tiles first, then partial ones) and issues TMA copies of the listed blocks into a ring of
``steps`` shared-memory slots, refilling a slot once its consumers arrive on its "used" barrier, and **consumer**
warpgroups that walk the same list: WGMMA products from shared memory, the softmax in registers (base 2, with
``scale * log2 e`` folded into one multiply). Blocks that are not listed are never copied; full tiles run without a
mask; partial tiles evaluate the mask's expression on the ids of their rows (loaded once, row layout) and columns
(loaded per tile, column layout), and the true lengths where the sequence is padded.

* **forward** (tiles 128 x 64/128): two consumers own 64 query rows each and take turns on the tensor cores through a
  schedule barrier (FlashAttention-3), so one's softmax overlaps the other's products. Writes the output and the
  log-sum-exp [B, H, L] in natural-log units; a row that sees no key ends with ``l = 0``: output 0, lse ``+inf``.
  A list of CTAs walks the (row, head, sample) items: one CTA per item by default, or persistent (one per SM walking
  a share of the items, its producer loading the next item's queries and first blocks while the consumers finish
  the current one); see ``forward_plan``. Its key/value ring has two slots, or more for tuning (``forward_ring``).
  Opt-in (``forward_overlap``): each consumer also overlaps a tile's softmax with the previous tile's ``p v``.
* **dq** (tiles ``block_q_bwd x block_kv_bwd``): per query block over its key blocks, ``p = exp(s - lse)``,
  ``dp = dO v^T``, ``ds = p (dp - delta)``, ``dq += ds k``.
* **dk/dv** (same tiles, transposed lists): per key block over its query blocks (with dO, lse and delta),
  ``p^T = exp(k q^T - lse)``, ``dv += p^T dO``, ``dp^T = v dO^T``, ``dk += (p^T (dp^T - delta)) q``.

  Each backward side of a tile is 64 or 128. A CTA owns ``rows / 64`` consumers of 64 rows (its own side: queries
  for dq, keys for dk/dv) that share every block the producer brings, and works on a listed block of ``cols`` in
  ``cols / 64`` products of 64 (the WGMMA accumulators of two 128-wide products would not fit in registers). 128 x 128
  (the default) halves the copies per product and lets two consumers overlap: measured faster than 64 x 64 (one
  consumer, one product).

Scope: float16/bfloat16, head dims 64 and 128, masks in ids mode (or none). Anything else (float32 inputs, stored dense
tiles, other tile sizes, visit counting) runs the Triton kernels over the same ``KernelMask``; they handle every case.
``interpret=True`` runs the traced kernel bodies on the CPU through ``mosaic_gpu_interpret`` (JAX's own Mosaic GPU
interpreter lacks ``run_state``, layout casts and transposed WGMMA operands).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
import os
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from cinema_kernels import _compat, triton_gpu
from cinema_kernels.metadata import KernelMask, TileLists, evaluate_program

_LOG2E = math.log2(math.e)
_ROWS = 64  # rows of one consumer warpgroup (the WGMMA M dimension)
_FWD_CONSUMERS = 2
_STEPS = 2  # slots of the TMA ring
# Backward tile sides: a CTA owns 64 or 128 rows (one or two consumers of 64) and walks blocks of 64 or 128 columns
# (one or two 64-wide products per list entry).
_BWD_SIDES = (_ROWS, 2 * _ROWS)


@dataclasses.dataclass(frozen=True)
class _Static:
  rows: int  # rows of one consumer: of the kernel's own side (query rows, or keys for dk/dv)
  cols: int  # columns of one product
  span: int  # tokens per listed block walked: ``span // cols`` products (parts) per list entry
  consumers: int  # consumer warpgroups; a CTA owns ``consumers * rows`` rows
  head_dim: int
  length: int  # S, entries per list
  n_ids: int
  program: object
  scale2: float  # softmax scale times log2(e): scores in base-2 units
  q_len: int
  kv_len: int
  check_q: bool
  check_kv: bool
  dtype: object


def _static(
  km: KernelMask,
  lists: TileLists,
  rows: int,
  cols: int,
  scale: float,
  q: jax.Array,
  *,
  span: int | None = None,
  consumers: int = 1,
) -> _Static:
  return _Static(
    rows=rows,
    cols=cols,
    span=cols if span is None else span,
    consumers=consumers,
    head_dim=int(q.shape[-1]),
    length=int(lists.index.shape[-1]),
    n_ids=0 if km.q_ids is None else int(km.q_ids.shape[1]),
    program=km.program,
    scale2=float(scale) * _LOG2E,
    q_len=km.q_len,
    kv_len=km.kv_len,
    check_q=km.q_pad > km.q_len,
    check_kv=km.kv_pad > km.kv_len,
    dtype=q.dtype,
  )


def supports(q: jax.Array, km: KernelMask) -> bool:
  """Whether these kernels handle the inputs (otherwise the Triton kernels run)."""
  return (
    q.dtype in (jnp.bfloat16, jnp.float16)
    and q.shape[-1] in (64, 128)
    and km.block_sizes.fwd[0] == _FWD_CONSUMERS * _ROWS
    and km.block_sizes.fwd[1] in (64, 128)
    and all(side in _BWD_SIDES for side in km.block_sizes.bwd)
    and km.blocks_fwd is None
  )


# ------------------------------------------------------------------------------------------------------------------
# Shared pieces.


def _layout():
  return _compat.mgpu_layout()


def _row_vec(ref, idx):
  """A vector along the tile's rows (one value per accumulator row), from shared or global memory."""
  return _compat.mgpu_load(ref.at[idx], _layout().reduce(1))


def _col_vec(ref, idx):
  """A vector along the tile's columns."""
  return _compat.mgpu_load(ref.at[idx], _layout().reduce(0))


def _leaf_ids(cfg: _Static, id_refs, side: int, b, start, size: int, vec: Callable) -> list:
  """Every mask leaf's ids of tokens ``start .. start + size`` (``side`` 0: queries, 1: keys) as ``vec`` vectors."""
  return [vec(id_refs[side], (b, n, pl.ds(start, size))) for n in range(cfg.n_ids)]


def _hide(scores, vis):
  """``-inf`` where the tile's element mask hides a pair (``vis`` None: nothing hidden)."""
  return scores if vis is None else jnp.where(vis, scores, -jnp.inf)


def _scores(cfg: _Static, a_smem, b_smem, cols: int):
  """``a b^T`` by WGMMA in float32, in base-2 softmax units (``b`` is stored [cols, D])."""
  plgpu = _compat.plgpu()

  def product(acc_ref):
    plgpu.wgmma(acc_ref, a_smem, b_smem.transpose((1, 0)))
    return acc_ref[...]

  return pl.run_scoped(product, plgpu.ACC((_ROWS, cols), jnp.float32)) * cfg.scale2


def _zeros(shape):
  return _compat.plgpu().layout_cast(
    jnp.full(shape, 0.0, jnp.float32), _layout() if len(shape) == 2 else _layout().reduce(1)
  )


def _online_softmax(cfg: _Static, scores, m, denom, hide: Callable | None, acc=None, cast: bool = True):
  """One step of the forward's online softmax over a tile's raw ``scores`` [64, cols] (``hide``: the element mask,
  None on a full tile): ``(acc rescaled, or without acc the factor alpha to rescale it by, the new running max, the
  new denominator, the probabilities in the input dtype, or in float32 without ``cast``)``."""
  scores = scores * cfg.scale2
  if hide is not None:
    scores = hide(scores)
  m_new = jnp.maximum(m, scores.max(axis=1))
  # A row with nothing visible yet keeps m = -inf; subtract 0 there so that exp2 gives 0, not NaN.
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new) if hide is not None else m_new
  alpha = jnp.exp2(m - m_safe)
  p = jnp.exp2(scores - lax.broadcast_in_dim(m_safe, scores.shape, (0,)))
  if acc is not None:
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, (0,))
  denom = denom * alpha + p.sum(axis=1)
  return (alpha if acc is None else acc), m_new, denom, (p.astype(cfg.dtype) if cast else p)


def _tile_mask(cfg: _Static, q_ids, kv_ids, q_start, kv_start, *, transposed: bool):
  """bool [rows, cols] in the WGMMA layout, or None when nothing is hidden.

  Not transposed: rows are queries (``q_ids`` row vectors) and columns keys; transposed (dk/dv): rows are keys.
  """
  shape = (cfg.rows, cfg.cols)
  q_dim, kv_dim = (1, 0) if transposed else (0, 1)
  vis = None
  if cfg.program is not None and cfg.n_ids:
    qs = [lax.broadcast_in_dim(x, shape, (q_dim,)) for x in q_ids]
    kvs = [lax.broadcast_in_dim(x, shape, (kv_dim,)) for x in kv_ids]
    vis = evaluate_program(cfg.program, qs, kvs)
  if cfg.check_q:
    pos = q_start + _compat.mgpu_iota(shape, q_dim, _layout())
    vis = (pos < cfg.q_len) if vis is None else vis & (pos < cfg.q_len)
  if cfg.check_kv:
    pos = kv_start + _compat.mgpu_iota(shape, kv_dim, _layout())
    vis = (pos < cfg.kv_len) if vis is None else vis & (pos < cfg.kv_len)
  return vis


def _own_base(cfg: _Static, r, wg):
  """First row of consumer ``wg`` in CTA row ``r``."""
  return r * _ROWS if cfg.consumers == 1 else r * (cfg.consumers * _ROWS) + wg * _ROWS


def _own_smem(cfg: _Static):
  """One [64, D] buffer per consumer."""
  shape = (_ROWS, cfg.head_dim) if cfg.consumers == 1 else (cfg.consumers, _ROWS, cfg.head_dim)
  return _smem(shape, cfg.dtype)


def _own(cfg: _Static, ref, wg):
  return ref if cfg.consumers == 1 else ref.at[wg]


def _own_barrier(cfg: _Static, barriers, wg, i: int):
  """Barrier ``i`` of the consumer's own two (its 64 rows of the two operands it keeps)."""
  return barriers.at[i if cfg.consumers == 1 else 2 * wg + i]


def _fetch_own(cfg: _Static, b, hh, r, wg, pairs, ready):
  """A backward consumer's own rows: issues the TMA copies of its 64 rows of each (global ref, shared buffers) pair.

  Returns (first row, the global index of those rows, the consumer's buffers, a function that waits for the copies),
  so that the consumer can load its other row vectors while the copies fly.
  """
  plgpu = _compat.plgpu()
  base = _own_base(cfg, r, wg)
  owns = [_own(cfg, smem, wg) for _, smem in pairs]
  rows = (b, pl.ds(base, _ROWS), hh)
  for i, ((gmem, _), own) in enumerate(zip(pairs, owns, strict=True)):
    plgpu.copy_gmem_to_smem(gmem.at[rows], own, _own_barrier(cfg, ready, wg, i))

  def arrived():
    for i in range(len(pairs)):
      plgpu.barrier_wait(_own_barrier(cfg, ready, wg, i))

  return base, rows, owns, arrived


def _part(cfg: _Static, ring, slot, part: int):
  """Rows ``part * cols ..`` of a ring slot holding one listed block (the whole slot when one product covers it)."""
  return ring.at[slot] if cfg.span == cfg.cols else ring.at[slot, pl.ds(part * cfg.cols, cfg.cols)]


def _part_start(cfg: _Static, block, part: int):
  """First token of ``part`` of listed block ``block``."""
  start = block * cfg.span
  return start + part * cfg.cols if part else start


def _part_scores(cfg: _Static, own, part_ref, start_of, own_ids, id_refs, b, own_base, *, transposed: bool):
  """Scores of a consumer's 64 rows against one part, hidden by the element mask when ``start_of`` is given (a
  partial tile; it returns the part's first token). Rows are queries, or keys when ``transposed`` (dk/dv)."""
  scores = _scores(cfg, own, part_ref, cfg.cols)
  if start_of is None:
    return scores
  start = start_of()
  other_ids = _leaf_ids(cfg, id_refs, 0 if transposed else 1, b, start, cfg.cols, _col_vec)
  if transposed:
    return _hide(scores, _tile_mask(cfg, other_ids, own_ids, start, own_base, transposed=True))
  return _hide(scores, _tile_mask(cfg, own_ids, other_ids, own_base, start, transposed=False))


def _produce(cfg: _Static, entry: Callable, n_total, fetch: Callable, used: Callable):
  """Producer warpgroup: ``fetch(block, slot)`` per list entry; ``used(slot)`` waits until a slot may be refilled."""
  with _region("load"):
    for i in range(min(_STEPS, cfg.length)):
      pl.when(i < n_total)(functools.partial(fetch, entry(i), i))

  @pl.loop(0, jnp.maximum(n_total - _STEPS, 0))
  def _(s):
    with _region("load"):
      slot = lax.rem(s, jnp.int32(_STEPS))
      block = entry(s + _STEPS)  # read before the wait: the global load overlaps it
      used(slot)
      fetch(block, slot)


def _walk(n_full, n_total, step: Callable, carry):
  """Full tiles first (no mask), then partial tiles (masked)."""
  carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
  return lax.fori_loop(n_full, n_total, functools.partial(step, masked=True), carry)


# A named region of a kernel body: free unless ``profiling`` is on, then one profiler range each time it runs. The
# kernels enter at most the counts that ``forward`` and ``backward`` pass to ``_kernel_call``.
_region = jax.named_scope


def _smem(shape, dtype):
  plgpu = _compat.plgpu()
  # 128-byte swizzle over (8, 64)-element tiles: the shared-memory layout WGMMA reads without bank conflicts.
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))


_PROFILE_DIR: contextvars.ContextVar[str | None] = contextvars.ContextVar("cinema_mosaic_gpu_profile", default=None)
# Regions one warpgroup may record per CTA: the profiler keeps its buffer in shared memory (16 bytes a region per
# warpgroup), and the kernels at their largest tiles leave about 34 KiB of the 227 KiB a CTA may have.
PROFILE_MAX_REGIONS = 640


@contextlib.contextmanager
def profiling(directory: str | os.PathLike) -> Iterator[str]:
  """Mosaic GPU kernels traced inside the block record their named regions (per warpgroup, in SM clock cycles).

  The first run of each compiled kernel writes a Chrome trace ``<kernel>-<time>-trace.json`` to ``directory``;
  ``mosaic_gpu_profile.summarise`` reads it. Read at trace time, like ``use_block_sizes``: a function already traced
  outside the block (by jit, grad or export; JAX caches traces by function) keeps its unprofiled kernels, so trace a
  fresh one inside. Regions: forward ``prologue``, ``qk``, ``softmax``, ``pv``,
  ``epilogue`` (consumers), ``load_q``, ``load_kv`` (producer); backward ``prologue``, ``step``, ``epilogue``,
  ``load``.
  """
  path = os.fspath(directory)
  os.makedirs(path, exist_ok=True)
  token = _PROFILE_DIR.set(path)
  try:
    yield path
  finally:
    _PROFILE_DIR.reset(token)


def _profile(regions: int, kernel: str) -> tuple[int, str] | None:
  """(profile space, directory) when profiling is on, for a kernel whose warpgroups enter at most ``regions``."""
  directory = _PROFILE_DIR.get()
  if directory is None:
    return None
  # Mosaic GPU adds an "Init" region to every warpgroup, and a warpgroup's buffer starts with three header words
  # (start time, SM, count) in front of its four words per region: two regions' room more than the kernel's own.
  space = regions + 2
  if space > PROFILE_MAX_REGIONS:
    raise ValueError(
      f"profiling the {kernel} kernel needs {space} regions per warpgroup (list entries x regions per entry, and "
      f"two for Mosaic GPU's own); at most {PROFILE_MAX_REGIONS} fit in shared memory beside the kernel's: profile a "
      "shorter length or a sparser mask"
    )
  return space, directory


def _kernel_call(body, out_type, grid: dict[str, int], consumers: int, interpret: bool, regions: int = 0):
  """``regions``: an upper bound on the named regions one warpgroup of a CTA enters (for ``profiling``)."""
  name = getattr(body, "func", body).__name__.strip("_")
  profile = None if interpret else _profile(regions, name)
  call = _compat.mgpu_kernel(
    body,
    out_type=out_type,
    grid=tuple(grid.values()),
    grid_names=tuple(grid),
    num_threads=consumers + 1,
    thread_name="wg",
    profile=profile,
  )
  if interpret:
    from cinema_kernels import mosaic_gpu_interpret

    # Interpreted, the kernel is held to its declared region count (so that a profile buffer would not overflow).
    return functools.partial(mosaic_gpu_interpret.interpret, call, name=name, regions=regions or None)
  return call


def _row_grid(n_rows: int, bsz: int, heads: int) -> dict[str, int]:
  """One CTA per (head, row of tiles, sample)."""
  return {"heads": heads, "rows": n_rows, "batch": bsz}


# ------------------------------------------------------------------------------------------------------------------
# Forward.

FWD_CTAS_ENV = "CINEMA_MOSAIC_GPU_FWD_CTAS"
_INTERPRET_CTAS = 3  # interpreted: few CTAs, so that each walks several items
_ASSUMED_SMS = 132  # an H100 SXM, when no GPU is there to ask (lowering on the CPU)
# Persistent forward for even rows by default: off, as timed on an H200 against one CTA per item it gained 2 to 3% at
# 8 segments and lost as much on dense (docs/kernels.md). ``CINEMA_MOSAIC_GPU_FWD_CTAS=sm`` turns it on.
PERSISTENT_BY_DEFAULT = False


def _sm_count() -> int:
  device = jax.devices()[0]
  return (getattr(device, "core_count", None) if device.platform == "gpu" else None) or _ASSUMED_SMS


def forward_ctas(items: int, interpret: bool, even_rows: bool = True) -> int:
  """CTAs of the forward, at most one per item.

  ``CINEMA_MOSAIC_GPU_FWD_CTAS``: a count, or ``sm`` (one per SM: persistent). Unset: three when interpreted (so that
  each CTA walks several items); one per SM when ``PERSISTENT_BY_DEFAULT`` and every row lists as many tiles (a
  static round-robin is then balanced); else one per item (the GPU's own CTA scheduler balances uneven rows, e.g.
  causal ones, better than a fixed share would).
  """
  env = os.environ.get(FWD_CTAS_ENV, "").strip()
  if env:
    if env == "sm":
      n = _sm_count()
    elif env.isdigit() and int(env) >= 1:
      n = int(env)
    else:
      raise ValueError(f"{FWD_CTAS_ENV} must be a positive integer or 'sm', got {env!r}")
  elif interpret:
    n = _INTERPRET_CTAS
  elif PERSISTENT_BY_DEFAULT and even_rows:
    n = _sm_count()
  else:
    n = items
  return max(1, min(items, n))


FWD_STEPS_ENV = "CINEMA_MOSAIC_GPU_FWD_STEPS"
_SMEM_BYTES = 227 * 1024  # shared memory one CTA may have on Hopper
# Beside the kernel's buffers, Mosaic GPU's launch check counts 2 KiB of its own scratch and 8 bytes a barrier.
_MOSAIC_SCRATCH_BYTES = 2048
_BARRIER_BYTES = 8


def _lse_through_smem(steps: int) -> bool:
  """Whether the forward's lse rows go out through shared memory (TMA), or from registers beside a deeper ring."""
  return steps == _STEPS


def _fwd_smem_bytes(
  q_buffers: int, steps: int, block_kv: int, head_dim: int, itemsize: int, overlap: bool = False
) -> int:
  """The forward's shared memory as Mosaic GPU's launch check counts it: the buffers, each aligned to 1 KiB as
  Pallas places them (query/output buffers, the key and value ring, and with two slots the lse rows; beside a deeper
  ring they go out from registers), the barriers and Mosaic GPU's own scratch."""
  align = lambda n: -(-n // 1024) * 1024  # noqa: E731
  queries = align(q_buffers * _FWD_CONSUMERS * _ROWS * head_dim * itemsize)
  lse = align(_FWD_CONSUMERS * _ROWS * 4) if _lse_through_smem(steps) else 0
  # ready and used for keys and values, a query-ready per buffer and consumer, a query-free per buffer, the turn (one
  # per consumer with the overlapped softmax)
  barriers = 4 * steps + q_buffers * (_FWD_CONSUMERS + 1) + (_FWD_CONSUMERS if overlap else 1)
  ring = 2 * align(steps * block_kv * head_dim * itemsize)
  return queries + ring + lse + barriers * _BARRIER_BYTES + _MOSAIC_SCRATCH_BYTES


def forward_ring(q_buffers: int, block_kv: int, head_dim: int, itemsize: int, overlap: bool = False) -> int:
  """Slots of the forward's key/value ring: two, or ``CINEMA_MOSAIC_GPU_FWD_STEPS`` (for tuning) where they fit.

  A deeper ring lets the producer run further ahead (a short row's first blocks all in flight at once; more slack
  for a late copy). Three slots of 128 x 128 at D = 128 fit beside one query buffer (one CTA per item, the default)
  once the lse rows leave shared memory, not beside the persistent forward's two query buffers, nor beside the
  in-kernel profiler's buffer (``profiling`` keeps two slots). Not timed on a GPU yet, hence not the default.
  """
  env = os.environ.get(FWD_STEPS_ENV, "").strip()
  if not env:
    return _STEPS
  if not (env.isdigit() and int(env) >= 2):
    raise ValueError(f"{FWD_STEPS_ENV} must be an integer >= 2, got {env!r}")
  steps = int(env)
  if steps > _STEPS and _PROFILE_DIR.get() is not None:
    raise ValueError(
      f"{FWD_STEPS_ENV}={steps} while profiling: the profiler keeps its buffer in the shared memory a deeper ring "
      f"takes; profile with the default {_STEPS} slots"
    )
  need = _fwd_smem_bytes(q_buffers, steps, block_kv, head_dim, itemsize, overlap)
  if need > _SMEM_BYTES:
    raise ValueError(
      f"{FWD_STEPS_ENV}={steps}: the forward would need {need} bytes of shared memory ({q_buffers} query "
      f"buffer(s), {steps} key/value slots of {block_kv} x {head_dim}), more than the {_SMEM_BYTES} a CTA may have "
      "(one CTA per item keeps one query buffer; the persistent forward keeps two)"
    )
  return steps


FWD_OVERLAP_ENV = "CINEMA_MOSAIC_GPU_FWD_OVERLAP"


def forward_overlap() -> bool:
  """Whether the forward's consumers overlap each tile's softmax with the previous tile's ``p v`` (FlashAttention-3's
  intra-warpgroup pipelining, on top of the two consumers' turns): ``CINEMA_MOSAIC_GPU_FWD_OVERLAP=1``. Off by
  default until timed on a GPU: it holds a tile's scores, the previous tile's probabilities and the output
  accumulator in registers at once."""
  env = os.environ.get(FWD_OVERLAP_ENV, "").strip()
  if env not in ("", "0", "1"):
    raise ValueError(f"{FWD_OVERLAP_ENV} must be 0 or 1, got {env!r}")
  return env == "1"


@dataclasses.dataclass(frozen=True)
class ForwardPlan:
  """How the forward runs: ``ctas`` walking ``items`` (row of tiles, head, sample), ``q_buffers`` query buffers
  (two only where a CTA walks on to another item), a key/value ring of ``steps`` slots, and whether each consumer
  overlaps a tile's softmax with the previous tile's ``p v`` (``forward_overlap``)."""

  items: int
  ctas: int
  q_buffers: int
  steps: int
  overlap: bool = False

  @property
  def persistent(self) -> bool:
    return self.ctas < self.items


def forward_plan(q: jax.Array, km: KernelMask, interpret: bool) -> ForwardPlan:
  """The plan for padded ``q`` [B, Lq_pad, H, D] under ``km`` (inputs these kernels support)."""
  bsz, lq, h, d = q.shape
  bq, bkv = km.block_sizes.fwd
  items = bsz * h * (lq // bq)
  ctas = forward_ctas(items, interpret, km.even_rows)
  q_buffers = 1 if ctas == items else 2
  overlap = forward_overlap()
  steps = forward_ring(q_buffers, bkv, d, jnp.dtype(q.dtype).itemsize, overlap)
  return ForwardPlan(items, ctas, q_buffers, steps, overlap)


def _fwd_kernel(
  index_ref,
  counts_ref,
  q_ref,
  k_ref,
  v_ref,
  *refs,
  cfg: _Static,
  plan: ForwardPlan,
  heads: int,
  rows: int,
):
  """Persistent: CTA ``c`` walks the items (row of tiles, head, sample) ``c, c + ctas, ...``, rows fastest.

  The producer runs ahead across items: it loads the next item's query rows into the other of two query buffers
  (``plan.q_buffers``; one when each CTA has one item) and its first key/value blocks into the ring of ``plan.steps``
  slots
  while the consumers finish the current item and store its output, so a short row (8 segments: 16 blocks) does not
  pay its start-up and its epilogue in sequence.
  """
  plgpu = _compat.plgpu()
  id_refs, (o_ref, lse_ref) = refs[: len(refs) - 2], refs[len(refs) - 2 :]
  bkv, d = cfg.cols, cfg.head_dim
  ctas, steps, q_buffers = plan.ctas, plan.steps, plan.q_buffers
  cta = lax.axis_index("ctas")
  n_items = lax.div(jnp.int32(rows * heads * counts_ref.shape[0]) - cta + (ctas - 1), jnp.int32(ctas))

  def item(i):
    """(sample, head, row, listed blocks (full, all), list entry) of this CTA's ``i``-th item."""
    w = cta + i * ctas
    r, t = lax.rem(w, jnp.int32(rows)), lax.div(w, jnp.int32(rows))
    hh, b = lax.rem(t, jnp.int32(heads)), lax.div(t, jnp.int32(heads))
    return b, hh, r, counts_ref[b, r, 0], counts_ref[b, r, 1], lambda s: index_ref[b, r, s]

  def hide_of(b, q_ids, q_base, entry, s):
    """The element mask of the tile at list entry ``s`` of an item's row, for ``_online_softmax``."""

    def hide(scores):
      kv_start = entry(s) * bkv
      kv_ids = _leaf_ids(cfg, id_refs, 1, b, kv_start, bkv, _col_vec)
      return _hide(scores, _tile_mask(cfg, q_ids, kv_ids, q_base, kv_start, transposed=False))

    return hide

  def scoped(smem, ready, used, q_free, turn):
    qo_smem, k_smem, v_smem, *lse_smem = smem  # qo: [q_buffers, consumers, 64, D]; lse: [consumers, 64] or none
    k_ready, v_ready, q_ready = ready  # q_ready[buffer * consumers + consumer]
    k_used, v_used = used
    wg = lax.axis_index("wg")

    def take_turn():
      plgpu.barrier_arrive(turn)
      plgpu.barrier_wait(turn)

    def walk(carry, b, q_ids, q_base, qo_own, slot_of, n_full, n_total, entry):
      """The consumers take turns on the tensor cores: one's softmax runs while the other's products do."""

      def step(s, carry, masked: bool):
        acc, m, denom = carry
        slot = slot_of(s)

        def qk(acc_ref):
          plgpu.wgmma(acc_ref, qo_own, k_smem.at[slot].transpose((1, 0)))
          take_turn()
          return acc_ref[...]

        with _region("qk"):
          scores = pl.run_scoped(qk, plgpu.ACC((_ROWS, bkv), jnp.float32))
          plgpu.barrier_arrive(k_used.at[slot])
        with _region("softmax"):
          hide = hide_of(b, q_ids, q_base, entry, s) if masked else None
          acc, m_new, denom, p16 = _online_softmax(cfg, scores, m, denom, hide, acc)
          acc, denom, m_new, p16 = lax.optimization_barrier((acc, denom, m_new, p16))
          plgpu.barrier_arrive(turn)  # softmax done

        def pv(acc_ref):
          plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
          nxt = s + 1

          @pl.when(nxt < n_total)
          def _():
            plgpu.barrier_wait(k_ready.at[slot_of(nxt)])

        with _region("pv"):
          plgpu.barrier_wait(v_ready.at[slot])
          plgpu.barrier_wait(turn)  # tensor cores free
          acc = pl.run_state(pv)(plgpu.ACC.init(acc))
          plgpu.barrier_arrive(v_used.at[slot])
        return acc, m_new, denom

      return _walk(n_full, n_total, step, carry)

    def walk_overlapped(carry, b, q_ids, q_base, qo_own, slot_of, n_full, n_total, entry):
      """FlashAttention-3's intra-warpgroup pipelining on top of the turns: a consumer issues tile s's ``q k^T``
      and tile s-1's ``p v`` together, then works out tile s's softmax while that ``p v`` runs, and rescales the
      output once it is done. Turns alternate strictly through one barrier per consumer (``turn[wg]``: its turn to
      issue), given after each issue; the first tile issues its product alone, the last ``p v`` comes after the
      walk. The first tile's softmax always applies the element mask: a full tile's hides nothing."""
      acc_type = plgpu.ACC((_ROWS, bkv), jnp.float32)

      def my_turn():
        plgpu.barrier_wait(turn.at[wg])

      def your_turn():
        plgpu.barrier_arrive(turn.at[1 - wg])

      def first(_, carry):
        acc, m, denom, p16 = carry
        slot = slot_of(0)

        def qk(s_ref):
          plgpu.wgmma(s_ref, qo_own, k_smem.at[slot].transpose((1, 0)))
          your_turn()
          return s_ref[...]

        with _region("qk"):
          plgpu.barrier_wait(k_ready.at[slot])
          my_turn()
          scores = pl.run_scoped(qk, acc_type)
          plgpu.barrier_arrive(k_used.at[slot])
        with _region("softmax"):
          _, m, denom, p16 = _online_softmax(cfg, scores, m, denom, hide_of(b, q_ids, q_base, entry, 0))
        return acc, m, denom, p16  # acc is still zero: nothing to rescale

      def middle(s, carry, masked: bool):
        acc, m, denom, p16 = carry
        slot, prev = slot_of(s), slot_of(s - 1)

        def issue(refs):
          o_ref, m_ref, denom_ref, p_ref, alpha_ref = refs

          def products(s_ref):
            plgpu.wgmma(s_ref, qo_own, k_smem.at[slot].transpose((1, 0)))
            plgpu.wgmma(o_ref, p16, v_smem.at[prev])
            your_turn()
            return plgpu.wgmma_accumulator_load(s_ref, wait_n=1)  # q k^T done; p v may still run

          with _region("qk"):
            plgpu.barrier_wait(k_ready.at[slot])
            plgpu.barrier_wait(v_ready.at[prev])
            my_turn()
            scores = pl.run_scoped(products, acc_type)
            plgpu.barrier_arrive(k_used.at[slot])
          with _region("softmax"):
            hide = hide_of(b, q_ids, q_base, entry, s) if masked else None
            # The probabilities stay float32 here: converted inside the stage, the new ones could take the registers
            # of the old ones that the p v in flight still reads (ptxas then serialises every WGMMA).
            alpha, m_ref[...], denom_ref[...], p_ref[...] = _online_softmax(
              cfg, scores, m_ref[...], denom_ref[...], hide, cast=False
            )
            alpha_ref[...] = alpha

        state = (plgpu.ACC.init(acc), m, denom, _zeros((_ROWS, bkv)), _zeros((_ROWS,)))
        acc, m, denom, p, alpha = pl.run_state(issue)(state)
        with _region("pv"):  # the region's end waited for p v: its operand's registers are free again
          plgpu.barrier_arrive(v_used.at[prev])
          acc = acc * lax.broadcast_in_dim(alpha, acc.shape, (0,))
          p16 = p.astype(cfg.dtype)
        return acc, m, denom, p16

      def last(_, carry):
        acc, m, denom, p16 = carry
        slot = slot_of(n_total - 1)

        def pv(o_ref):
          plgpu.wgmma(o_ref, p16, v_smem.at[slot])
          your_turn()

        with _region("pv"):
          plgpu.barrier_wait(v_ready.at[slot])
          my_turn()
          acc = pl.run_state(pv)(plgpu.ACC.init(acc))
          plgpu.barrier_arrive(v_used.at[slot])
        return acc, m, denom, p16

      carry = (*carry, _zeros((_ROWS, bkv)).astype(cfg.dtype))
      any_tile = jnp.minimum(n_total, 1)
      split = jnp.maximum(n_full, 1)  # tiles 1 .. n_full - 1 are full, the rest partial
      carry = lax.fori_loop(0, any_tile, first, carry)
      carry = lax.fori_loop(1, split, functools.partial(middle, masked=False), carry)
      carry = lax.fori_loop(split, n_total, functools.partial(middle, masked=True), carry)
      acc, m, denom, _ = lax.fori_loop(0, any_tile, last, carry)
      return acc, m, denom

    @pl.when(wg < _FWD_CONSUMERS)
    def _consumer():
      plgpu.set_max_registers(232, action="increase")
      if plan.overlap:  # the first turn to issue is consumer 0's
        pl.when(wg == 1)(lambda: plgpu.barrier_arrive(turn.at[0]))

      def one_item(i, done):
        with _region("prologue"):
          b, hh, r, n_full, n_total, entry = item(i)
          buf = lax.rem(i, jnp.int32(q_buffers))
          qo_own = qo_smem.at[buf, wg]
          q_base = r * (_FWD_CONSUMERS * _ROWS) + wg * _ROWS
          q_ids = _leaf_ids(cfg, id_refs, 0, b, q_base, _ROWS, _row_vec)
          slot_of = lambda s: lax.rem(done + s, jnp.int32(steps))  # noqa: E731 - the ring runs on across items
          plgpu.barrier_wait(q_ready.at[buf * _FWD_CONSUMERS + wg])
          m = plgpu.layout_cast(jnp.full((_ROWS,), -jnp.inf, jnp.float32), _layout().reduce(1))
          carry = (_zeros((_ROWS, d)), m, _zeros((_ROWS,)))

          if not plan.overlap:

            @pl.when(n_total > 0)
            def _():
              plgpu.barrier_wait(k_ready.at[slot_of(0)])

            pl.when(wg == 1)(take_turn)

        walker = walk_overlapped if plan.overlap else walk
        acc, m, denom = walker(carry, b, q_ids, q_base, qo_own, slot_of, n_full, n_total, entry)
        with _region("epilogue"):
          if not plan.overlap:
            pl.when(wg == 0)(take_turn)
          seen = denom > 0.0
          safe = jnp.where(seen, denom, 1.0)
          acc = acc * lax.broadcast_in_dim(jnp.where(seen, 1.0 / safe, 0.0), acc.shape, (0,))
          qo_own[...] = acc.astype(cfg.dtype)
          lse = jnp.where(seen, (m + jnp.log2(safe)) / _LOG2E, jnp.inf)
          lse_rows = lse_ref.at[b, hh, pl.ds(q_base, _ROWS)]
          if lse_smem:
            lse_smem[0].at[wg][...] = lse
          else:  # no room in shared memory beside a deeper ring: from registers (64 floats)
            lse_rows[...] = lse
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(qo_own, o_ref.at[b, pl.ds(q_base, _ROWS), hh])
          if lse_smem:
            plgpu.copy_smem_to_gmem(lse_smem[0].at[wg], lse_rows)
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          plgpu.barrier_arrive(q_free.at[buf])  # the producer may load a later item's queries here
        return done + n_total

      lax.fori_loop(0, n_items, one_item, jnp.int32(0))

    @pl.when(wg == _FWD_CONSUMERS)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")

      def one_item(i, done):
        with _region("load_q"):
          b, hh, r, _, n_total, entry = item(i)
          buf = lax.rem(i, jnp.int32(q_buffers))

          @pl.when(i >= q_buffers)
          def _():
            plgpu.barrier_wait(q_free.at[buf])

          for c in range(_FWD_CONSUMERS):
            q_rows = (b, pl.ds(r * (_FWD_CONSUMERS * _ROWS) + c * _ROWS, _ROWS), hh)
            plgpu.copy_gmem_to_smem(q_ref.at[q_rows], qo_smem.at[buf, c], q_ready.at[buf * _FWD_CONSUMERS + c])

        @pl.loop(0, n_total)
        def _(s):
          with _region("load_kv"):
            fetched = done + s
            slot = lax.rem(fetched, jnp.int32(steps))
            # The list entry is read before the waits, so that its load from global memory overlaps them. Keys and
            # values are released separately (keys after the consumers' q k^T, values after their p v): the next
            # keys start loading half a step before the values' slot frees up.
            kv_rows = (b, pl.ds(entry(s) * bkv, bkv), hh)
            refill = fetched >= steps
            pl.when(refill)(lambda: plgpu.barrier_wait(k_used.at[slot]))
            plgpu.copy_gmem_to_smem(k_ref.at[kv_rows], k_smem.at[slot], k_ready.at[slot])
            pl.when(refill)(lambda: plgpu.barrier_wait(v_used.at[slot]))
            plgpu.copy_gmem_to_smem(v_ref.at[kv_rows], v_smem.at[slot], v_ready.at[slot])

        return done + n_total

      lax.fori_loop(0, n_items, one_item, jnp.int32(0))

  pl.run_scoped(
    scoped,
    (
      _smem((q_buffers, _FWD_CONSUMERS, _ROWS, d), cfg.dtype),
      _smem((steps, bkv, d), cfg.dtype),
      _smem((steps, bkv, d), cfg.dtype),
      *([plgpu.SMEM((_FWD_CONSUMERS, _ROWS), jnp.float32)] if _lse_through_smem(steps) else []),
    ),
    (
      plgpu.Barrier(num_barriers=steps),
      plgpu.Barrier(num_barriers=steps),
      plgpu.Barrier(num_barriers=q_buffers * _FWD_CONSUMERS),
    ),
    (plgpu.Barrier(num_arrivals=_FWD_CONSUMERS, num_barriers=steps),) * 2,
    plgpu.Barrier(num_arrivals=_FWD_CONSUMERS, num_barriers=q_buffers),
    plgpu.Barrier(num_barriers=_FWD_CONSUMERS) if plan.overlap else plgpu.Barrier(num_arrivals=_FWD_CONSUMERS),
    collective_axes="wg",
  )


def _ids(km: KernelMask) -> list[jax.Array]:
  return [] if km.q_ids is None else [km.q_ids.astype(jnp.int32), km.kv_ids.astype(jnp.int32)]


def _lists(lists: TileLists) -> list[jax.Array]:
  return [lists.index.astype(jnp.int32), lists.counts.astype(jnp.int32)]


def forward(
  q: jax.Array, k: jax.Array, v: jax.Array, km: KernelMask, scale: float, *, interpret: bool, count_visits: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """q [B, Lq_pad, H, D], k/v [B, Lkv_pad, H, D] -> (out like q, lse [B, H, Lq_pad], None).

  Inputs outside these kernels' scope (see the module docstring) and visit counting run the Triton forward.
  """
  if count_visits or not supports(q, km):
    return triton_gpu.forward(q, k, v, km, scale, interpret=interpret, count_visits=count_visits)
  bsz, lq, h, _ = q.shape
  bq, bkv = km.block_sizes.fwd
  cfg = _static(km, km.fwd, _ROWS, bkv, scale, q)
  out_type = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((bsz, h, lq), jnp.float32))
  plan = forward_plan(q, km, interpret)
  body = functools.partial(_fwd_kernel, cfg=cfg, plan=plan, heads=h, rows=lq // bq)
  # Per item: prologue and epilogue, three regions per listed block (consumers; the producer enters fewer).
  regions = -(-plan.items // plan.ctas) * (2 + 3 * km.fwd.index.shape[-1])
  out, lse = _kernel_call(body, out_type, {"ctas": plan.ctas}, _FWD_CONSUMERS, interpret, regions)(
    *_lists(km.fwd), q, k, v, *_ids(km)
  )
  return out, lse, None


# ------------------------------------------------------------------------------------------------------------------
# Backward.


def _dq_kernel(index_ref, counts_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: _Static):
  """``consumers`` x 64 query rows, 64 per consumer: dq over the key blocks of their common list."""
  plgpu = _compat.plgpu()
  id_refs, dq_ref = refs[:-1], refs[-1]
  b, hh, r = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("rows")
  n_full, n_total = counts_ref[b, r, 0], counts_ref[b, r, 1]
  entry = lambda s: index_ref[b, r, s]  # noqa: E731
  c, d = cfg.consumers, cfg.head_dim

  def scoped(q_smem, do_smem, k_smem, v_smem, own_ready, k_ready, v_ready, used):
    wg = lax.axis_index("wg")

    @pl.when(wg < c)
    def _consumer():
      plgpu.set_max_registers(232, action="increase")
      with _region("prologue"):
        q_base, rows, (q_own, do_own), arrived = _fetch_own(
          cfg, b, hh, r, wg, ((q_ref, q_smem), (do_ref, do_smem)), own_ready
        )
        lse2 = _row_vec(lse_ref, (b, hh, pl.ds(q_base, _ROWS)))  # lse in base-2 units
        delta = _row_vec(delta_ref, (b, hh, pl.ds(q_base, _ROWS)))
        q_ids = _leaf_ids(cfg, id_refs, 0, b, q_base, _ROWS, _row_vec)
        arrived()

      @_region("step")
      def step(s, dq, masked: bool):
        slot = lax.rem(s, jnp.int32(_STEPS))
        plgpu.barrier_wait(k_ready.at[slot])
        for part in range(cfg.span // cfg.cols):
          k_part, v_part = _part(cfg, k_smem, slot, part), _part(cfg, v_smem, slot, part)
          start_of = (lambda part=part: _part_start(cfg, entry(s), part)) if masked else None
          scores = _part_scores(cfg, q_own, k_part, start_of, q_ids, id_refs, b, q_base, transposed=False)
          p = jnp.exp2(scores - lax.broadcast_in_dim(lse2, scores.shape, (0,)))
          if part == 0:
            plgpu.barrier_wait(v_ready.at[slot])

          def dov(acc_ref, v_part=v_part):
            plgpu.wgmma(acc_ref, do_own, v_part.transpose((1, 0)))
            return acc_ref[...]

          dp = pl.run_scoped(dov, plgpu.ACC((_ROWS, cfg.cols), jnp.float32))
          ds = p * (dp - lax.broadcast_in_dim(delta, dp.shape, (0,)))

          def dsk(acc_ref, ds=ds, k_part=k_part):
            plgpu.wgmma(acc_ref, ds.astype(cfg.dtype), k_part)

          dq = pl.run_state(dsk)(plgpu.ACC.init(dq))
        plgpu.barrier_arrive(used.at[slot])
        return dq

      dq = _walk(n_full, n_total, step, _zeros((_ROWS, d)))
      with _region("epilogue"):
        q_own[...] = (dq * (cfg.scale2 / _LOG2E)).astype(cfg.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_own, dq_ref.at[rows])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    @pl.when(wg == c)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")

      def fetch(kb, slot):
        cols = (b, pl.ds(kb * cfg.span, cfg.span), hh)
        plgpu.copy_gmem_to_smem(k_ref.at[cols], k_smem.at[slot], k_ready.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[cols], v_smem.at[slot], v_ready.at[slot])

      _produce(cfg, entry, n_total, fetch, lambda slot: plgpu.barrier_wait(used.at[slot]))

  pl.run_scoped(
    scoped,
    _own_smem(cfg),
    _own_smem(cfg),
    _smem((_STEPS, cfg.span, d), cfg.dtype),
    _smem((_STEPS, cfg.span, d), cfg.dtype),
    plgpu.Barrier(num_barriers=2 * c),
    plgpu.Barrier(num_barriers=_STEPS),
    plgpu.Barrier(num_barriers=_STEPS),
    plgpu.Barrier(num_arrivals=c, num_barriers=_STEPS),
    collective_axes="wg",
  )


def _dkv_kernel(index_ref, counts_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: _Static):
  """``consumers`` x 64 keys, 64 per consumer: dk and dv over the query blocks of their common (transposed) list.

  Rows are keys here.
  """
  plgpu = _compat.plgpu()
  id_refs, (dk_ref, dv_ref) = refs[: len(refs) - 2], refs[len(refs) - 2 :]
  b, hh, r = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("rows")
  n_full, n_total = counts_ref[b, r, 0], counts_ref[b, r, 1]
  entry = lambda s: index_ref[b, r, s]  # noqa: E731
  c, d = cfg.consumers, cfg.head_dim

  def scoped(
    k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, own_ready, q_ready, do_ready, lse_ready, delta_ready, used
  ):
    wg = lax.axis_index("wg")

    @pl.when(wg < c)
    def _consumer():
      plgpu.set_max_registers(232, action="increase")
      with _region("prologue"):
        kv_base, rows, (k_own, v_own), arrived = _fetch_own(
          cfg, b, hh, r, wg, ((k_ref, k_smem), (v_ref, v_smem)), own_ready
        )
        kv_ids = _leaf_ids(cfg, id_refs, 1, b, kv_base, _ROWS, _row_vec)
        arrived()

      @_region("step")
      def step(s, carry, masked: bool):
        dk, dv = carry
        slot = lax.rem(s, jnp.int32(_STEPS))
        plgpu.barrier_wait(q_ready.at[slot])
        for part in range(cfg.span // cfg.cols):
          q_part, do_part = _part(cfg, q_smem, slot, part), _part(cfg, do_smem, slot, part)
          start_of = (lambda part=part: _part_start(cfg, entry(s), part)) if masked else None
          scores_t = _part_scores(cfg, k_own, q_part, start_of, kv_ids, id_refs, b, kv_base, transposed=True)
          if part == 0:
            plgpu.barrier_wait(lse_ready.at[slot])
            plgpu.barrier_wait(delta_ready.at[slot])
          lse2 = _col_vec(_part(cfg, lse_smem, slot, part), ())
          delta = _col_vec(_part(cfg, delta_smem, slot, part), ())
          p_t = jnp.exp2(scores_t - lax.broadcast_in_dim(lse2, scores_t.shape, (1,)))
          if part == 0:
            plgpu.barrier_wait(do_ready.at[slot])

          def pdo_vdo(refs, p_t=p_t, do_part=do_part):
            # Both products in one region: one wait for the pair.
            dv_ref, dp_ref = refs
            plgpu.wgmma(dv_ref, p_t.astype(cfg.dtype), do_part)
            plgpu.wgmma(dp_ref, v_own, do_part.transpose((1, 0)))

          dv, dp_t = pl.run_state(pdo_vdo)((plgpu.ACC.init(dv), plgpu.ACC.init(_zeros((_ROWS, cfg.cols)))))
          ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, dp_t.shape, (1,)))

          def dsq(acc_ref, ds_t=ds_t, q_part=q_part):
            plgpu.wgmma(acc_ref, ds_t.astype(cfg.dtype), q_part)

          dk = pl.run_state(dsq)(plgpu.ACC.init(dk))
        plgpu.barrier_arrive(used.at[slot])
        return dk, dv

      dk, dv = _walk(n_full, n_total, step, (_zeros((_ROWS, d)), _zeros((_ROWS, d))))
      with _region("epilogue"):
        k_own[...] = (dk * (cfg.scale2 / _LOG2E)).astype(cfg.dtype)
        v_own[...] = dv.astype(cfg.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_own, dk_ref.at[rows])
        plgpu.copy_smem_to_gmem(v_own, dv_ref.at[rows])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    @pl.when(wg == c)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")

      def fetch(qb, slot):
        span = pl.ds(qb * cfg.span, cfg.span)
        plgpu.copy_gmem_to_smem(q_ref.at[b, span, hh], q_smem.at[slot], q_ready.at[slot])
        plgpu.copy_gmem_to_smem(do_ref.at[b, span, hh], do_smem.at[slot], do_ready.at[slot])
        plgpu.copy_gmem_to_smem(lse_ref.at[b, hh, span], lse_smem.at[slot], lse_ready.at[slot])
        plgpu.copy_gmem_to_smem(delta_ref.at[b, hh, span], delta_smem.at[slot], delta_ready.at[slot])

      _produce(cfg, entry, n_total, fetch, lambda slot: plgpu.barrier_wait(used.at[slot]))

  pl.run_scoped(
    scoped,
    _own_smem(cfg),
    _own_smem(cfg),
    _smem((_STEPS, cfg.span, d), cfg.dtype),
    _smem((_STEPS, cfg.span, d), cfg.dtype),
    plgpu.SMEM((_STEPS, cfg.span), jnp.float32),
    plgpu.SMEM((_STEPS, cfg.span), jnp.float32),
    plgpu.Barrier(num_barriers=2 * c),
    *(plgpu.Barrier(num_barriers=_STEPS) for _ in range(4)),
    plgpu.Barrier(num_arrivals=c, num_barriers=_STEPS),
    collective_axes="wg",
  )


def backward(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  out: jax.Array,
  lse: jax.Array,
  do: jax.Array,
  km: KernelMask,
  scale: float,
  *,
  interpret: bool,
  count_visits: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, tuple[jax.Array, jax.Array] | None]:
  """Gradients (dq, dk, dv) like q, k, v from the forward's out and lse [B, H, Lq_pad]."""
  if count_visits or not supports(q, km):
    return triton_gpu.backward(q, k, v, out, lse, do, km, scale, interpret=interpret, count_visits=count_visits)
  bsz, lq, h, _ = q.shape
  lkv = k.shape[1]
  bq, bkv = km.block_sizes.bwd
  delta = jnp.einsum("blhd,blhd->bhl", out.astype(jnp.float32), do.astype(jnp.float32))  # [b, h, lq]
  lse2 = lse * _LOG2E  # +inf stays +inf: rows that saw nothing pass no gradient
  operands = (q, k, v, do, lse2, delta)
  cfg = _static(km, km.dq, _ROWS, _ROWS, scale, q, span=bkv, consumers=bq // _ROWS)
  dq = _kernel_call(
    functools.partial(_dq_kernel, cfg=cfg),
    jax.ShapeDtypeStruct(q.shape, q.dtype),
    _row_grid(lq // bq, bsz, h),
    cfg.consumers,
    interpret,
    2 + km.dq.index.shape[-1],  # prologue, epilogue, a step per listed block
  )(*_lists(km.dq), *operands, *_ids(km))
  cfg_t = _static(km, km.dkv, _ROWS, _ROWS, scale, q, span=bq, consumers=bkv // _ROWS)
  kv_type = (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype))
  dk, dv = _kernel_call(
    functools.partial(_dkv_kernel, cfg=cfg_t),
    kv_type,
    _row_grid(lkv // bkv, bsz, h),
    cfg_t.consumers,
    interpret,
    2 + km.dkv.index.shape[-1],
  )(*_lists(km.dkv), *operands, *_ids(km))
  return dq, dk, dv, None
