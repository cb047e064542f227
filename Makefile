# The front door. Every target creates .venv and installs what it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
SEEDS  ?= 200

.PHONY: install dev node-deps test lint typecheck pytest demo bench soak fuzz clean ray-slow load-ray

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install --quiet -e '.[fast,plot]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(PIP) install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed

# Azurite (the Azure Blob emulator the object-store tests start) from the npm registry,
# beside the virtualenv, where tests/support/emulators.py looks for it.
$(VENV)/node/node_modules/.bin/azurite-blob: | $(BIN)/python
	npm install --prefix $(VENV)/node --no-audit --no-fund --silent azurite@3

install: $(VENV)/.installed
dev: $(VENV)/.installed-dev
node-deps: $(VENV)/node/node_modules/.bin/azurite-blob

lint: dev
	$(BIN)/ruff check asyncpager tests scripts
	$(BIN)/ruff format --check asyncpager tests scripts

typecheck: dev
	$(BIN)/mypy

pytest: dev node-deps
	$(BIN)/python -m pytest -W error

test: lint typecheck pytest

demo: install
	$(BIN)/python -m asyncpager demo

bench: dev node-deps
	$(BIN)/python scripts/bench_hit_path.py
	$(BIN)/python scripts/bench_open.py
	$(BIN)/python scripts/bench_read.py
	$(BIN)/python scripts/bench_decode.py
	$(BIN)/python scripts/bench_import.py
	$(BIN)/python scripts/bench_torch.py
	$(BIN)/python scripts/bench_moe.py
	$(BIN)/python scripts/bench_dequant.py
	$(BIN)/python scripts/bench_gguf.py
	$(BIN)/python scripts/bench_remote.py
	$(BIN)/python scripts/bench_emulators.py
	$(BIN)/python scripts/bench_capped.py

# Long runs, not part of `make test`.
soak: dev
	ASYNCPAGER_SOAK_SEEDS=$(SEEDS) $(BIN)/python -m pytest -W error -m slow tests/pager/test_chaos.py

fuzz: dev
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest -W error --timeout 0 tests/formats/test_format_fuzz.py tests/pager/test_state_machine.py tests/pager/test_api_state_machine.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis

# Ray Serve: the slow scenarios (a replica killed under load, the drain) and the load test.
ray-slow: dev
	$(BIN)/python -m pytest -W error -m slow tests/serve/test_ray_failure.py

load-ray: dev
	$(BIN)/python scripts/load_ray.py
