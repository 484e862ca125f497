"""From logical axis names to shardings, and parameters created already sharded.

Boxed vs unboxed: ``module.init`` returns parameters wrapped in ``nn.LogicallyPartitioned`` boxes that carry their
logical axis names. The names are read here, from the boxed (or abstract boxed) tree, to build the sharding tree;
the arrays handed back to callers are unboxed (``nn.meta.unbox``) so that optimisers, checkpoints and ``apply`` see
plain arrays. The returned sharding tree has the same structure as those unboxed variables; keep it for
``jax.jit(in_shardings=..., out_shardings=...)`` and for sharded checkpoint restore.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding

LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: LogicalRules) -> Iterator[Mesh]:
  """Enters ``jax.set_mesh(mesh)`` and ``nn.logical_axis_rules(rules)``.

  Both are needed for ``nn.with_logical_constraint`` inside model code to become a sharding constraint: without
  rules it is a no-op, without a mesh the resulting PartitionSpec has nothing to refer to.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(rules)):
    yield mesh


def named_sharding(logical_axes: Sequence[str | None], mesh: Mesh, rules: LogicalRules) -> NamedSharding:
  """The sharding of one array whose dimensions carry ``logical_axes``, e.g. a batch (ACT_BATCH, ACT_LENGTH, ...)."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(logical_axes), tuple(rules)))


def logical_shardings(tree: Any, mesh: Mesh, rules: LogicalRules) -> Any:
  """NamedSharding for every leaf of a boxed variable tree (concrete or from ``jax.eval_shape``).

  Leaves without a logical box are replicated. The result mirrors the *unboxed* tree. Pass the boxed tree: unboxed
  arrays have lost their axis names and would all come out replicated.
  """
  return nn.logical_to_mesh_sharding(nn.get_partition_spec(tree), mesh, tuple(rules))


def sharded_init(init_fn: Callable[..., Any], mesh: Mesh, rules: LogicalRules, *args: Any) -> tuple[Any, Any]:
  """Runs ``init_fn(*args)`` (e.g. ``module.init``) so that every parameter is created on its own shards.

  ``jax.eval_shape`` gives the boxed abstract tree, hence the shardings; the jitted init then writes each parameter
  straight into its shards, so no device (or host) ever holds a whole replicated copy. Returns
  ``(variables, shardings)``: unboxed arrays and the matching NamedSharding tree.
  """

  def unboxed_init(*a: Any) -> Any:
    return nn.meta.unbox(init_fn(*a))

  with mesh_context(mesh, rules):
    abstract = jax.eval_shape(init_fn, *args)
    shardings = logical_shardings(abstract, mesh, rules)
    variables = jax.jit(unboxed_init, out_shardings=shardings)(*args)
  return variables, shardings
