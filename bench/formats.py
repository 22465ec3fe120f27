"""What each format= costs per event, beside json, on one throwaway cluster.

For each format: a 100,000-row INSERT with a sync ndjson trigger (the
backend makes and sends every event), the same with delivery=async (the
backend makes and queues them), and the worker's delivery of a 200,000-event
backlog to a TCP receiver (it numbers and sends them). Every run checks
that the receiver got every event. Figures are from one run on one
machine; nothing here is asserted by the test suite. Formats take turns
within each round, so drift in the machine's speed (this is a shared
2-core box) spreads over all of them instead of landing on one.

Usage: .venv/bin/python bench/formats.py   (part of make bench)
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from bench import CountingReceiver  # noqa: E402
from pgcluster import Cluster  # noqa: E402

ROWS = 100_000
BACKLOG = 200_000
REPEAT = int(os.environ.get("BENCH_REPEAT", "3"))
FORMATS = ["json", "td", "supabase", "debezium", "cloudevents"]


def insert(conn, fmt, mode, rows):
    """Seconds for one INSERT of `rows` rows (sync: until sent; async:
    until queued), and seconds from COMMIT until the receiver has them."""
    rx = CountingReceiver(ndjson=True)
    try:
        conn.execute("DROP TABLE IF EXISTS bench")
        conn.execute("CREATE TABLE bench (id int PRIMARY KEY, note text, at timestamptz)")
        conn.execute(
            "CREATE TRIGGER out AFTER INSERT ON bench FOR EACH ROW EXECUTE FUNCTION "
            f"row_to_socket('127.0.0.1', {rx.port}, 'framing=ndjson', 'format={fmt}', 'delivery={mode}')"
        )
        conn.execute("CHECKPOINT")
        with conn.transaction():
            t = time.perf_counter()
            conn.execute(
                f"INSERT INTO bench SELECT g, 'note ' || g, now() FROM generate_series(1, {rows}) g"
            )
            made = time.perf_counter() - t
        committed = time.perf_counter()
        got = rx.wait_for(rows, timeout=300)
        delivered = time.perf_counter() - committed
        if got != rows:
            raise SystemExit(f"format={fmt} {mode}: receiver got {got} of {rows}")
        return made, delivered
    finally:
        rx.close()


def main():
    cluster = Cluster("pg_emit-bench-formats", port=54333)
    cluster.init().start()
    results = {}
    try:
        with cluster.connect() as conn:
            conn.execute("CREATE EXTENSION pg_emit")
            insert(conn, "json", "async", ROWS)  # warm-up: caches, worker, outbox
            runs = {fmt: ([], [], []) for fmt in FORMATS}
            for _ in range(REPEAT):
                for fmt in FORMATS:
                    sync, queued, backlog = runs[fmt]
                    sync.append(insert(conn, fmt, "sync", ROWS)[0])
                    queued.append(insert(conn, fmt, "async", ROWS)[0])
                    backlog.append(insert(conn, fmt, "async", BACKLOG)[1])
            for fmt, measured in runs.items():
                results[fmt] = tuple(statistics.median(m) for m in measured)
                print(f"  measured {fmt}: {measured}", file=sys.stderr)
    finally:
        cluster.destroy()
    base = results["json"]
    print(f"\nformat= cost per event, median of {REPEAT} runs, {os.cpu_count()} cores\n")
    print("| format | sync ndjson µs/row | × json | async enqueue µs/row | × json | "
          "worker events/s | × json |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for fmt, (sync, queued, backlog) in results.items():
        print(
            f"| {fmt} | {sync / ROWS * 1e6:.2f} | {sync / base[0]:.2f} | "
            f"{queued / ROWS * 1e6:.2f} | {queued / base[1]:.2f} | "
            f"{BACKLOG / backlog:,.0f} | {base[2] / backlog:.2f} |"
        )


if __name__ == "__main__":
    main()
