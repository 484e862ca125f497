"""The train state (step, parameters, optimiser state, EMA) and its shardings, built abstractly first.

``build_state`` evaluates the model's init with ``jax.eval_shape``: the logical axis names of the boxed abstract
parameters give their NamedShardings, ``optax.tree_map_params`` carries them to the optimiser's per-parameter
states (Adam moments), and scalars (step, counts) are replicated. The same abstract tree, with shardings attached,
is the restore target of a checkpoint, so a run resumes onto any mesh without building the state first.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

from cinema_jax.parallel.sharding import logical_shardings, mesh_context
from cinema_jax.train.optimizer import make_optimizer


@struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: updates applied so far
  params: Any  # float32 parameters (param_dtype)
  opt_state: Any  # optax state of make_optimizer
  ema: Any  # exponential moving average of params, or None (optimizer.ema_decay = 0)


def _path_keys(path) -> tuple:
  return tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)


def _follow_params(opt_state: Any, params: Any, param_sh: Any, replicated: NamedSharding) -> Any:
  """Shardings of an optimiser state: a leaf whose key path ends with a parameter's path (Adam's mu/nu, under any
  nesting of chains and masks) and has its shape takes that parameter's sharding; counts and the rest replicate."""
  by_path = {}
  for (path, p), s in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(param_sh), strict=True):
    by_path[_path_keys(path)] = (tuple(p.shape), s)

  def sharding(path, leaf):
    keys = _path_keys(path)
    for i in range(len(keys)):
      hit = by_path.get(keys[i:])
      if hit is not None and hit[0] == tuple(leaf.shape):
        return hit[1]
    return replicated

  return jax.tree_util.tree_map_with_path(sharding, opt_state)


@dataclasses.dataclass
class StateSpec:
  """Everything needed to create or restore a state on one mesh."""

  abstract: TrainState  # ShapeDtypeStructs carrying their shardings (the restore target)
  shardings: TrainState  # NamedSharding tree
  tx: optax.GradientTransformation
  init: Any  # jitted key -> TrainState, written straight into its shards


def build_state(task, config, mesh, rules, example_batch: dict) -> StateSpec:
  replicated = NamedSharding(mesh, PartitionSpec())

  def init_params(key):
    return task.init(key, example_batch)["params"]

  key = jax.random.PRNGKey(config.seed)
  with mesh_context(mesh, rules):
    boxed = jax.eval_shape(init_params, key)
    param_sh = logical_shardings(boxed, mesh, rules)
  abstract_params = nn.meta.unbox(boxed)
  tx = make_optimizer(config, abstract_params)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_sh = _follow_params(abstract_opt, abstract_params, param_sh, replicated)
  use_ema = config.optimizer.ema_decay > 0
  shardings = TrainState(replicated, param_sh, opt_sh, param_sh if use_ema else None)

  def init(key):
    params = nn.meta.unbox(init_params(key))
    ema = jax.tree.map(jnp.copy, params) if use_ema else None
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), ema)

  abstract_state = jax.eval_shape(init, key)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
  jitted = jax.jit(init, out_shardings=shardings)

  def init_sharded(key=key):
    with mesh_context(mesh, rules):
      return jitted(key)

  return StateSpec(abstract, shardings, tx, init_sharded)
