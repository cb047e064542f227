# The front door. Every target creates .venv and installs what it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
SEEDS  ?= 200

.PHONY: install dev test lint typecheck pytest demo bench soak fuzz clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install --quiet -e '.[fast,plot]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(PIP) install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
dev: $(VENV)/.installed-dev

lint: dev
	$(BIN)/ruff check asyncpager tests scripts
	$(BIN)/ruff format --check asyncpager tests scripts

typecheck: dev
	$(BIN)/mypy

pytest: dev
	$(BIN)/python -m pytest -W error

test: lint typecheck pytest

demo: install
	$(BIN)/python -m asyncpager demo

bench: dev
	$(BIN)/python scripts/bench_hit_path.py
	$(BIN)/python scripts/bench_open.py
	$(BIN)/python scripts/bench_read.py
	$(BIN)/python scripts/bench_decode.py
	$(BIN)/python scripts/bench_import.py
	$(BIN)/python scripts/bench_torch.py
	$(BIN)/python scripts/bench_remote.py
	$(BIN)/python scripts/bench_capped.py

# Long runs, not part of `make test`.
soak: dev
	ASYNCPAGER_SOAK_SEEDS=$(SEEDS) $(BIN)/python -m pytest -W error -m slow tests/pager/test_chaos.py

fuzz: dev
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest -W error tests/formats/test_format_fuzz.py tests/pager/test_state_machine.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
