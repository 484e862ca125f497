"""The command line: config printing, error exits, subcommand wiring."""

import pytest

from cinema_jax import cli


def test_config_command_prints_resolved_config(capsys):
  assert cli.main(["config", "configs/base.py:cpu8", "--config.mesh.tensor=4"]) == 0
  out = capsys.readouterr().out
  assert "tensor: 4" in out and "variant: cpu8" in out


def test_config_error_exits_2_naming_the_key(capsys):
  assert cli.main(["config", "configs/base.py", "--config.mesh.tnsor=4"]) == 2
  assert "unknown config key 'mesh.tnsor'" in capsys.readouterr().err


def test_unrecognised_arguments_are_rejected():
  with pytest.raises(SystemExit):
    cli.main(["config", "configs/base.py", "--mesh.tensor=4"])


def test_every_subcommand_is_wired(capsys):
  # Each passthrough command reaches its own parser: --help exits 0 and names the command.
  for command in ("synth", "ingest", "train", "export", "story", "eval"):
    with pytest.raises(SystemExit) as e:
      cli.main([command, "--help"])
    assert e.value.code == 0
    assert f"cinema-jax {command}" in capsys.readouterr().out
