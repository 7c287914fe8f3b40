# linernotes — set-up and entry points. `make demo` and `make test` create .venv when it is missing or older
# than pyproject.toml, install everything into it, then run.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.linernotes-installed
WORKDIR ?= ./linernotes-work
PYTEST_ARGS ?=

export GX_ANALYTICS_ENABLED := false
export RAY_DEDUP_LOGS := 0
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: install demo test test-fast bench clean distclean

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), f"linernotes needs Python 3.11, {sys.executable} is {sys.version.split()[0]}: make PYTHON=python3.11"'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip uv
	$(BIN)/uv pip install --python $(BIN)/python -e '.[dev]'
	# tinysoundfont renders the demo offline; its pyaudio dependency (live playback) is not needed.
	$(BIN)/uv pip install --python $(BIN)/python --no-deps 'tinysoundfont>=0.3.7'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/linernotes demo --workdir $(WORKDIR)

test: $(STAMP)
	$(BIN)/python -m pytest tests --ignore=tests/bench $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest tests --ignore=tests/bench --ignore=tests/e2e $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m pytest tests/bench -s -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf $(WORKDIR) .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
