# The two commands of the quick start: `make dev` and `make test`.
# Each creates or updates the virtual environment in .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: dev test lint typecheck lock clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --constraint requirements.lock --editable '.[test]'
	touch $(STAMP)

dev: $(STAMP)
	$(BIN)/tasklease dev $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# Re-pin every dependency to what resolves today.
lock:
	rm -rf /tmp/tasklease-lock && $(PYTHON) -m venv /tmp/tasklease-lock
	/tmp/tasklease-lock/bin/pip install --quiet --upgrade pip
	/tmp/tasklease-lock/bin/pip install --quiet '.[test]'
	/tmp/tasklease-lock/bin/pip freeze --exclude tasklease > requirements.lock

clean:
	rm -rf $(VENV) build *.egg-info
