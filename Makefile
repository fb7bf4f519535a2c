# One entry point for people and CI. Every target creates .venv and installs what it needs, so a fresh
# machine needs nothing but python3 (see README).
PYTHON     ?= python3
VENV       ?= .venv
# CPU wheel by default: an unpinned torch pulls a multi-GB CUDA build. GPU machines override, e.g.
#   make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
BIN         = $(VENV)/bin
# Tests never touch ~/.ray: Ray's token file and temp dirs go under the build tree.
export RAY_AUTH_MODE ?= disabled

.PHONY: install demo lint format test test-fast test-cluster bench clean

# torch with pip (pip finds a local copy of the CPU wheel where the machine has one; uv does not look
# there), then everything else with uv, several times pip's speed (uv from PyPI, into the venv). uv keeps
# the torch that is installed: torch-pin.txt pins it to that exact build, so a dependency that wanted
# another torch fails the install rather than pulling a CUDA build behind our back. --compile-bytecode
# writes the .pyc files as pip does; without them the first Ray processes of every run compile them.
$(BIN)/raylstm: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q uv
	$(BIN)/python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > $(VENV)/torch-pin.txt
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -c $(VENV)/torch-pin.txt -e '.[dev]'
	touch $@

install: $(BIN)/raylstm

demo: install
	$(BIN)/raylstm demo

# -rs: every skip prints its reason (under CI=true a skip fails instead: tests/conftest.py).
# The whole suite: unit + integration on one session Ray, then the tests that start their own Ray
# processes (ray start / ray up / several nodes), last and separately, because `ray stop` ends every
# Ray process it can see.
# ruff: the formatter's output is the style (`make format` applies it), and the linter's rules are in
# pyproject.toml. Part of `make test`, so CI fails on unformatted or lint-failing code.
lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: install lint
	$(BIN)/python -m pytest -q -rs -m "not cluster" -p no:cacheprovider --durations=15
	$(BIN)/python -m pytest -q -rs -m cluster -p no:cacheprovider --durations=15

test-fast: install
	$(BIN)/python -m pytest -q -rs -m "not slow and not cluster" -p no:cacheprovider

# Flags through BENCH_ARGS, e.g. `make bench BENCH_ARGS="--quick"` or `BENCH_ARGS="--with-quality"`.
bench: install
	$(BIN)/python -m bench.run_all $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info runs bench/out
