"""The device mesh over ``MESH_AXES`` (data, fsdp, sequence, tensor)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh

from cinema_jax.parallel.axes import MESH_AXES


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Sizes of ``MESH_AXES`` in order: absent axes are 1, a single -1 takes the devices left over.

  Raises ValueError for an unknown axis, a size that is neither positive nor -1, two -1s, or sizes whose product
  does not divide (with a -1) or equal (without) ``num_devices``.
  """
  unknown = [name for name in shape if name not in MESH_AXES]
  if unknown:
    raise ValueError(f"unknown mesh axis {unknown[0]!r} in {dict(shape)}; mesh axes are {MESH_AXES}")
  sizes = {name: int(shape.get(name, 1)) for name in MESH_AXES}
  for name, size in sizes.items():
    if size < 1 and size != -1:
      raise ValueError(f"mesh axis {name!r} has size {size}; sizes are positive, or -1 for the remaining devices")
  fill = [name for name, size in sizes.items() if size == -1]
  if len(fill) > 1:
    raise ValueError(f"only one mesh axis may be -1, got {fill} in {dict(shape)}")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if fill:
    if num_devices % fixed:
      raise ValueError(
        f"mesh axis {fill[0]!r} = -1 cannot fill {num_devices} devices: the other axes {dict(shape)} "
        f"multiply to {fixed}, which does not divide {num_devices}"
      )
    sizes[fill[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(f"mesh {sizes} has {fixed} devices but {num_devices} are available; use -1 on one axis to fill")
  return tuple(sizes[name] for name in MESH_AXES)


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with all four ``MESH_AXES`` (size 1 where not given), e.g. ``make_mesh({"fsdp": -1, "tensor": 2})``.

  Axes are ``AxisType.Auto``: linen's logical constraints and GSPMD propagation decide activation shardings, which
  is what the logical-axis rules are written for (Explicit axes would make every op's sharding part of its type).
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_mesh_shape(shape, len(devices))
  return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)
