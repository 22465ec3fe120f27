# pg_emit: the two commands a newcomer needs are `make demo` and `make test`.
# Both install what is missing (scripts/setup.sh) and work as root or as a
# user with sudo on a fresh Debian bookworm machine.

PG_CONFIG := /usr/lib/postgresql/15/bin/pg_config
ROOT      := $(shell id -u)
# As root, initdb must run as the postgres user; otherwise pgrx needs sudo
# to copy the extension into PostgreSQL's directories.
RUNAS     := $(if $(filter 0,$(ROOT)),--runas postgres --pgdata /tmp/pg_emit-pgtest,)
SUDO      := $(if $(filter 0,$(ROOT)),,--sudo)

.PHONY: setup demo test lint unit pgtest install install-release itest bench clean

setup:
	@bash scripts/setup.sh

## make demo: build, start a throwaway cluster and a receiver, show events.
demo: setup install-release
	.venv/bin/python examples/demo.py

## make test: every test (lint, unit, #[pg_test], pg_regress, integration).
test: setup lint unit pgtest install itest

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --features pg_test -- -D warnings
	.venv/bin/python -m pyflakes tests bench examples

unit:
	cargo test -p pg_emit_core

pgtest:
	cargo pgrx test pg15 $(RUNAS)

install:
	cargo pgrx install $(SUDO) --pg-config $(PG_CONFIG)

install-release:
	cargo pgrx install --release $(SUDO) --pg-config $(PG_CONFIG)

itest:
	.venv/bin/pytest -q tests

clean:
	cargo clean
	rm -rf .venv /tmp/pg_emit-pgtest

## make bench: the side-by-side benchmark (release build).
bench: setup install-release
	.venv/bin/python -c 'import matplotlib' 2>/dev/null || .venv/bin/pip install -q matplotlib
	.venv/bin/python bench/bench.py
	.venv/bin/python bench/small_tx.py
	.venv/bin/python bench/http_receivers.py
	.venv/bin/python bench/formats.py
	.venv/bin/python bench/redis_streams.py
	.venv/bin/python bench/nats_jetstream.py
	.venv/bin/python bench/kafka.py
