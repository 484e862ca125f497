"""Config files: ``configs/NAME.py[:variant]`` plus ``--config.a.b=value`` overrides.

Each file in ``configs/`` defines ``get_config(arg)`` returning an ``ml_collections.ConfigDict``; ``arg`` is the text
after the colon (the variant). Loading and overriding use ``ml_collections.config_flags`` (the same semantics as
``absl`` programs: typed fields, tuples as ``(1,2)``, a locked config), wrapped so that every mistake is one
``ConfigError`` naming the key or the file.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
from collections.abc import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

# configs/ sits beside the package in a checkout (and in an editable install).
CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"
_OVERRIDE = re.compile(r"^(?:--)?(?:config\.)?(?P<key>[A-Za-z_][\w.]*)=(?P<value>.*)$", re.S)


class ConfigError(ValueError):
  """A config file, variant or override that cannot be used."""


def resolve_path(spec: str) -> tuple[pathlib.Path, str | None]:
  """``"configs/x.py:variant"`` -> (existing path, "variant"). Bare names (``x`` or ``x.py``) look in configs/."""
  path_text, _, variant = spec.partition(":")
  candidates = [pathlib.Path(path_text)]
  name = path_text if path_text.endswith(".py") else path_text + ".py"
  candidates.append(CONFIG_DIR / pathlib.Path(name).name)
  for candidate in candidates:
    if candidate.is_file():
      return candidate, (variant or None)
  raise ConfigError(f"config file {path_text!r} not found (looked at: {', '.join(map(str, candidates))})")


def _parse_overrides(overrides: Sequence[str]) -> list[tuple[str, str]]:
  parsed = []
  for text in overrides:
    match = _OVERRIDE.match(text)
    if not match:
      raise ConfigError(f"cannot read config override {text!r}; write it as --config.key.subkey=value")
    parsed.append((match["key"], match["value"]))
  return parsed


def _check_key(config: ml_collections.ConfigDict, key: str) -> None:
  node, walked = config, []
  for part in key.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)) or part not in node:
      where = ".".join(walked) or "the top level"
      known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      raise ConfigError(
        f"unknown config key {key!r}: {where} has no field {part!r}"
        + (f" (known: {', '.join(known)})" if known else "")
      )
    node = node[part]
    walked.append(part)


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads ``configs/x.py:variant`` and applies ``--config.a.b=value`` overrides; returns a locked ConfigDict."""
  path, variant = resolve_path(spec)
  pairs = _parse_overrides(overrides)
  argv = ["cinema-jax", f"--config={path}" + (f":{variant}" if variant else "")]
  argv += [f"--config.{key}={value}" for key, value in pairs]
  base = _call(argv[:2], path, variant)
  for key, _ in pairs:
    _check_key(base, key)
  return _call(argv, path, variant)


def _call(argv: list[str], path: pathlib.Path, variant: str | None) -> ml_collections.ConfigDict:
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True, sys_argv=argv)
  try:
    fv(argv)
    config = fv.config
    config.keys()  # a file that failed to import is an error object that raises on first use
  except flags.IllegalFlagValueError as e:
    text = str(e)
    if "Error whilst parsing config file" in text:  # get_config itself raised: keep its last line, the error
      last = [line for line in text.splitlines() if line.strip()][-1]
      raise ConfigError(f"{path}{':' + variant if variant else ''}: {last.strip()}") from e
    raise ConfigError(text.replace("flag --config.", "config key ")) from e
  except Exception as e:  # the config file's own code failed (bad variant, syntax error, ...)
    cause = e.__cause__ or e
    raise ConfigError(f"{path}{':' + variant if variant else ''}: {type(cause).__name__}: {cause}") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict, got {type(config).__name__}")
  return config


def import_config(name: str):
  """The module ``configs/NAME.py``, for config files that start from another (``import_config("base")``).

  Config files are loaded by path, not as a package, so they cannot ``import configs.base`` from an installed
  console script; this loads the sibling file once and caches it.
  """
  if name not in _MODULES:
    path = CONFIG_DIR / f"{name}.py"
    if not path.is_file():
      raise ConfigError(f"config file {name!r} not found at {path}")
    spec = importlib.util.spec_from_file_location(f"cinema_jax_configs.{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _MODULES[name] = module
  return _MODULES[name]


_MODULES: dict = {}


def shipped_configs() -> list[str]:
  """Every ``configs/x.py:variant`` in the repository, from each file's ``VARIANTS`` tuple."""
  specs = []
  for path in sorted(CONFIG_DIR.glob("*.py")):
    specs += [f"{path}:{v}" for v in getattr(import_config(path.stem), "VARIANTS", ())] or [str(path)]
  return specs
