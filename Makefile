# Two commands: `make demo` and `make test`. Each builds the project-local virtual environment .venv from nothing the
# first time (python3 -m venv, then pip install -e '.[test]') and reuses it afterwards.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Tests run on the CPU; 8 fake devices let the sharding tests build real meshes.
TEST_ENV := JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8

.PHONY: demo test venv clean
.DELETE_ON_ERROR:

venv: $(STAMP)

$(STAMP): pyproject.toml setup.cfg
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	# The CPU build of torch first: resolved through the extra alone, pip could pick a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -c "import cinema_jax, cinema_kernels, jax, flax; print('environment ready: jax', jax.__version__, 'flax', flax.__version__)"
	touch $(STAMP)

test: $(STAMP)
	$(TEST_ENV) $(BIN)/python -m pytest

# `make demo TRAIN=1` trains both demo models on the synthetic films instead of loading demo/*.safetensors.
demo: $(STAMP)
	$(BIN)/cinema-jax demo $(if $(filter 1 true yes,$(TRAIN)),--config.demo.train=True,)

clean:
	rm -rf $(VENV) .pytest_cache
