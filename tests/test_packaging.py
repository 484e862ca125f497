"""Packaging: every package folder is installed, kernels/ installs as cinema_kernels, the CLI entry point exists."""

import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_listed():
  setuptools = PYPROJECT["tool"]["setuptools"]
  mapping = setuptools["package-dir"]
  on_disk = set()
  for import_root, folder in mapping.items():
    for init in (ROOT / folder).rglob("__init__.py"):
      rel = init.parent.relative_to(ROOT / folder)
      on_disk.add(".".join((import_root, *rel.parts)))
  assert on_disk == set(setuptools["packages"])


def test_kernels_folder_installs_as_cinema_kernels():
  import cinema_kernels

  assert pathlib.Path(cinema_kernels.__file__).resolve().parent == ROOT / "kernels"
  assert PYPROJECT["tool"]["setuptools"]["package-dir"]["cinema_kernels"] == "kernels"


def test_console_script_and_extras():
  assert PYPROJECT["project"]["scripts"]["cinema-jax"] == "cinema_jax.cli:main"
  extras = PYPROJECT["project"]["optional-dependencies"]
  assert "torch==2.13.0" in extras["test"]
  assert set(extras) >= {"test", "gpu", "tpu"}


def test_readme_gives_exactly_two_commands():
  readme = (ROOT / "README.md").read_text()
  blocks = readme.split("```")[1::2]
  commands = [line.strip() for block in blocks for line in block.splitlines() if line.strip().startswith("make ")]
  assert sorted(set(commands)) == ["make demo", "make test"]
