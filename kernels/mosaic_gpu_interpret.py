"""Interpret mode of the Mosaic GPU kernels: their traced bodies run on the CPU, one Python thread per warpgroup.

JAX's own Mosaic GPU interpreter cannot run these kernels (it lacks ``run_state`` accumulators, layout casts and
transposed WGMMA operands), so this small one does, for the tests and for debugging on a machine without a Hopper
GPU. It evaluates the kernel's jaxpr eagerly:

* every CTA of the grid in turn; inside a CTA one thread per warpgroup, all sharing the ``run_scoped`` allocations
  made collectively over the warpgroup axis (shared memory), each with its own accumulators (zeros);
* shared-memory buffers hold the logical layout (swizzle and tiling transforms are layout only) and start as NaN
  (integers: their minimum), as garbage would on the GPU; index, slice and transpose transforms are numpy views, so
  writes through them land in the buffer;
* a TMA load poisons its destination (NaN) when issued and arrives on its barrier; its data lands when a thread's
  wait observes that phase, so a read that skips the wait sees NaN. A TMA store reads shared memory only when its
  thread waits for it (``wait_smem_to_gmem``, or at the end), and a thread that releases a barrier with stores still
  pending yields first, so overwriting the source too early shows; storing,
  or feeding a WGMMA, from shared memory written since the thread's last ``commit_smem`` raises;
* a ``wgmma`` is in flight from its issue until a wait retires it (``wgmma_wait(n)`` and an accumulator read with
  ``wait_n`` retire all but the n newest, in order; the end of ``run_state`` all): only then does it read its
  operands and add their product (float32) into its accumulator. Reading an accumulator that a WGMMA in flight
  writes, a TMA load or a store into shared memory that one reads, raise; a thread that arrives on a barrier with
  WGMMAs in flight yields first, so that a buffer released before its WGMMA was waited for gets refilled and shows;
* barriers count phases. The n-th wait of a thread on a barrier returns once its n-th phase has completed. A barrier
  two phases ahead of a waiter (an ambiguous parity on the GPU: a hang or a missed phase), a warpgroup arriving twice
  in one phase of a barrier that expects several, and a CTA whose warpgroups all wait (a deadlock) raise
  ``KernelProtocolError`` naming the barrier.

What it cannot see: timing, register pressure, and orderings the barriers leave open beyond the ones above.

Only what the kernels in ``mosaic_gpu.py`` use is covered; anything else raises ``NotImplementedError`` naming the
primitive. It is slow (a few milliseconds per warpgroup step): test sizes only.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.extend import core as jex_core

from cinema_kernels import _compat

_internals = _compat.mgpu_internals

_RELEASE_PAUSE = 0.01  # seconds a thread yields after releasing a barrier with TMA stores pending
_WGMMA_PAUSE = 0.002  # seconds a thread yields after arriving on a barrier with WGMMAs in flight
_STALL_SECONDS = 60.0  # no barrier moved and no warpgroup finished for this long: reported as a hang


def _poison(view: np.ndarray) -> None:
  view[...] = np.iinfo(view.dtype).min if view.dtype.kind in "iu" else np.nan  # floats, bfloat16 included


def _root(view: Any) -> Any:
  while isinstance(view, np.ndarray) and view.base is not None:
    view = view.base
  return view


class KernelProtocolError(RuntimeError):
  """The kernel's barriers are used in a way that hangs or races on the GPU."""


# ------------------------------------------------------------------------------------------------------------------
# Barriers.


class _Barriers:
  """``n`` barriers of one allocation, each counting completed phases."""

  def __init__(self, cta: _Cta, n: int, arrivals: int, name: str):
    self.cta, self.arrivals, self.name = cta, arrivals, name
    self.pending = [0] * n  # arrivals in the current phase
    self.arrived: list[set[int]] = [set() for _ in range(n)]  # warpgroups that arrived in the current phase
    self.completed = [0] * n  # phases completed
    self.loads: list[dict[int, list]] = [{} for _ in range(n)]  # phase -> TMA loads (dst, data) landing with it

  def arrive(self, i: int, wg: int | None = None, load: tuple | None = None) -> None:
    """One arrival, by warpgroup ``wg`` (None: a TMA load's, which brings ``load`` with it)."""
    with self.cta.cond:
      if wg is not None and self.arrivals > 1:
        if wg in self.arrived[i]:
          raise KernelProtocolError(
            f"{self.name}[{i}]: warpgroup {wg} arrives twice in phase {self.completed[i] + 1}, which expects "
            f"{self.arrivals} arrivals (the other warpgroups' would then complete a later phase)"
          )
        self.arrived[i].add(wg)
      if load is not None:
        self.loads[i].setdefault(self.completed[i] + 1, []).append(load)
      self.pending[i] += 1
      if self.pending[i] == self.arrivals:
        self.pending[i] = 0
        self.arrived[i].clear()
        self.completed[i] += 1
        self.cta.progress()

  def wait(self, i: int, thread: _Thread) -> None:
    key = (id(self), i)
    want = thread.waits.get(key, 0) + 1
    where = f"{self.name}[{i}] (warpgroup {thread.wg}, phase {want})"
    with self.cta.cond:
      self.cta.waits[thread.wg] = (self, i, want)
      try:
        while self.completed[i] < want:
          self.cta.check(where)
          self.cta.cond.wait(timeout=0.05)
      finally:
        del self.cta.waits[thread.wg]
      if self.completed[i] > want:
        raise KernelProtocolError(
          f"{where}: {self.completed[i]} phases have completed (a parity two phases ahead: the GPU would hang or "
          "miss the phase)"
        )
      for phase in [p for p in self.loads[i] if p <= want]:  # the TMA loads of the observed phases land
        for dst, data in self.loads[i].pop(phase):
          dst[...] = data
    thread.waits[key] = want


class _BarrierSlot:
  def __init__(self, barriers: _Barriers, index: int):
    self.barriers, self.index = barriers, index


# ------------------------------------------------------------------------------------------------------------------
# Refs and transforms.


def _transforms(tree: Any, leaves: Sequence[Any]) -> tuple:
  if tree is None:
    return ()
  out = jax.tree_util.tree_unflatten(tree, list(leaves))
  return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _split_transforms(params: dict, trees: Sequence[str], leaves: Sequence[Any]) -> tuple[list[tuple], list[Any]]:
  """The transforms of each operand whose flattened leaves follow one another (treedefs ``params[name]``), and the
  leaves left over (e.g. a predicate)."""
  out, start = [], 0
  for name in trees:
    tree = params[name]
    size = 0 if tree is None else tree.num_leaves
    out.append(_transforms(tree, leaves[start : start + size]))
    start += size
  return out, list(leaves[start:])


def _index(idx: Any) -> Any:
  if isinstance(idx, _internals().Slice):
    start = int(np.asarray(idx.start))
    return slice(start, start + idx.size * idx.stride, idx.stride)
  value = np.asarray(idx)
  if value.ndim:
    raise NotImplementedError("array indexers on kernel refs are not supported in interpret mode")
  return int(value)


def _view(ref: Any, transforms: Sequence[Any]) -> Any:
  """``ref`` seen through ``transforms``: numpy views of a buffer, or one barrier of an allocation."""
  internals = _internals()
  for t in transforms:
    if isinstance(t, internals.layout_only):
      continue  # buffers hold the logical layout
    if isinstance(t, internals.NDIndexer):
      idx = tuple(_index(i) for i in t.indices)
      if isinstance(ref, _Barriers):
        if len(idx) != 1 or not isinstance(idx[0], int):
          raise NotImplementedError("barriers are indexed one at a time in interpret mode")
        ref = _BarrierSlot(ref, idx[0])
      else:
        ref = ref[idx]
    elif isinstance(t, internals.TransposeTransform):
      ref = np.transpose(ref, t.permutation)
    else:
      raise NotImplementedError(f"ref transform {type(t).__name__} is not supported in interpret mode")
  return ref


def _barrier(ref: Any, transforms: Sequence[Any]) -> _BarrierSlot:
  slot = _view(ref, transforms)
  if isinstance(slot, _Barriers):
    if len(slot.completed) != 1:
      raise NotImplementedError("an array of barriers used without an index")
    slot = _BarrierSlot(slot, 0)
  return slot


# ------------------------------------------------------------------------------------------------------------------
# The interpreter.


class _Cta:
  """State shared by the warpgroup threads of one CTA."""

  def __init__(self, axis_env: dict[str, int], threads: int, kernel: str = "", operands: dict[int, int] | None = None):
    self.axis_env, self.threads = axis_env, threads
    self.kernel, self.operands = kernel, operands or {}  # operands: id of a global buffer -> its operand position
    self.cond = threading.Condition()
    self.shared: dict[tuple[int, int], list[Any]] = {}
    self.failed: BaseException | None = None
    self.waits: dict[int, tuple[_Barriers, int, int]] = {}  # warpgroup -> (barriers, index, phase) it waits for
    self.finished = 0
    self.smem: set[int] = set()  # ids of the shared-memory buffers
    self.moved = time.monotonic()
    self.in_flight: dict[int, list[Any]] = {}  # warpgroup -> shared-memory operands of its WGMMAs in flight

  def check_unread(self, view: Any, what: str) -> None:
    """Raises if a WGMMA in flight reads shared memory that ``what`` is about to overwrite (``view``)."""
    with self.cond:
      for wg, operands in self.in_flight.items():
        if any(np.may_share_memory(view, operand) for operand in operands):
          raise KernelProtocolError(
            f"{what} overwrites shared memory that a WGMMA of warpgroup {wg} reads, before a wait retired it (release "
            "the buffer after the WGMMA's wait)"
          )

  def count_load(self, src: Any) -> None:
    """One TMA load from kernel operand ``src`` (a global-memory ref), for ``count_loads``."""
    if _RECORDERS:
      position = self.operands.get(id(_root(src)))
      with _RECORDERS_LOCK:
        for counter in _RECORDERS:
          counter[(self.kernel, position)] += 1

  def progress(self) -> None:
    """Called with ``cond`` held whenever a barrier completes a phase or a warpgroup finishes."""
    self.moved = time.monotonic()
    self.cond.notify_all()

  def check(self, what: str) -> None:
    """Called with ``cond`` held by a waiting thread."""
    if self.failed is not None:
      raise KernelProtocolError(f"aborted while waiting on {what}: another warpgroup failed") from None
    stuck = all(b.completed[i] < want for b, i, want in self.waits.values())
    if stuck and len(self.waits) + self.finished == self.threads:
      self.failed = KernelProtocolError(f"deadlock: every warpgroup waits or has finished; this one waits on {what}")
      self.cond.notify_all()
      raise self.failed


class _Thread:
  def __init__(self, cta: _Cta, wg: int, thread_name: str):
    self.cta, self.wg, self.thread_name = cta, wg, thread_name
    self.waits: dict[tuple[int, int], int] = {}
    self.entered: dict[int, int] = {}
    self.stores: list[tuple[Any, Any, str | None]] = []  # TMA stores issued, not yet waited for
    self.dirty: set[int] = set()  # shared-memory buffers written since this thread's last commit_smem
    self.regions = 0  # named regions entered, counted as the profiler records them (see _eval_env)
    self.wgmmas: list[tuple[Any, Any, Any]] = []  # (accumulator, a, b) issued, not yet retired, oldest first

  def retire_wgmmas(self, keep: int = 0) -> None:
    """The WGMMAs in flight but the ``keep`` newest complete now: they read their operands and accumulate."""
    done, self.wgmmas = self.wgmmas[: max(len(self.wgmmas) - keep, 0)], self.wgmmas[max(len(self.wgmmas) - keep, 0) :]
    for acc, a, b in done:
      acc[...] += np.asarray(a, np.float32) @ np.asarray(b, np.float32)
    with self.cta.cond:
      self.cta.in_flight[self.wg] = [x for _, a, b in self.wgmmas for x in (a, b) if id(_root(x)) in self.cta.smem]

  def flush_stores(self, keep: int = 0) -> None:
    """The TMA stores read their sources now: all but the ``keep`` most recent."""
    done, self.stores = self.stores[: len(self.stores) - keep], self.stores[len(self.stores) - keep :]
    for dst, src, reduction in done:
      with self.cta.cond:  # reductions from different CTAs are atomic on the GPU; here CTAs run one at a time
        dst[...] = (dst + src) if reduction == "add" else src

  def check_committed(self, view: Any, what: str) -> None:
    if id(_root(view)) in self.dirty:
      raise KernelProtocolError(
        f"warpgroup {self.wg}: {what} reads shared memory it wrote without commit_smem (the async proxy may see stale "
        "data)"
      )

  # -- allocation

  def _allocate(self, aval: Any, transforms: Sequence[Any], name: str) -> Any:
    inner = aval.inner_aval
    if isinstance(inner.dtype, _internals().BarrierType):
      count = inner.shape[0] if inner.shape else 1  # one barrier is shape (1,) in jax 0.10, () in 0.11
      return _Barriers(self.cta, count, inner.dtype.num_arrivals, name)
    for t in transforms:
      inner = t.transform_type(inner)
    buffer = np.zeros(inner.shape, inner.dtype)  # accumulators start at zero
    if str(aval.memory_space) == "smem":
      _poison(buffer)
      self.cta.smem.add(id(buffer))
    return buffer

  def eqn(self, eqn: Any, invals: list[Any]) -> Any:
    name, p = eqn.primitive.name, eqn.params
    handler = getattr(self, "_p_" + name.removesuffix("_p"), None)
    if handler is not None:
      return handler(eqn, invals)
    if name in _NO_OPS:
      return []
    if name in _IDENTITY:
      return invals if eqn.primitive.multiple_results else invals[0]
    if any(isinstance(x, _Barriers) for x in invals) or "jaxpr" in p or "branches" in p:
      raise NotImplementedError(f"primitive {name!r} is not supported by the Mosaic GPU interpret mode")
    out = eqn.primitive.bind(*invals, **p)
    return [np.asarray(x) for x in out] if eqn.primitive.multiple_results else np.asarray(out)

  # Control flow.

  def _p_jit(self, eqn: Any, invals: list[Any]) -> list[Any]:
    return self._closed(eqn.params["jaxpr"], invals)

  _p_pjit = _p_jit

  def _call(self, jaxpr: Any, args: Sequence[Any]) -> list[Any]:
    env = dict(zip(jaxpr.invars, args, strict=True))
    return self._eval_env(jaxpr, env)

  def _eval_env(self, jaxpr: Any, env: dict[Any, Any]) -> list[Any]:
    def read(v: Any) -> Any:
      return v.val if isinstance(v, jex_core.Literal) else env[v]

    # The profiler opens a region wherever the name stack grows from one equation to the next within a jaxpr (each
    # sub-jaxpr starts afresh, as the lowering does): counted here, so that kernels can be held to the bound they
    # declare for their profile buffer.
    names: list[str] = []
    for eqn in jaxpr.eqns:
      now = [scope.name for scope in eqn.source_info.name_stack.stack]
      if now != names:
        same = next((i for i, (a, b) in enumerate(zip(names, now, strict=False)) if a != b), min(len(names), len(now)))
        self.regions += len(now) - same
        names = now
      outs = self.eqn(eqn, [read(v) for v in eqn.invars])
      if not eqn.primitive.multiple_results:
        outs = [outs]
      for v, x in zip(eqn.outvars, outs, strict=True):
        env[v] = x
    return [read(v) for v in jaxpr.outvars]

  def _closed(self, closed: Any, args: Sequence[Any]) -> list[Any]:
    env = dict(zip(closed.jaxpr.constvars, closed.consts, strict=True))
    env.update(zip(closed.jaxpr.invars, args, strict=True))
    return self._eval_env(closed.jaxpr, env)

  def _p_cond(self, eqn: Any, invals: list[Any]) -> list[Any]:
    index, *ops = invals
    branches = eqn.params["branches"]
    return self._closed(branches[int(np.clip(int(index), 0, len(branches) - 1))], ops)

  def _p_while(self, eqn: Any, invals: list[Any]) -> list[Any]:
    p = eqn.params
    cond_consts = invals[: p["cond_nconsts"]]
    body_consts = invals[p["cond_nconsts"] : p["cond_nconsts"] + p["body_nconsts"]]
    carry = invals[p["cond_nconsts"] + p["body_nconsts"] :]
    while bool(self._closed(p["cond_jaxpr"], [*cond_consts, *carry])[0]):
      carry = self._closed(p["body_jaxpr"], [*body_consts, *carry])
    return carry

  def _p_run_scoped(self, eqn: Any, invals: list[Any]) -> list[Any]:
    jaxpr = eqn.params["jaxpr"]
    consts = invals
    env = dict(zip(jaxpr.constvars, consts, strict=True))
    ref_transforms = eqn.params.get("ref_transforms") or [()] * len(jaxpr.invars)
    names = [f"{v.aval.inner_aval.str_short()} (allocation {n})" for n, v in enumerate(jaxpr.invars)]
    if eqn.params.get("collective_axes"):
      count = self.entered.get(id(eqn), 0)
      self.entered[id(eqn)] = count + 1
      with self.cta.cond:
        allocs = self.cta.shared.get((id(eqn), count))
        if allocs is None:
          allocs = [self._allocate(v.aval, t, n) for v, t, n in zip(jaxpr.invars, ref_transforms, names, strict=True)]
          self.cta.shared[(id(eqn), count)] = allocs
    else:
      allocs = [self._allocate(v.aval, t, n) for v, t, n in zip(jaxpr.invars, ref_transforms, names, strict=True)]
    env.update(zip(jaxpr.invars, allocs, strict=True))
    return self._eval_env(jaxpr, env)

  def _p_run_state(self, eqn: Any, invals: list[Any]) -> list[Any]:
    # Values become fresh buffers (accumulators among them); refs the region closes over stay the same refs.
    jaxpr = eqn.params["jaxpr"]
    passed = [isinstance(v.aval, _internals().AbstractRef) for v in eqn.invars]
    refs = [x if ref else np.array(x, copy=True) for x, ref in zip(invals, passed, strict=True)]
    self._call(jaxpr, refs)
    self.retire_wgmmas()  # the region's end waits for every WGMMA (its accumulators' values are read)
    return refs

  # Indices and memory.

  def _p_axis_index(self, eqn: Any, invals: list[Any]) -> Any:
    axis = eqn.params["axis_name"]
    axis = axis[0] if isinstance(axis, tuple) and len(axis) == 1 else axis
    if axis == self.thread_name:
      return np.int32(self.wg)
    return np.int32(self.cta.axis_env[axis])

  def _p_get(self, eqn: Any, invals: list[Any]) -> Any:
    ref, *leaves = invals
    return np.array(_view(ref, _transforms(eqn.params["tree"], leaves)), copy=True)

  _p_load = _p_get

  def _p_swap(self, eqn: Any, invals: list[Any]) -> Any:
    ref, value, *leaves = invals
    view = _view(ref, _transforms(eqn.params["tree"], leaves))
    if any(np.may_share_memory(view, acc) for acc, _, _ in self.wgmmas):
      raise KernelProtocolError(f"warpgroup {self.wg} writes a WGMMA accumulator before a wait retired its WGMMA")
    old = np.array(view, copy=True)
    if id(_root(view)) in self.cta.smem:
      self.cta.check_unread(view, f"a store of warpgroup {self.wg}")
      self.dirty.add(id(_root(view)))
    view[...] = value
    return old

  def _p_copy_gmem_to_smem(self, eqn: Any, invals: list[Any]) -> list[Any]:
    p = eqn.params
    src, dst, barrier, *leaves = invals
    (src_t, dst_t, bar_t), _ = _split_transforms(
      p, ("src_transforms_treedef", "dst_transforms_treedef", "barrier_transforms_treedef"), leaves
    )
    if p.get("collective_axes") or p.get("leader_tracked") is not None:
      raise NotImplementedError("multicast (cluster-collective) TMA loads are not supported in interpret mode")
    view, data = _view(dst, dst_t), np.array(_view(src, src_t), copy=True)
    self.cta.check_unread(view, f"a TMA load of warpgroup {self.wg}")
    self.cta.count_load(src)
    if barrier is None:
      view[...] = data
      return []
    _poison(view)
    slot = _barrier(barrier, bar_t)
    slot.barriers.arrive(slot.index, load=(view, data))
    return []

  def _p_copy_smem_to_gmem(self, eqn: Any, invals: list[Any]) -> list[Any]:
    p = eqn.params
    src, dst, *leaves = invals
    (src_t, dst_t), rest = _split_transforms(p, ("src_transforms_treedef", "dst_transforms_treedef"), leaves)
    if p.get("has_user_predicate") and not bool(rest[0]):
      return []
    if p.get("reduction_op") not in (None, "add"):
      raise NotImplementedError(f"TMA reduction {p['reduction_op']!r} is not supported in interpret mode")
    source = _view(src, src_t)
    self.check_committed(source, "a TMA store")
    self.stores.append((_view(dst, dst_t), source, p.get("reduction_op")))
    return []

  def _p_wait_smem_to_gmem(self, eqn: Any, invals: list[Any]) -> list[Any]:
    self.flush_stores(keep=int(invals[0] if invals else eqn.params["n"]))  # an operand in jax 0.10, a param in 0.11
    return []

  def _p_commit_smem(self, eqn: Any, invals: list[Any]) -> list[Any]:
    self.dirty.clear()
    return []

  def _p_barrier_arrive(self, eqn: Any, invals: list[Any]) -> list[Any]:
    barrier, *leaves = invals
    slot = _barrier(barrier, _transforms(eqn.params["transforms_treedef"], leaves))
    slot.barriers.arrive(slot.index, wg=self.wg)
    if self.stores:
      # Released with stores still pending: let the woken warpgroups act first, so that one refilling a store's
      # source before the store has read it (a race on the GPU) shows in the stored data.
      time.sleep(_RELEASE_PAUSE)
    elif self.wgmmas:  # likewise a buffer released while a WGMMA in flight reads it: the refill raises
      time.sleep(_WGMMA_PAUSE)
    return []

  def _p_barrier_wait(self, eqn: Any, invals: list[Any]) -> list[Any]:
    barrier, *leaves = invals
    slot = _barrier(barrier, _transforms(eqn.params["transforms_treedef"], leaves))
    slot.barriers.wait(slot.index, self)
    return []

  # Tensor cores.

  def _p_wgmma_ref(self, eqn: Any, invals: list[Any]) -> list[Any]:
    p = eqn.params
    acc, a, b, *leaves = invals
    (acc_t, a_t, b_t), _ = _split_transforms(
      p, ("acc_transforms_tree", "a_transforms_tree", "b_transforms_tree"), leaves
    )
    acc_view = _view(acc, acc_t)
    a_view, b_view = _view(a, a_t), _view(b, b_t)
    self.check_committed(a_view, "a WGMMA operand")
    self.check_committed(b_view, "a WGMMA operand")
    self.wgmmas.append((acc_view, a_view, b_view))  # in flight: it reads its operands when a wait retires it
    self.retire_wgmmas(keep=len(self.wgmmas))  # (publishes its shared-memory operands)
    return []

  def _p_wgmma_wait(self, eqn: Any, invals: list[Any]) -> list[Any]:
    self.retire_wgmmas(keep=int(invals[0] if invals else eqn.params.get("n", 0)))
    return []

  def _p_wgmma_accumulator_deref(self, eqn: Any, invals: list[Any]) -> Any:
    wait_n = eqn.params.get("wait_n", 0)
    if wait_n is not None:
      self.retire_wgmmas(keep=int(wait_n))
    if any(np.may_share_memory(invals[0], acc) for acc, _, _ in self.wgmmas):
      raise KernelProtocolError(
        f"warpgroup {self.wg} reads a WGMMA accumulator while a WGMMA writing it is in flight (wait for it first)"
      )
    return np.array(invals[0], copy=True)


_NO_OPS = {"set_max_registers", "set_max_registers_p", "commit_group"}
_IDENTITY = {"layout_cast", "optimization_barrier"}


# ------------------------------------------------------------------------------------------------------------------
# Entry point.


def _find_kernel(jaxpr: Any) -> Any:
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "mpmd_map":
      return eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if isinstance(inner, jex_core.Jaxpr):
          found = _find_kernel(inner)
          if found is not None:
            return found
  return None


def _run_cta(
  body: Any,
  consts: Sequence[Any],
  refs: list[Any],
  axis_env: dict[str, int],
  mesh: Any,
  kernel: str = "",
  regions: int | None = None,
) -> None:
  cta = _Cta(axis_env, mesh.num_threads, kernel, {id(_root(r)): n for n, r in enumerate(refs)})

  def work(wg: int) -> None:
    thread = _Thread(cta, wg, mesh.thread_name)
    try:
      env = dict(zip(body.constvars, consts, strict=True))
      env.update(zip(body.invars, refs, strict=True))
      thread._eval_env(body, env)
      thread.retire_wgmmas()
      thread.flush_stores()  # the kernel's end waits for its stores
      if regions is not None and thread.regions > regions:
        raise KernelProtocolError(
          f"{kernel}: warpgroup {wg} of CTA {axis_env} entered {thread.regions} named regions, more than the "
          f"{regions} the kernel declares for its profile buffer"
        )
    except BaseException as e:  # noqa: BLE001 - reported by the caller
      with cta.cond:
        cta.failed = cta.failed or e  # the first failure is the cause; the others are aborts it caused
        cta.cond.notify_all()
    finally:
      with cta.cond:
        cta.finished += 1
        cta.progress()

  threads = [threading.Thread(target=work, args=(wg,), daemon=True) for wg in range(mesh.num_threads)]
  for t in threads:
    t.start()
  while alive := [t for t in threads if t.is_alive()]:
    alive[0].join(0.5)
    with cta.cond:
      if time.monotonic() - cta.moved > _STALL_SECONDS and cta.failed is None:
        cta.failed = KernelProtocolError(
          f"CTA {axis_env}: no barrier moved and no warpgroup finished for {_STALL_SECONDS:.0f} s (a hang)"
        )
        cta.cond.notify_all()
        break  # waiting threads abort; one stuck outside a barrier is left behind (a daemon)
  if cta.failed is not None:
    raise cta.failed


_RECORDERS: list[collections.Counter] = []
_RECORDERS_LOCK = threading.Lock()


@contextlib.contextmanager
def count_loads() -> Iterator[collections.Counter]:
  """Counts the TMA loads of the kernels interpreted inside: ``(kernel name, operand position) -> loads``.

  One load brings one block, so this shows which blocks a kernel fetched: the tests check that the producers copy
  exactly the listed (non-empty) tiles. A module-wide recorder, since the kernels run in a callback thread.
  """
  counter: collections.Counter = collections.Counter()
  with _RECORDERS_LOCK:
    _RECORDERS.append(counter)
  try:
    yield counter
  finally:
    with _RECORDERS_LOCK:
      _RECORDERS.remove(counter)


def interpret(kernel: Callable[..., Any], *args: jax.Array, name: str = "kernel", regions: int | None = None) -> Any:
  """Runs ``kernel`` (a ``plgpu.kernel`` callable) on ``args`` with this interpreter; usable under ``jit``.

  ``name`` labels its loads in ``count_loads``. ``regions``: the most named regions (``jax.named_scope``) one
  warpgroup of a CTA may enter, as declared for the profiler's buffer; entering more raises ``KernelProtocolError``.
  """
  closed = jax.make_jaxpr(kernel)(*args)
  eqn = _find_kernel(closed.jaxpr)
  if eqn is None:
    raise ValueError("no Mosaic GPU kernel found in the traced call")
  (body,), (mesh,) = eqn.params["jaxprs"], eqn.params["meshes"]
  if getattr(mesh, "cluster", ()):
    raise NotImplementedError("CTA clusters are not supported in interpret mode")
  if eqn.params.get("input_output_aliases"):
    raise NotImplementedError("kernels with aliased inputs and outputs are not supported in interpret mode")
  out_avals = tuple(eqn.params["out_avals"])
  body_jaxpr = getattr(body, "jaxpr", body)
  body_consts = list(getattr(body, "consts", ()))
  if len(body_jaxpr.invars) != len(args) + len(out_avals):
    raise NotImplementedError(
      f"the kernel takes {len(body_jaxpr.invars)} refs, not its {len(args)} operands and {len(out_avals)} outputs"
    )

  def host(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    outs = [np.zeros(a.shape, a.dtype) for a in out_avals]
    refs = [np.array(a, copy=True) for a in arrays] + outs
    for point in itertools.product(*(range(n) for n in mesh.grid)):
      _run_cta(body_jaxpr, body_consts, refs, dict(zip(mesh.grid_names, point, strict=True)), mesh, name, regions)
    return tuple(outs)

  shapes = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in out_avals)
  outs = jax.pure_callback(host, shapes, *args, vmap_method="sequential")
  return outs if len(outs) > 1 else outs[0]
