"""Meshes, logical-axis shardings and multi-process start-up.

The axis vocabulary is ``cinema_jax.parallel.axes`` (import the constants from there).
"""

from cinema_jax.parallel import axes
from cinema_jax.parallel.axes import ALL_AXES, DEFAULT_RULES, MESH_AXES
from cinema_jax.parallel.distributed import DistributedPlan, detect_cluster, initialize, resolve_distributed
from cinema_jax.parallel.mesh import make_mesh, resolve_mesh_shape
from cinema_jax.parallel.sharding import (
  LogicalRules,
  logical_shardings,
  mesh_context,
  named_sharding,
  sharded_init,
)

__all__ = [
  "ALL_AXES",
  "DEFAULT_RULES",
  "MESH_AXES",
  "DistributedPlan",
  "LogicalRules",
  "axes",
  "detect_cluster",
  "initialize",
  "logical_shardings",
  "make_mesh",
  "mesh_context",
  "named_sharding",
  "resolve_distributed",
  "resolve_mesh_shape",
  "sharded_init",
]
