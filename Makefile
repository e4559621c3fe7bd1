# The two commands of the README: `make run` (the main job) and `make test` (the whole suite).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: run test install browser postgres

# MNIST-1D, where compression has a price (digits stays the fast task of the tests). Two processes of one
# torch thread each, for the trials and then the final training: tiny convolutions run many times slower on
# two threads than on one, and two candidates trained at once take the time of one.
run: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(BIN)/autoprune search --dataset mnist1d --model mnist1d_cnn --trials 60 --jobs 2 --finalize --export exports/default

test: $(VENV)/.installed browser postgres
	$(BIN)/python -m pytest -q -rs

install: $(VENV)/.installed

# torch first, pinned to the CPU build on local disk: any other pin pulls gigabytes of CUDA packages.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

# The MLflow UI test drives Debian's chromium (never `playwright install`: nothing can be downloaded).
browser:
	@test -x /usr/bin/chromium || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

# The many-machines test runs a real PostgreSQL server on 127.0.0.1 (Debian's package; the test starts and
# stops its own cluster in a temp folder).
postgres:
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq postgresql >/dev/null; }
