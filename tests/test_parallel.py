"""Meshes, logical shardings and sharded init on 8 fake CPU devices; multi-process start-up resolution."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from cinema_jax import nn as cnn
from cinema_jax.parallel import (
  DEFAULT_RULES,
  MESH_AXES,
  distributed,
  logical_shardings,
  make_mesh,
  mesh_context,
  named_sharding,
  resolve_distributed,
  sharded_init,
)
from cinema_jax.parallel.axes import ACT_BATCH, ACT_EMBED, ACT_LENGTH, EMBED, IN_FEATURES

needs_8_devices = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py fakes them)")


# ----------------------------------------------------------------------------------------------------------- mesh


@needs_8_devices
def test_make_mesh_fills_minus_one_and_defaults_to_one():
  mesh = make_mesh({"data": 2, "fsdp": -1, "tensor": 2})
  assert mesh.axis_names == MESH_AXES
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "sequence": 1, "tensor": 2}
  assert mesh.axis_types == (AxisType.Auto,) * 4
  assert dict(make_mesh({"fsdp": -1}).shape) == {"data": 1, "fsdp": 8, "sequence": 1, "tensor": 1}
  two = make_mesh({"data": 2}, devices=jax.devices()[:2])
  assert two.devices.size == 2 and set(two.devices.flat) == set(jax.devices()[:2])


@needs_8_devices
@pytest.mark.parametrize(
  "shape, message",
  [
    ({"model": 2, "data": -1}, r"unknown mesh axis 'model'"),
    ({"data": -1, "tensor": -1}, r"only one mesh axis may be -1, got \['data', 'tensor'\]"),
    ({"data": 3, "fsdp": -1}, r"'fsdp' = -1 cannot fill 8 devices.*multiply to 3"),
    ({"data": 2, "fsdp": 2}, r"has 4 devices but 8 are available"),
    ({}, r"has 1 devices but 8 are available"),
    ({"tensor": 0, "data": -1}, r"'tensor' has size 0"),
  ],
)
def test_make_mesh_errors(shape, message):
  with pytest.raises(ValueError, match=message):
    make_mesh(shape)


# ------------------------------------------------------------------------------------------------ sharded init


class TinyBlock(nn.Module):
  """proj -> RMSNorm -> residual MLP, the way model code annotates its block boundary. B, L, C_in, E, M as usual."""

  embed: int = 16
  hidden: int = 32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [B, L, C_in] -> [B, L, E]
    h = cnn.Dense(self.embed, kernel_axes=(IN_FEATURES, EMBED), name="proj")(x)
    h = cnn.RMSNorm(name="norm")(h)
    h = h + cnn.MLP(self.hidden, name="mlp")(h)
    return nn.with_logical_constraint(h, (ACT_BATCH, ACT_LENGTH, ACT_EMBED))


# With DEFAULT_RULES: embed -> fsdp, mlp -> tensor, norm and in_features replicated.
EXPECTED_SPECS = {
  "proj": {"kernel": P(None, "fsdp"), "bias": P("fsdp")},
  "norm": {"scale": P(None)},
  "mlp": {
    "in_layer": {"kernel": P("fsdp", "tensor"), "bias": P("tensor")},
    "out_layer": {"kernel": P("tensor", "fsdp"), "bias": P("fsdp")},
  },
}
# Shard shapes on data 2 x fsdp 2 x tensor 2 (C_in 8, E 16, M 32).
EXPECTED_SHARD_SHAPES = {
  "proj": {"kernel": (8, 8), "bias": (8,)},
  "norm": {"scale": (16,)},
  "mlp": {"in_layer": {"kernel": (8, 16), "bias": (16,)}, "out_layer": {"kernel": (16, 8), "bias": (8,)}},
}


@pytest.fixture(scope="module")
def sharded_block():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (tests/conftest.py fakes them)")
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  module = TinyBlock()
  x = jax.random.normal(jax.random.key(1), (4, 6, 8))
  variables, shardings = sharded_init(module.init, mesh, DEFAULT_RULES, jax.random.key(0), x)
  return mesh, module, x, variables, shardings


def test_sharded_init_places_every_parameter_by_the_rules(sharded_block):
  mesh, module, x, variables, shardings = sharded_block
  params = variables["params"]
  # Unboxed arrays come back, with the sharding tree mirroring them.
  is_box = lambda v: isinstance(v, nn.Partitioned)
  assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(variables, is_leaf=is_box))
  assert jax.tree.map(lambda s: s.spec, shardings["params"]) == EXPECTED_SPECS
  assert jax.tree.map(lambda a: a.sharding.spec, params) == EXPECTED_SPECS
  for path, array in jax.tree_util.tree_leaves_with_path(params):
    expected = EXPECTED_SHARD_SHAPES
    for key in path:
      expected = expected[key.key]
    shards = array.addressable_shards
    assert len(shards) == 8 and {s.data.shape for s in shards} == {expected}, jax.tree_util.keystr(path)
    assert array.sharding.mesh == mesh

  # Sharding does not change the values: same as a plain single-device init with the same key.
  plain = nn.meta.unbox(module.init(jax.random.key(0), x))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(variables), jax.device_get(plain))
  # The abstract route gives the same shardings.
  abstract = jax.eval_shape(module.init, jax.random.key(0), x)
  assert logical_shardings(abstract, mesh, DEFAULT_RULES) == shardings


def test_sharded_forward_equals_single_device(sharded_block):
  mesh, module, x, variables, shardings = sharded_block
  batch_sharding = named_sharding((ACT_BATCH, ACT_LENGTH, ACT_EMBED), mesh, DEFAULT_RULES)
  assert batch_sharding.spec == P(("data", "fsdp"), "sequence", None)
  with mesh_context(mesh, DEFAULT_RULES):
    forward = jax.jit(module.apply, in_shardings=(shardings, batch_sharding), out_shardings=batch_sharding)
    out = forward(variables, jax.device_put(x, batch_sharding))
  assert out.sharding.spec == batch_sharding.spec
  assert {s.data.shape for s in out.addressable_shards} == {(1, 6, 16)}  # batch 4 over data x fsdp

  single = module.apply(jax.device_get(variables), np.asarray(x))
  np.testing.assert_allclose(out, single, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------------- distributed


def test_resolve_single_process_when_nothing_is_given():
  plan = resolve_distributed(env={})
  assert plan.mode == "single"
  assert resolve_distributed(env={"CINEMA_JAX_NUM_PROCESSES": "1"}).mode == "single"


def test_resolve_explicit_from_environment_and_arguments():
  env = {
    "CINEMA_JAX_COORDINATOR": "coordinator-host:1234",
    "CINEMA_JAX_NUM_PROCESSES": "4",
    "CINEMA_JAX_PROCESS_ID": "3",
  }
  plan = resolve_distributed(env=env)
  assert plan.mode == "explicit"
  assert plan.initialize_kwargs() == {
    "coordinator_address": "coordinator-host:1234",
    "num_processes": 4,
    "process_id": 3,
  }
  # Arguments win over the environment, and can complete it.
  plan = resolve_distributed(process_id=1, local_device_ids=[0, 1], env=env)
  assert plan.initialize_kwargs() == {
    "coordinator_address": "coordinator-host:1234",
    "num_processes": 4,
    "process_id": 1,
    "local_device_ids": [0, 1],
  }
  plan = resolve_distributed("localhost:5000", 2, env={"CINEMA_JAX_PROCESS_ID": "0"})
  assert plan.mode == "explicit"
  assert (plan.coordinator_address, plan.num_processes, plan.process_id) == ("localhost:5000", 2, 0)


@pytest.mark.parametrize(
  "kwargs, env, message",
  [
    ({"coordinator_address": "h:1"}, {}, r"missing num_processes \(or \$CINEMA_JAX_NUM_PROCESSES\), process_id"),
    (
      {},
      {"CINEMA_JAX_COORDINATOR": "h:1", "CINEMA_JAX_NUM_PROCESSES": "2"},
      r"missing process_id \(or \$CINEMA_JAX_PROCESS_ID\)",
    ),
    ({"process_id": 1}, {}, r"missing coordinator_address"),
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, {}, r"process_id 2 is outside \[0, 2\)"),
    ({}, {"CINEMA_JAX_NUM_PROCESSES": "two"}, r"CINEMA_JAX_NUM_PROCESSES must be an integer, got 'two'"),
    ({"num_processes": 0}, {}, r"num_processes must be >= 1"),
    ({"local_device_ids": [0]}, {}, r"local_device_ids=\(0,\) given without a multi-process spec"),
  ],
)
def test_resolve_rejects_partial_or_invalid_specs(kwargs, env, message):
  with pytest.raises(ValueError, match=message):
    resolve_distributed(**kwargs, env=env)


SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}


@pytest.mark.parametrize(
  "env, tpu_present, expected",
  [
    ({**SLURM, "SLURM_NTASKS": "4"}, False, ("auto", "slurm")),
    ({**SLURM, "SLURM_NTASKS": "1"}, False, ("single", "single process")),  # one task: nothing to coordinate
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, False, ("single", "single process")),  # salloc shell, no step
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://coordinator-host:1", "OMPI_COMM_WORLD_SIZE": "2"}, False, ("auto", "ompi")),
    ({}, True, ("auto", "tpu")),
    ({"TPU_WORKER_HOSTNAMES": "a,b"}, False, ("auto", "tpu")),
    ({"JAX_PLATFORMS": "cpu"}, True, ("single", "single process")),  # TPU host forced onto the CPU
  ],
)
def test_resolve_auto_detected_clusters(env, tpu_present, expected):
  plan = resolve_distributed(env=env, tpu_present=tpu_present)
  assert (plan.mode, plan.source) == expected
  if plan.mode == "auto":
    assert plan.initialize_kwargs() == {}  # jax.distributed.initialize() with no arguments
  # An explicit spec beats detection.
  explicit = {"CINEMA_JAX_COORDINATOR": "h:1", "CINEMA_JAX_NUM_PROCESSES": "2", "CINEMA_JAX_PROCESS_ID": "0"}
  assert resolve_distributed(env={**env, **explicit}, tpu_present=tpu_present).mode == "explicit"


@pytest.fixture
def fake_jax_distributed(monkeypatch):
  """Records jax.distributed.initialize calls instead of starting a runtime; a clean launcher environment."""
  calls = []
  state = {"initialized": False}

  def fake_initialize(**kwargs):
    calls.append(kwargs)
    state["initialized"] = True

  monkeypatch.setattr(jax.distributed, "initialize", fake_initialize)
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: state["initialized"])
  monkeypatch.setattr(distributed, "_tpu_chips_present", lambda: False)
  for name in (
    *distributed._SLURM_VARS,
    distributed._OMPI_VAR,
    *distributed._TPU_VARS,
    distributed.ENV_COORDINATOR,
    distributed.ENV_NUM_PROCESSES,
    distributed.ENV_PROCESS_ID,
  ):
    monkeypatch.delenv(name, raising=False)
  return calls


def test_initialize_is_a_noop_for_one_process(fake_jax_distributed):
  assert distributed.initialize() is False
  assert fake_jax_distributed == []


def test_initialize_starts_once(fake_jax_distributed, monkeypatch):
  monkeypatch.setenv("CINEMA_JAX_COORDINATOR", "localhost:12345")
  monkeypatch.setenv("CINEMA_JAX_NUM_PROCESSES", "2")
  assert distributed.initialize(process_id=1) is True
  assert fake_jax_distributed == [{"coordinator_address": "localhost:12345", "num_processes": 2, "process_id": 1}]
  assert distributed.initialize(process_id=1) is True  # idempotent
  assert len(fake_jax_distributed) == 1
