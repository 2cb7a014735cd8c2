# The two commands of the quick start: `make dev` and `make test`.
# Each creates or updates the virtual environment in .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

CHROMIUM ?= /usr/bin/chromium

.PHONY: dev test lint typecheck lock clean chromium

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --constraint requirements.lock --editable '.[test]'
	touch $(STAMP)

dev: $(STAMP)
	$(BIN)/tasklease dev $(ARGS)

test: $(STAMP) chromium
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest $(ARGS)

# The browser tests (tests/browser) drive Debian's Chromium: Playwright cannot download its
# own browsers here. As root, install it from Debian's packages; otherwise they are skipped.
chromium:
	@test -x $(CHROMIUM) || [ "$$(id -u)" != 0 ] || { apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; } \
		|| echo "installing chromium from Debian's packages failed" >&2
	@test -x $(CHROMIUM) || echo "no $(CHROMIUM), and not root to install it: browser tests skipped" >&2

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
