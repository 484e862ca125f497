"""Every shipped config loads; overrides are typed; mistakes name the key or the file."""

import ml_collections
import pytest

from cinema_jax import config as config_lib
from cinema_jax.parallel import axes

SHIPPED = config_lib.shipped_configs()


def test_shipped_configs_are_found():
  assert any(spec.endswith("base.py:cpu8") for spec in SHIPPED)


@pytest.mark.parametrize("spec", SHIPPED, ids=lambda s: s.split("configs/")[-1])
def test_every_shipped_config_loads(spec):
  config = config_lib.load_config(spec)
  assert isinstance(config, ml_collections.ConfigDict)
  # Shared sections every config inherits from base.py, with values the code accepts.
  assert set(config.mesh.keys()) == set(axes.MESH_AXES)
  assert sum(v == -1 for v in config.mesh.values()) <= 1
  for name, mesh_axes in config.sharding_rules:
    assert name in axes.ALL_AXES, name
    for axis in mesh_axes if isinstance(mesh_axes, tuple) else (mesh_axes,):
      assert axis is None or axis in axes.MESH_AXES, (name, axis)
  with pytest.raises(AttributeError):  # locked: typos in code fail too
    config.no_such_field = 1


def test_overrides_apply_with_types():
  config = config_lib.load_config(
    "configs/base.py:cpu8",
    ["--config.mesh.tensor=4", "--config.attention.implementation=xla", "--config.dtype=bfloat16", "config.seed=7"],
  )
  assert config.mesh.tensor == 4 and isinstance(config.mesh.tensor, int)
  assert config.attention.implementation == "xla"
  assert config.dtype == "bfloat16" and config.seed == 7
  assert config.variant == "cpu8"


def test_bare_names_resolve_to_configs_dir():
  assert config_lib.load_config("base").variant == "default"
  assert config_lib.load_config("base.py:fsdp").mesh.fsdp == -1


@pytest.mark.parametrize(
  "override,message",
  [
    ("--config.mesh.tensr=4", r"unknown config key 'mesh.tensr': mesh has no field 'tensr' \(known: data"),
    ("--config.nope=1", r"unknown config key 'nope': the top level has no field 'nope'"),
    ("--config.mesh.tensor=abc", r"config key mesh.tensor=abc: invalid literal for int"),
    ("--config.attention.block_q=1.5", r"config key attention.block_q"),
    ("mesh.tensor", r"cannot read config override 'mesh.tensor'"),
  ],
)
def test_bad_overrides_name_the_key(override, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.load_config("configs/base.py:cpu8", [override])


def test_bad_file_or_variant():
  with pytest.raises(config_lib.ConfigError, match="config file 'configs/missing.py' not found"):
    config_lib.load_config("configs/missing.py")
  with pytest.raises(config_lib.ConfigError, match="unknown variant 'huge' of configs/base.py"):
    config_lib.load_config("configs/base.py:huge")
