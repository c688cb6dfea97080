# apptgate: `make run` serves a demo, `make test` runs the whole suite.
# Both create ./.venv on first use; nothing needs to be installed by hand.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run serve migrate test lint protos check-generated pytest fuzz clean

install: $(STAMP)

$(STAMP): pyproject.toml clients/python/pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ./clients/python -e '.[dev]'
	touch $(STAMP)

## A fleet on this machine (demo/cluster.py, docs/deployment.md): a PostgreSQL primary and a
## streaming replica made with pg_basebackup, two gateways reading from the replica; Ctrl-C
## stops and removes everything.
.PHONY: cluster
cluster: install
	$(PY) -m demo.cluster

## Serve the demo: embedded PostgreSQL unless DATABASE_URL is set, migrations,
## demo data, both listeners, and grpcurl commands to paste.
run: install
	$(PY) -m service demo

migrate: install
	$(PY) -m service migrate

## The whole suite: generated code up to date, lint, types, then the tests on a
## real PostgreSQL (DATABASE_URL when set, else an embedded one).
test: lint lint-clients lint-protos browser pytest

## Chromium, which reads the patient's history page back in a test
## (tests/integration/test_patient_history.py; skipped without it), and poppler-utils,
## whose pdftotext and pdftoppm read the breach dossier's PDF back
## (tests/integration/test_breach_dossier.py, test_incident.py): each installed from the
## distribution's packages when missing and this runs as root with apt-get.
.PHONY: browser
browser:
	@if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; \
	else echo "chromium not found: the history page's browser test will be skipped" >&2; fi
	@if command -v pdftotext >/dev/null && command -v pdftoppm >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends poppler-utils; \
	else echo "pdftotext not found: the breach dossier's PDF tests will be skipped" >&2; fi

pytest: install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install check-generated
	$(VENV)/bin/ruff check service demo tests tools bench
	$(VENV)/bin/ruff format --check service demo tests tools bench
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy bench/*.py

protos: install
	$(PY) tools/protogen.py

## Rewrite docs/configuration.md's table of variables from service/settings.py.
.PHONY: docs
docs: install
	$(PY) tools/configdoc.py

check-generated: install
	$(PY) tools/protogen.py --check
	$(PY) tools/configdoc.py --check

## Long fuzzing run: generated messages and raw frames against every RPC.
fuzz: install
	APPTGATE_FUZZ_EXAMPLES=$${APPTGATE_FUZZ_EXAMPLES:-20000} $(PY) -m pytest tests/integration/test_fuzz.py -q

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

## The client libraries and the proto contract (both run by `make test`).
.PHONY: lint-clients lint-protos node-modules
NODE_DIR := clients/typescript
NODE_STAMP := $(NODE_DIR)/node_modules/.installed
BUF := $(NODE_DIR)/node_modules/.bin/buf

## Regenerate the TypeScript stubs (clients/typescript/src/gen) after a proto change, like `make protos`.
.PHONY: protos-typescript
protos-typescript: node-modules
	cd $(NODE_DIR) && npm run --silent generate

## npm ci from the committed package-lock.json, once (again when the lock file changes).
node-modules: $(NODE_STAMP)

$(NODE_STAMP): $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	cd $(NODE_DIR) && npm ci --no-audit --no-fund --loglevel=error
	touch $(NODE_STAMP)

## ruff and mypy --strict on the Python client and its example; the TypeScript client's
## generated code up to date (buf generate) and type-checked (tsc).
lint-clients: install node-modules
	$(VENV)/bin/ruff check clients/python
	$(VENV)/bin/ruff format --check clients/python
	$(VENV)/bin/mypy --strict clients/python/src/apptgate_client clients/python/examples
	cd $(NODE_DIR) && npm run --silent check-generated
	cd $(NODE_DIR) && npm run --silent typecheck

## buf lint, and buf breaking against the protos of the previous commit (see tools/check_protos.sh).
lint-protos: node-modules
	sh tools/check_protos.sh $(BUF)

## Benchmarks (bench/README.md): the gateway against a naive handler and the bare
## transport, side by side, with h2load; results in bench/results/. The default
## suite runs one server process per variant (~10 minutes), then ListAppointments and
## GetAppointment with the default number of processes, one per CPU (~2 minutes, a
## report of its own). BENCH_ARGS adds to the first, for example
## BENCH_ARGS="--with-10m --ledger --profile"; BENCH_WORKERS_ARGS replaces the second's.
BENCH_WORKERS_ARGS ?= --sizes 100k --scenarios list,get --variants gateway,naive,bare --concurrency 16,64
.PHONY: bench
bench: install
	command -v h2load >/dev/null || (apt-get update && apt-get install -y nghttp2-client)
	$(PY) -m pip install --quiet -r bench/requirements.txt
	$(PY) bench/run.py $(BENCH_ARGS)
	$(PY) bench/run.py --workers $$(nproc) $(BENCH_WORKERS_ARGS)

## Change-feed fan-out (bench/feed_fanout.py): 1,000 WatchAppointments streams on one
## gateway process; commit-to-delivery latency, memory and idle queries per second, in
## bench/results/<date>-feed.* (docs/change-feed.md). FEED_ARGS="--scenarios spread" for one.
.PHONY: bench-feed
bench-feed: install
	$(PY) -m pip install --quiet -r bench/requirements.txt
	$(PY) bench/feed_fanout.py $(FEED_ARGS)

## Reads on a streaming replica (bench/replica.py): a PostgreSQL primary and a replica made
## for the run (demo/cluster.py); the primary's CPU per ListAppointments and GetAppointment
## with the reads on the replica, all on the primary, and the naive handler's, side by side;
## bench/results/<date>-replica.* (docs/performance.md). REPLICA_ARGS="--rounds 1" for a quick one.
REPLICA_ARGS ?= --rounds 3 --whatif norecord
.PHONY: bench-replica
bench-replica: install
	command -v h2load >/dev/null || (apt-get update && apt-get install -y nghttp2-client)
	$(PY) bench/replica.py $(REPLICA_ARGS)

## Soak (bench/soak.py): ten minutes of fixed-rate mixed traffic against one gateway
## process; RSS growth and p99 drift are the verdicts. Results in bench/results/<date>-soak.*.
## SOAK_ARGS="--duration 120" for a short run, "--at-commit HEAD" to measure a commit.
.PHONY: soak
soak: install
	$(PY) bench/soak.py $(SOAK_ARGS)
