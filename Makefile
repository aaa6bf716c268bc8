# Two commands for a new user on Debian/Ubuntu with Python 3.11+: `make test` and `make demo`.
# Each installs whatever is missing first (scripts/ensure_env.sh), then runs.

SHELL := /bin/bash
PYTHON ?= python3
# Outside the clone, keyed by the pins: every clone on this machine reuses the same 5.6 GB install.
VENV ?= $(HOME)/.cache/helip/venv-$(shell sha1sum requirements.txt | cut -c1-10)
PYTEST_ARGS ?=

# One OpenMP thread: on 2 shared cores torch's default threads starve each other, 4-5x slower
# (measured on this project's 2-core machines). Offline hub: an open_clip weight lookup would otherwise stall 46 s on DNS retries.
export OMP_NUM_THREADS := 1
export HF_HUB_OFFLINE := 1

.PHONY: env lint test demo bench clean

env:
	@VENV="$(VENV)" PYTHON="$(PYTHON)" ./scripts/ensure_env.sh

# ruff (pycodestyle, pyflakes, isort, bugbear, pyupgrade) over the whole tree, mypy over core/ and api/
# (configuration in pyproject.toml); `make test` runs them first.
lint: env
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

demo: env
	$(VENV)/bin/helip demo

# The CPU benchmarks (docs/benchmarks.md): `make bench BENCH=mining` for one, BENCH_ARGS passed to each.
BENCH ?= step mining data e2e jobpath cache
bench: env
	@set -e; for b in $(BENCH); do echo "[helip] bench.$$b"; $(VENV)/bin/python -m bench.$$b $(BENCH_ARGS); done

# Local state and caches of this clone; the shared venv stays (delete $(VENV) by hand to rebuild it).
clean:
	rm -rf .helip .pytest_cache build dist runs *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
