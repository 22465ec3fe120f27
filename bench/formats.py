"""What each format= costs per event, beside json, on one throwaway cluster;
then what columns=, exclude= and unchanged=skip cost.

For each format: a 100,000-row INSERT with a sync ndjson trigger (the
backend makes and sends every event), the same with delivery=async (the
backend makes and queues them), and the worker's delivery of a 200,000-event
backlog to a TCP receiver (it numbers and sends them). Every run checks
that the receiver got every event. Figures are from one run on one
machine; nothing here is asserted by the test suite.

The options: the same sync INSERT with `columns=id,note` and with
`exclude=at` beside none, and a 100,000-row UPDATE that changes only the
`at` column with `exclude=at, unchanged=skip` (every event skipped) beside
`unchanged=send` (every event sent). Formats take turns
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


def insert(conn, fmt, mode, rows, opts=()):
    """Seconds for one INSERT of `rows` rows (sync: until sent; async:
    until queued), and seconds from COMMIT until the receiver has them."""
    rx = CountingReceiver(ndjson=True)
    try:
        conn.execute("DROP TABLE IF EXISTS bench")
        conn.execute("CREATE TABLE bench (id int PRIMARY KEY, note text, at timestamptz)")
        extra = "".join(f", '{o}'" for o in opts)
        conn.execute(
            "CREATE TRIGGER out AFTER INSERT ON bench FOR EACH ROW EXECUTE FUNCTION "
            f"row_to_socket('127.0.0.1', {rx.port}, 'framing=ndjson', 'format={fmt}', "
            f"'delivery={mode}'{extra})"
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


def update(conn, unchanged, rows):
    """Seconds for one sync UPDATE of `rows` rows that changes only a column
    the events leave out."""
    rx = CountingReceiver(ndjson=True)
    try:
        conn.execute("DROP TABLE IF EXISTS bench")
        conn.execute("CREATE TABLE bench (id int PRIMARY KEY, note text, at timestamptz)")
        conn.execute(f"INSERT INTO bench SELECT g, 'note ' || g, now() FROM generate_series(1, {rows}) g")
        conn.execute(
            "CREATE TRIGGER out AFTER UPDATE ON bench FOR EACH ROW EXECUTE FUNCTION "
            f"row_to_socket('127.0.0.1', {rx.port}, 'framing=ndjson', 'delivery=sync', "
            f"'exclude=at', 'unchanged={unchanged}')"
        )
        conn.execute("VACUUM bench")
        conn.execute("CHECKPOINT")
        t = time.perf_counter()
        conn.execute("UPDATE bench SET at = at + interval '1 s'")
        took = time.perf_counter() - t
        want = rows if unchanged == "send" else 0
        if rx.wait_for(want, timeout=300) != want or rx.wait_for(want + 1, timeout=0.5) != want:
            raise SystemExit(f"unchanged={unchanged}: receiver got {rx.count} events, wanted {want}")
        return took
    finally:
        rx.close()


OPTIONS = {
    "none": lambda conn: insert(conn, "json", "sync", ROWS)[0],
    "columns=id,note": lambda conn: insert(conn, "json", "sync", ROWS, ["columns=id,note"])[0],
    "exclude=at": lambda conn: insert(conn, "json", "sync", ROWS, ["exclude=at"])[0],
    "UPDATE, unchanged=send": lambda conn: update(conn, "send", ROWS),
    "UPDATE, unchanged=skip": lambda conn: update(conn, "skip", ROWS),
}


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
            option_runs = {name: [] for name in OPTIONS}
            for _ in range(REPEAT):
                for name, run in OPTIONS.items():
                    option_runs[name].append(run(conn))
            options = {name: statistics.median(m) for name, m in option_runs.items()}
            print(f"  measured options: {option_runs}", file=sys.stderr)
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
    print(f"\nwhat a row event carries, sync ndjson, json format, median of {REPEAT} runs\n")
    print("| trigger options | µs/row | × without (none, or unchanged=send) |")
    print("|---|---:|---:|")
    for name, took in options.items():
        ref = options["UPDATE, unchanged=send"] if name.startswith("UPDATE") else options["none"]
        print(f"| {name} | {took / ROWS * 1e6:.2f} | {took / ref:.2f} |")


if __name__ == "__main__":
    main()
