# make run: set up .venv and serve conf/gsrv.toml in the foreground. Each install also builds the spawner in C
# (setup.py; GSRV_BUILD_SPAWNER=0 leaves it out, and gsrv runs its Python spawner).
# make test: set up .venv with the test extra and run the whole suite (what CI runs).
# make unit: the in-process tier only (tests/unit: no lint, no socket, no subprocess), in seconds.
# make quick: lint and every test but those marked slow (the big transfers, the 1,000 requests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= conf/gsrv.toml

.PHONY: run test unit quick lint bench soak check clean supervise

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml setup.py gsrv/spawn/spawner.c $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml setup.py gsrv/spawn/spawner.c $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@

$(VENV)/.installed-bench: pyproject.toml setup.py gsrv/spawn/spawner.c $(BIN)/python
	$(BIN)/pip install -q -e '.[bench]'
	touch $@

run: $(VENV)/.installed
	$(BIN)/gsrv serve -c $(CONFIG)

$(VENV)/.installed-ops: pyproject.toml setup.py gsrv/spawn/spawner.c $(BIN)/python
	$(BIN)/pip install -q -e '.[ops]'
	touch $@

supervise: $(VENV)/.installed-ops
	mkdir -p .run
	$(BIN)/supervisord -c supervisord.conf

check: $(VENV)/.installed
	$(BIN)/gsrv check -c $(CONFIG)

# lint: ruff (check and format) on the whole tree, mypy --strict on gsrv/ (tests and bench are
# linted and formatted, not type-checked: they drive gevent, which ships no types, at every turn)
lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict gsrv

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

unit: $(VENV)/.installed-test
	$(BIN)/python -m pytest tests/unit -q --hypothesis-profile=unit -p no:cacheprovider $(PYTEST_ARGS)

quick: lint
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: $(VENV)/.installed-bench
	$(BIN)/python bench/guard_cost.py
	$(BIN)/python bench/admin_cost.py
	$(BIN)/python bench/spawn_cost.py
	$(BIN)/python bench/bench.py $(BENCH_ARGS)

# soak: the chaos mix against one gsrv for SOAK_MINUTES (default 10), then the chaos audit;
# writes bench/results/soak.md and soak.png
SOAK_MINUTES ?= 10
soak: $(VENV)/.installed-test $(VENV)/.installed-bench
	$(BIN)/python bench/soak.py --minutes $(SOAK_MINUTES)

clean:
	rm -rf $(VENV) build *.egg-info
