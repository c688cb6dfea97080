# apptgate: `make run` serves a demo, `make test` runs the whole suite.
# Both create ./.venv on first use; nothing needs to be installed by hand.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run serve migrate test lint protos check-generated pytest clean

install: $(STAMP)

$(STAMP): pyproject.toml clients/python/pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ./clients/python -e '.[dev]'
	touch $(STAMP)

## Serve the demo: embedded PostgreSQL unless DATABASE_URL is set, migrations,
## demo data, both listeners, and grpcurl commands to paste.
run: install
	$(PY) -m service demo

migrate: install
	$(PY) -m service migrate

## The whole suite: generated code up to date, lint, types, then the tests on a
## real PostgreSQL (DATABASE_URL when set, else an embedded one).
test: lint pytest

pytest: install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install check-generated
	$(VENV)/bin/ruff check service tests tools
	$(VENV)/bin/ruff format --check service tests tools
	$(VENV)/bin/mypy

protos: install
	$(PY) tools/protogen.py

check-generated: install
	$(PY) tools/protogen.py --check

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
