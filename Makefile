# The two commands of the README's Quick start: `make run` and `make test`.
# Both create .venv and install the project into it first (again only when pyproject.toml changes).
VENV ?= .venv
PYTHON ?= python3
PYTEST_ARGS ?=

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test,dev,otel]'
	touch $@

.PHONY: install run test lint bench proto
install: $(VENV)/.installed

run: $(VENV)/.installed
	$(VENV)/bin/mention-indexer run

test: $(VENV)/.installed
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# Style, strict types and the one-way imports of the data path (pyproject.toml).
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check indexer
	$(VENV)/bin/ruff format --check indexer
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

bench: $(VENV)/.installed
	$(VENV)/bin/python bench/drain.py
	$(VENV)/bin/python bench/latency.py
	$(VENV)/bin/python bench/backfill.py
	$(VENV)/bin/python bench/memory.py
	$(VENV)/bin/python bench/invalidation.py

proto: $(VENV)/.installed
	$(VENV)/bin/python scripts/gen_proto.py
