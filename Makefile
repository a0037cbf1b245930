# Quick start: `make demo` (set up, train the offline default) and `make test` (set up, run the tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch is pinned and installed first: an unpinned torch requirement pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint format benchmark clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	# DeepSpeed without CUDA: DS_BUILD_OPS=0 builds nothing at install time (tests/test_deepspeed.py needs it).
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet -e ".[dev,deepspeed]"
	touch $(STAMP)

demo: setup
	$(BIN)/blip-recipes train recipes/shapes/full.yaml --overwrite_output_dir true

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check blip_recipes tests benchmarks
	$(BIN)/ruff format --check blip_recipes tests benchmarks

format: setup
	$(BIN)/ruff format blip_recipes tests benchmarks
	$(BIN)/ruff check --fix blip_recipes tests benchmarks

benchmark: setup
	$(BIN)/python benchmarks/throughput.py --quick

clean:
	rm -rf $(VENV) outputs .pytest_cache
