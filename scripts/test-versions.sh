#!/usr/bin/env bash
# The per-version part of `make test`: on each PostgreSQL version given, the
# #[pg_test]s, a debug install and the integration tests against it, then
# the version's .deb built, installed, tried and removed.
#
# Pipelined: while the integration tests of one version run (they wait on
# sockets and servers, and use a fraction of a core), the next version is
# compiled and its #[pg_test]s run, and its release build packaged, at the
# lowest CPU and I/O priority, so that the tests keep the CPU they ask for
# (their bounds on cancels and timeouts are tight). The install (which may
# ask sudo for a password) stays in the foreground. On two cores this takes
# about a third off five versions.
#
# The tests of what does not depend on the server's version (the brokers'
# and TLS clients, the live listener, the examples' code) run on the last
# version only, which is also the one tested with nothing building beside
# it: they are a quarter of each version's integration time. (Kafka's stay
# on every version: they alone test the record keys triggers make.) The background step's output is printed
# whole when it is waited for. The last line adds up the tests run here
# (pytest's and #[pg_test]'s), for whoever reads only that.
set -euo pipefail
# Job control: the background step gets a process group of its own, to be
# ended with it, while staying in this session. A session of its own
# (setsid) would also be a scheduling group of its own wherever the kernel
# groups by session (autogroup, on by default), with an equal share of the
# CPU whatever its nice value: tests then missed their bounds.
set -m
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: test-versions.sh VERSION..." >&2; exit 2; }

prepare() { # VERSION: compile, #[pg_test]s, .deb
  local v=$1
  make --no-print-directory PG="$v" pgtest package-one
}

# Runs make with its output also kept in $logs/all, for the count.
counted() {
  make --no-print-directory "$@" 2>&1 | tee -a "$logs/all"
}

logs=$(mktemp -d /tmp/pg_emit-test-versions.XXXXXX)
trap 'rm -rf "$logs"; [ -z "${bg:-}" ] || kill -- "-$bg" 2>/dev/null || true' EXIT
versions=("$@")
once=(test_brokers test_nats test_redis test_tls test_live test_examples test_standards)

echo "==> PostgreSQL ${versions[0]}: build, #[pg_test]s, package"
prepare "${versions[0]}" 2>&1 | tee -a "$logs/all"
make --no-print-directory PG="${versions[0]}" install
for i in "${!versions[@]}"; do
  v=${versions[$i]}
  next=${versions[$((i + 1))]:-}
  bg=""
  if [ -n "$next" ]; then
    nice -n 19 ionice -c 3 bash -c "$(declare -f prepare); prepare $next" > "$logs/$next.log" 2>&1 < /dev/null &
    bg=$!
  fi
  skip=""
  if [ -n "$next" ]; then
    skip=$(printf -- '--ignore=tests/%s.py ' "${once[@]}")
    echo "==> PostgreSQL $v: integration tests but ${once[*]} (on ${versions[-1]} only)${next:+; PostgreSQL $next builds meanwhile}"
  else
    echo "==> PostgreSQL $v: integration tests"
  fi
  counted PG="$v" itest ITEST_ARGS="$skip"
  echo "==> PostgreSQL $v: package"
  counted PG="$v" package-test-one
  if [ -n "$bg" ]; then
    status=0
    wait "$bg" || status=$?
    bg=""
    echo "==> PostgreSQL $next: build, #[pg_test]s, package (ran in the background)"
    tee -a "$logs/all" < "$logs/$next.log"
    [ "$status" -eq 0 ] || { echo "PostgreSQL $next: preparing failed (exit $status)" >&2; exit "$status"; }
    make --no-print-directory PG="$next" install
  fi
done
# pytest's "N passed, M skipped in Ts" and cargo's "test result: ok. N
# passed; ..." lines, added up.
echo "PostgreSQL ${versions[*]}: every test passed"
awk '/^[0-9]+ (passed|failed|skipped)/ || /^test result: / {
       for (i = 1; i <= NF; i++) {
         n = $(i - 1) + 0
         if ($i ~ /^passed/) p += n; else if ($i ~ /^failed/) f += n; else if ($i ~ /^skipped/) s += n
       }
     }
     END { printf "total: %d passed, %d failed, %d skipped\n", p, f, s }' "$logs/all"
