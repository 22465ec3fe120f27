"""A receiver that comes back after an outage and then fails some of its
requests, as real ones do: how fast does the backlog drain, beside the same
receiver without errors?

Each run queues BACKLOG events (200 transactions) for a stored HTTP
destination (concurrency 64) whose receiver is down, keeps it down for
OUTAGE seconds (the worker's backoff grows meanwhile), then starts a 20 ms
receiver on the same port that answers a share of requests with 500, or
429 with Retry-After: 1. Drain rate: events delivered (each counted once)
from the receiver's first request to its last event. Figures are from one
run on one machine; nothing here is asserted by the test suite.

Usage: .venv/bin/python bench/error_rates.py   (part of make bench)
Environment: BENCH_OUTAGE (seconds, default 30), BENCH_BACKLOG (20000).
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from http_receivers import DelayedHttpReceiver  # noqa: E402
from pgcluster import Cluster  # noqa: E402
from receivers import free_port  # noqa: E402

OUTAGE = float(os.environ.get("BENCH_OUTAGE", "30"))
BACKLOG = int(os.environ.get("BENCH_BACKLOG", "20000"))


def every(n, *shares):
    """status(n) failing `share` percent of requests with each status, spread
    evenly (request n fails when n mod 100 falls in its band)."""
    def status(k):
        at = k % 100
        for code, share in shares:
            if at < share:
                return code
            at -= share
        return 204
    return status


SCENARIOS = [
    ("no errors", every(0)),
    ("1 % 500", every(0, (500, 1))),
    ("3 % 500 + 1 % 429 (Retry-After: 1)", every(0, (500, 3), (429, 1))),
]


def run(conn, n, name, status):
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"
    dest = f"bench{n}"
    conn.execute("DROP TABLE IF EXISTS err_bench")
    conn.execute("CREATE TABLE err_bench (id int PRIMARY KEY, v int)")
    conn.execute("SELECT emit.create_destination(%s, %s, %s)", (dest, url, json.dumps({"concurrency": 64})))
    conn.execute("CREATE TRIGGER out AFTER INSERT ON err_bench FOR EACH ROW EXECUTE FUNCTION "
                 f"row_to_destination('{dest}', 'delivery=async')")
    per_tx = BACKLOG // 200
    for t in range(200):
        conn.execute(f"INSERT INTO err_bench SELECT g, 0 FROM generate_series({t * per_tx + 1}, "
                     f"{(t + 1) * per_tx}) g")
    time.sleep(OUTAGE)
    backoff = conn.execute("SELECT failed_attempts FROM emit.stats WHERE destination = %s",
                           (dest,)).fetchone()[0]
    rx = DelayedHttpReceiver(0.02, status=status, port=port)
    deadline = time.monotonic() + 600
    while len(set(rx.arrivals)) < per_tx * 200 and time.monotonic() < deadline:
        time.sleep(0.01)
    end = time.monotonic()
    distinct = len(set(rx.arrivals))
    rate = distinct / (end - rx.first_at)
    # The last responses go out and are recorded before the receiver goes.
    while conn.execute("SELECT count(*) FROM emit.outbox WHERE destination = %s",
                       (dest,)).fetchone()[0] and time.monotonic() < deadline:
        time.sleep(0.05)
    rx.close()
    print(f"  measured {name}: {rate:,.0f} events/s, {rx.requests:,} requests, {rx.failed} failed, "
          f"{len(rx.arrivals) - distinct} resent after success, {backoff} failed attempts during the outage",
          file=sys.stderr)
    return rate, rx.requests, rx.failed, len(rx.arrivals) - distinct


def main():
    cluster = Cluster("pg_emit-bench-errors", port=54336)
    cluster.init().start()
    results = []
    try:
        with cluster.connect() as conn:
            conn.execute("CREATE EXTENSION pg_emit")
            for n, (name, status) in enumerate(SCENARIOS):
                results.append((name,) + run(conn, n, name, status))
    finally:
        cluster.destroy()
    base = results[0][1]
    print(f"\nasync HTTP after a {OUTAGE:.0f} s outage: {BACKLOG:,} events queued for a 20 ms receiver "
          f"(concurrency 64), drained with errors; {os.cpu_count()} cores\n")
    print("| receiver after the outage | events/s | × error-free | requests | failed | resent after success |")
    print("|---|---|---|---|---|---|")
    for name, rate, reqs, failed, resent in results:
        print(f"| {name} | {rate:,.0f} | {rate / base:.2f} | {reqs:,} | {failed} | {resent} |")
    return results


if __name__ == "__main__":
    main()
