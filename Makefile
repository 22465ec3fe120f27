# pg_emit: the two commands a newcomer needs are `make demo` and `make test`.
# Both install what is missing (scripts/setup.sh) and work as root or as a
# user with sudo on a fresh Debian bookworm machine.

# The PostgreSQL versions `make test` runs everything on; `PG=17 make test`
# runs on one. 15 is Debian's package; 14, 16, 17 and 18 are pinned builds
# installed by scripts/install-postgres.sh. The other targets use PG, 15
# unless told.
VERSIONS  := $(if $(PG),$(PG),14 15 16 17 18)
PG        ?= 15
PG_CONFIG  = /usr/lib/postgresql/$(PG)/bin/pg_config
ROOT      := $(shell id -u)
# As root, initdb must run as the postgres user; otherwise pgrx needs sudo
# to copy the extension into PostgreSQL's directories.
RUNAS      = $(if $(filter 0,$(ROOT)),--runas postgres --pgdata /tmp/pg_emit-pgtest-$(PG),)
SUDO      := $(if $(filter 0,$(ROOT)),,--sudo)

# In order, always: setup installs what lint and the tests use, and the
# version pipeline (scripts/test-versions.sh) does its own overlapping.
.NOTPARALLEL:

.PHONY: setup setup-demo demo test lint unit pgtest install install-release itest package package-test package-one package-test-one bench clean

# The installers run outside this make: a build they start must not inherit
# its MAKEFLAGS and MAKELEVEL (they make a nested build skip steps).
SETUP = env -u MAKEFLAGS -u MAKELEVEL -u MFLAGS PG="$(VERSIONS)" bash scripts/setup.sh

setup:
	@$(SETUP) test

setup-demo:
	@$(SETUP) demo

## make demo: build, start a throwaway cluster and a receiver, show events.
## It needs only PostgreSQL 15, cargo-pgrx and Python.
demo: PG = 15
demo: setup-demo install-release
	.venv/bin/python examples/demo.py

## make test: every test (lint, unit; then #[pg_test], pg_regress,
## integration and the package on each PostgreSQL version, the next
## version building while one is tested: scripts/test-versions.sh).
test: setup lint unit
	@bash scripts/test-versions.sh $(VERSIONS)

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --features pg_test -- -D warnings
	.venv/bin/python -m pyflakes tests bench examples

unit:
	cargo test -p pg_emit_core

pgtest:
	cargo pgrx test pg$(PG) $(RUNAS)

install:
	cargo pgrx install $(SUDO) --pg-config $(PG_CONFIG)

install-release:
	cargo pgrx install --release $(SUDO) --pg-config $(PG_CONFIG)

# ITEST_ARGS: more pytest arguments (test-versions.sh leaves some files to
# one version).
itest:
	PG_BIN=/usr/lib/postgresql/$(PG)/bin .venv/bin/pytest -q tests $(ITEST_ARGS)

## make package: a .deb per PostgreSQL version, in target/deb/.
package: setup
	@for v in $(VERSIONS); do $(MAKE) --no-print-directory PG=$$v package-one || exit 1; done

## make package-test: installs each .deb into its PostgreSQL, without what
## `make install` put there, tries it and removes it.
package-test: package
	@for v in $(VERSIONS); do $(MAKE) --no-print-directory PG=$$v package-test-one || exit 1; done

package-one:
	@bash scripts/package-deb.sh $(PG)

# package-deb.sh leaves one .deb per version; none is an error, not a skip.
package-test-one:
	@deb=$$(ls target/deb/postgresql-$(PG)-pg-emit_*.deb 2>/dev/null); \
	  [ "$$(echo $$deb | wc -w)" -eq 1 ] || { echo "package-test-one: want one .deb for $(PG) in target/deb, found: $$deb" >&2; exit 1; }; \
	  PG_BIN=/usr/lib/postgresql/$(PG)/bin PG_EMIT_PACKAGE=$$deb .venv/bin/pytest -q tests/test_packages.py

clean:
	cargo clean
	rm -rf .venv /tmp/pg_emit-pgtest-*

## make bench: the side-by-side benchmark (release build).
bench: VERSIONS := $(PG)
bench: setup install-release
	.venv/bin/python -c 'import matplotlib' 2>/dev/null || .venv/bin/pip install -q matplotlib
	.venv/bin/python bench/bench.py
	.venv/bin/python bench/small_tx.py
	.venv/bin/python bench/capture.py
	.venv/bin/python bench/http_receivers.py
	.venv/bin/python bench/error_rates.py
	.venv/bin/python bench/many_destinations.py
	.venv/bin/python bench/formats.py
	.venv/bin/python bench/redis_streams.py
	.venv/bin/python bench/nats_jetstream.py
	.venv/bin/python bench/kafka.py
	.venv/bin/python bench/brokers_tls.py
	.venv/bin/python bench/live.py
