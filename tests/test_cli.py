"""The command line: config printing, error exits, and the demo run end to end."""

import pytest

from cinema_jax import cli, demo
from cinema_jax import config as config_lib


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


def test_demo_runs_end_to_end():
  config = config_lib.load_config("configs/demo.py", ["--config.train.steps=8"])
  lines = []
  figures = demo.run(config, log=lines.append)
  assert figures["losses"][-1] < figures["losses"][0]
  assert figures["max_abs_diff"] < 1e-5
  assert figures["padding_rows_finite"]
  assert any("not built yet" in line for line in lines)  # the demo says what it is
