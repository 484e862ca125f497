"""Every JAX-version-specific Pallas name the kernels use, in one place.

The kernels run on jax 0.10 (CPU, interpret mode) and jax 0.11 (GPU image, TPU VMs). Pallas moves fast: compiler
parameter classes were renamed (``TPUCompilerParams`` -> ``pltpu.CompilerParams``, ``TritonCompilerParams`` ->
``pallas.triton.CompilerParams``), squeezed block dimensions moved from ``None`` to ``pl.squeezed``, the Triton
lowering is deprecated in 0.11, and ``shard_map`` renamed ``check_rep`` to ``check_vma``. Kernel modules import the
names below and nothing version-specific from ``jax.experimental.pallas`` themselves, so a JAX upgrade is one edit here.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# A block dimension of size one that the kernel does not see.
SQUEEZED: Any = getattr(pl, "squeezed", None)


@functools.cache
def _pltpu():
  from jax.experimental.pallas import tpu as pltpu

  return pltpu


def prefetch_scalar_grid_spec(**kwargs: Any) -> Any:
  """``pltpu.PrefetchScalarGridSpec``: a grid whose leading operands are copied to scalar memory first."""
  return _pltpu().PrefetchScalarGridSpec(**kwargs)


def tpu_compiler_params(dimension_semantics: tuple[str, ...]) -> Any:
  pltpu = _pltpu()
  cls = getattr(pltpu, "CompilerParams", None) or pltpu.TPUCompilerParams
  return cls(dimension_semantics=dimension_semantics)


def tpu_vmem(shape: tuple[int, ...], dtype: Any) -> Any:
  """A VMEM scratch buffer of the TPU grid spec (plain memory in interpret mode)."""
  return _pltpu().VMEM(shape, dtype)


def triton_compiler_params(num_warps: int, num_stages: int) -> Any:
  try:
    from jax.experimental.pallas import triton as pltriton

    cls = pltriton.CompilerParams
  except (ImportError, AttributeError):  # jax < 0.4.36
    from jax.experimental.pallas import gpu as plgpu_old

    cls = plgpu_old.TritonCompilerParams
  return cls(num_warps=num_warps, num_stages=num_stages)


def interpret_flag(interpret: bool) -> Any:
  """The ``interpret=`` value of ``pl.pallas_call``: the generic HLO interpreter, which runs any grid spec on CPU."""
  return bool(interpret)


def pallas_call(kernel: Any, **kwargs: Any) -> Any:
  """``pl.pallas_call`` with the Triton deprecation warning of jax 0.11 silenced (the Triton path is a documented
  fallback, chosen on purpose)."""
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*[Tt]riton.*deprecat.*")
    return pl.pallas_call(kernel, **kwargs)


@functools.cache
def _shard_map_check_kw() -> str | None:
  params = inspect.signature(jax.shard_map).parameters
  for name in ("check_vma", "check_rep"):
    if name in params:
      return name
  return None


def shard_map(f: Any, *, mesh: Any, in_specs: Any, out_specs: Any) -> Any:
  """``jax.shard_map`` without the replication check: a ``pallas_call`` carries no varying-axes information, and the
  outputs claimed replicated over unused mesh axes are computed identically on every device of those axes."""
  kw = {_shard_map_check_kw(): False} if _shard_map_check_kw() else {}
  return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **kw)


def abstract_mesh() -> Any:
  """The mesh set by ``jax.set_mesh`` (an empty mesh when none)."""
  return jax.sharding.get_abstract_mesh()


# ------------------------------------------------------------------------------------------------------------------
# Mosaic GPU (Hopper).


@functools.cache
def plgpu() -> Any:
  from jax.experimental.pallas import mosaic_gpu

  return mosaic_gpu


def mgpu_layout() -> Any:
  """The register layout of a WGMMA accumulator; ``.reduce(1)`` is its row vectors, ``.reduce(0)`` its columns."""
  return plgpu().Layout.WGMMA


def mgpu_iota(shape: tuple[int, ...], dim: int, layout: Any) -> Any:
  return plgpu().broadcasted_iota(jnp.int32, shape, dim, layout=layout)


@functools.cache
def _mgpu_load_takes_index() -> bool:
  """jax 0.10's ``plgpu.load(ref, idx)`` needs the index; 0.11 deprecates it (index the ref with ``.at`` instead)."""
  idx = inspect.signature(plgpu().load).parameters["idx"]
  return idx.default is inspect.Parameter.empty


def mgpu_load(ref: Any, layout: Any) -> Any:
  """The whole of ``ref`` (already indexed with ``.at[...]``) in registers, in ``layout``."""
  if _mgpu_load_takes_index():
    return plgpu().load(ref, (), layout=layout, optimized=False)
  return plgpu().load(ref, layout=layout, optimized=False)


def mgpu_kernel(body: Any, *, out_type: Any, profile: tuple[int, str] | None = None, **kwargs: Any) -> Any:
  """``plgpu.kernel`` with fast approximate exp2/log (the softmax tolerates them).

  ``profile``: (regions per warpgroup, directory) turns on Mosaic GPU's in-kernel profiler (named regions).
  """
  params = dict(approx_math=True)
  if profile is not None:
    params.update(profile_space=profile[0], profile_dir=profile[1])
    if "profile_bounds_check" in {f.name for f in dataclasses.fields(plgpu().CompilerParams)}:
      params["profile_bounds_check"] = True  # JAX >= 0.11: drop events past the space rather than overrun memory
  return plgpu().kernel(body, out_type=out_type, compiler_params=plgpu().CompilerParams(**params), **kwargs)


@functools.cache
def mgpu_internals() -> Any:
  """The jaxpr-level classes ``mosaic_gpu_interpret`` dispatches on: JAX internals, so they are named only here."""
  import types

  from jax._src.pallas.mosaic_gpu import core as gpu_core
  from jax._src.state import indexing
  from jax._src.state import types as state_types

  return types.SimpleNamespace(
    BarrierType=gpu_core.BarrierType,
    layout_only=(gpu_core.UnswizzleRef, gpu_core.UntilingTransform),  # transforms that only change the layout
    NDIndexer=indexing.NDIndexer,
    Slice=indexing.Slice,
    TransposeTransform=state_types.TransposeTransform,
    AbstractRef=state_types.AbstractRef,
  )
