#!/usr/bin/env bash
# The per-version part of `make test`: on each PostgreSQL version given, the
# #[pg_test]s, a debug install and the integration tests against it, then
# the version's .deb built, installed, tried and removed.
#
# Pipelined: while the integration tests of one version run (they wait on
# sockets and servers, and use a fraction of a core), the next version is
# compiled and its #[pg_test]s run, and its release build packaged, at the
# lowest CPU priority, so that the tests keep the CPU they ask for. The
# install (which may ask sudo for a password) stays in the foreground. On two cores this takes about a quarter off five versions. The
# background step's output is printed whole when it is waited for.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: test-versions.sh VERSION..." >&2; exit 2; }

prepare() { # VERSION: compile, #[pg_test]s, .deb
  local v=$1
  make --no-print-directory PG="$v" pgtest package-one
}

logs=$(mktemp -d /tmp/pg_emit-test-versions.XXXXXX)
# The background step runs in a process group of its own, ended with it.
trap 'rm -rf "$logs"; [ -z "${bg:-}" ] || kill -- "-$bg" 2>/dev/null || true' EXIT
versions=("$@")

echo "==> PostgreSQL ${versions[0]}: build, #[pg_test]s, package"
prepare "${versions[0]}"
make --no-print-directory PG="${versions[0]}" install
for i in "${!versions[@]}"; do
  v=${versions[$i]}
  next=${versions[$((i + 1))]:-}
  bg=""
  if [ -n "$next" ]; then
    setsid nice -n 19 bash -c "$(declare -f prepare); prepare $next" > "$logs/$next.log" 2>&1 < /dev/null &
    bg=$!
  fi
  echo "==> PostgreSQL $v: integration tests${next:+ (PostgreSQL $next builds meanwhile)}"
  make --no-print-directory PG="$v" itest
  echo "==> PostgreSQL $v: package"
  make --no-print-directory PG="$v" package-test-one
  if [ -n "$bg" ]; then
    status=0
    wait "$bg" || status=$?
    bg=""
    echo "==> PostgreSQL $next: build, #[pg_test]s, package (ran in the background)"
    cat "$logs/$next.log"
    [ "$status" -eq 0 ] || { echo "PostgreSQL $next: preparing failed (exit $status)" >&2; exit "$status"; }
    make --no-print-directory PG="$next" install
  fi
done
