# linernotes — set-up and entry points. Every target installs from the committed lock (uv.lock) and nothing else:
# `make install` syncs .venv to the lock exactly, once per change of the lock, then checks the install in seconds.
# `make lock` is the only way versions move.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.linernotes-installed
# uv itself is pinned here and installed beside the environment, never into it.
UV_VERSION := 0.13.9
UV_HOME    := .tools/uv-$(UV_VERSION)
UV         := $(UV_HOME)/bin/uv
WORKDIR ?= ./linernotes-work
# `make dagster`: the Dagster UI on 127.0.0.1, its instance (SQLite) in DAGSTER_DIR, deliveries watched in INBOX
DAGSTER_DIR  ?= .dagster
DAGSTER_PORT ?= 3000
INBOX        ?= ./inbox
PYTEST_ARGS ?=

export GX_ANALYTICS_ENABLED := false
export RAY_DEDUP_LOGS := 0
export RAY_USAGE_STATS_ENABLED := 0
# uv uses the Python named by PYTHON, never one it downloads, and syncs into VENV.
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(abspath $(VENV))

CHECK_LOCK = $(UV) lock --check --offline --python $(PYTHON) >/dev/null 2>&1 \
  || { echo 'uv.lock does not match pyproject.toml: run "make lock" and commit uv.lock' >&2; exit 1; }

.PHONY: install lock check-lock demo dagster test test-fast bench clean distclean

install: $(STAMP)

$(UV):
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), f"linernotes needs Python 3.11, {sys.executable} is {sys.version.split()[0]}: make PYTHON=python3.11"'
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --no-warn-script-location --target $(UV_HOME) uv==$(UV_VERSION)

# Re-syncs when the lock or pyproject.toml changes; a lock that no longer matches pyproject.toml stops here.
$(STAMP): uv.lock pyproject.toml | $(UV)
	@$(CHECK_LOCK)
	$(UV) sync --frozen --all-extras --compile-bytecode --python $(PYTHON)
	$(BIN)/python infra/check_install.py
	@touch $(STAMP)

check-lock: | $(UV)
	@$(CHECK_LOCK)

# Re-resolves every dependency on purpose (the only way versions move); `make lock ARGS=--upgrade` takes the newest.
lock: | $(UV)
	$(UV) lock --python $(PYTHON) $(ARGS)

demo: $(STAMP)
	$(BIN)/linernotes demo --workdir $(WORKDIR)

# The assets, inbox sensor and opt-out schedule of pipelines/orchestration.py (pyproject's [tool.dagster]); the UI and
# the daemon in one process, for one machine. LINERNOTES_SPEC picks the run spec (default infra/runs/inbox.yaml).
dagster: $(STAMP)
	@mkdir -p $(DAGSTER_DIR) $(INBOX)
	@cp infra/dagster/dev.yaml $(DAGSTER_DIR)/dagster.yaml
	DAGSTER_HOME=$(abspath $(DAGSTER_DIR)) LINERNOTES_INBOX=$(abspath $(INBOX)) \
	  $(BIN)/dagster dev --host 127.0.0.1 --port $(DAGSTER_PORT)

test: $(STAMP)
	$(BIN)/python -m pytest tests --ignore=tests/bench $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest tests --ignore=tests/bench --ignore=tests/e2e $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m pytest tests/bench -s -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf $(WORKDIR) $(DAGSTER_DIR) .pytest_cache
	find . \( -path ./.venv -o -path ./.tools -o -path ./.git \) -prune -o -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) .tools
