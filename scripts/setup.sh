#!/usr/bin/env bash
# Installs everything pg_emit needs to build, test, demo and benchmark, on a
# Debian bookworm machine that may have nothing but Rust. Idempotent: each
# step is skipped when already done, so every make target can call it.
set -euo pipefail
cd "$(dirname "$0")/.."

PGRX_VERSION=0.18.1
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

# 1. Debian packages: PostgreSQL 15 with headers, plpython (the old recipe,
#    for compatibility tests and benchmarks), clang for bindgen, openssl for
#    the test CA of the HTTPS tests, redis-server and nats-server (with
#    JetStream) for the broker tests, which start their own on loopback
#    (Debian's packages also start a service where systemd runs, which the
#    tests do not use); what building PostgreSQL 17 and 18 needs, and
#    dpkg-dev for the .deb packages; chromium, headless, which the
#    live-channel tests open examples/live.html in.
pkgs=(postgresql-15 postgresql-server-dev-15 postgresql-plpython3-15 libclang-dev clang pkg-config sudo openssl redis-server nats-server
      bison flex liblz4-dev libreadline-dev zlib1g-dev python3-dev dpkg-dev chromium)
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
  say "cargo install cargo-pgrx $PGRX_VERSION (a few minutes, once)"
  cargo install cargo-pgrx --version "$PGRX_VERSION" --locked --quiet
fi

# 3. PostgreSQL 17 and 18, built once from Debian's sources (only the one
#    asked for when PG is set), and pgrx pointed at every version here:
#    Debian's 15 and those builds (no download by pgrx).
for v in ${PG:-15 17 18}; do
  if [ "$v" != 15 ] && [ ! -x "/usr/lib/postgresql/$v/bin/pg_config" ]; then
    say "PostgreSQL $v from Debian's source package (about 3 minutes, once)"
    bash scripts/build-postgres.sh "$v"
  fi
done
init=()
for v in 15 17 18; do
  if [ -x "/usr/lib/postgresql/$v/bin/pg_config" ]; then
    init+=(--pg"$v" "/usr/lib/postgresql/$v/bin/pg_config")
    grep -qs "^pg$v = " "${PGRX_HOME:-$HOME/.pgrx}/config.toml" || missing_init=1
  fi
done
if [ -n "${missing_init:-}" ]; then
  say "cargo pgrx init ${init[*]}"
  cargo pgrx init "${init[@]}" >/dev/null
fi

# 4. Python for the integration tests, demo and benchmarks.
# standardwebhooks: the official Standard Webhooks library, which the tests
# verify pg_emit's signatures with; cloudevents: the CloudEvents SDK, which
# they parse pg_emit's CloudEvents with (2.x: its cloudevents.core API);
# redis, nats-py and confluent-kafka: the Redis, NATS and Kafka clients the
# tests read back with (confluent-kafka is Confluent's, on librdkafka, whose
# wheel carries the library); websockets and httpx-sse: the WebSocket and
# Server-Sent Events clients the live-channel tests subscribe with.
if [ ! -x .venv/bin/pytest ] || ! .venv/bin/python -c 'import psycopg, pyflakes, standardwebhooks, cloudevents.core, redis, nats, confluent_kafka, websockets, httpx_sse' 2>/dev/null; then
  say "python venv with pytest, psycopg, pyflakes, standardwebhooks, cloudevents, redis, nats-py, confluent-kafka, websockets and httpx-sse"
  if ! python3 -m venv .venv 2>/dev/null; then
    $SUDO apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv .venv
  fi
  .venv/bin/pip install -q --disable-pip-version-check pytest 'psycopg[binary]' pyflakes standardwebhooks \
    'cloudevents==2.2.0' redis nats-py 'confluent-kafka==2.16.1' 'websockets==17.4' httpx 'httpx-sse==0.4.3'
fi

# 5. A Kafka-protocol broker for the Kafka tests: tansu, from crates.io
#    (Apache Kafka's own broker is a download from apache.org, which no
#    registry this machine reaches offers). Its in-memory storage engine is behind the dynostore feature.
#    About 8 minutes to build, once.
TANSU_VERSION=0.6.0
if ! tansu --version 2>/dev/null | grep -q " $TANSU_VERSION\$"; then
  say "cargo install tansu $TANSU_VERSION (about 8 minutes, once)"
  cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore --quiet
fi
