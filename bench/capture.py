"""Capture from the WAL beside triggers: what a writer pays, how fast the
worker decodes, how late events arrive, and how much WAL a slot keeps
while its receiver is down. One throwaway cluster, wal_level = logical,
fsync on. Nothing here is asserted by the test suite.

- pgbench, 8 clients, one one-row INSERT per transaction: a plain table,
  the plpgsql outbox reference, an async trigger, and a captured table
  (median of REPEAT; every event checked to have arrived).
- commit → receipt p50/p99 at 1,000 commits/s (pgbench -R 1000).
- one transaction of ROWS rows: commit → last event, and the worker's
  peak memory.
- a receiver that is down while pgbench writes for DOWN seconds: WAL
  written, WAL the slot keeps, events queued.

Usage: .venv/bin/python bench/capture.py [seconds]   (part of make bench)
"""

import json
import os
import socket
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pgcluster import BIN, Cluster, wait_until  # noqa: E402
from bench import CountingReceiver  # noqa: E402
from small_tx import PLPGSQL_OUTBOX  # noqa: E402

SECONDS = int(sys.argv[1]) if len(sys.argv) > 1 else int(os.environ.get("BENCH_SECONDS", "10"))
REPEAT = int(os.environ.get("BENCH_REPEAT", "3"))
ROWS = int(os.environ.get("BENCH_CAPTURE_ROWS", "1000000"))
DOWN = int(os.environ.get("BENCH_CAPTURE_DOWN", "60"))
CLIENTS = 8


def pgbench(cluster, script_sql, *extra, seconds=SECONDS):
    script = os.path.join(cluster.root, "bench.sql")
    with open(script, "w") as f:
        f.write(script_sql)
    os.chmod(script, 0o644)
    out = cluster.run(
        f"{BIN}/pgbench", "-n", "-h", cluster.sock, "-p", str(cluster.port), "-c", str(CLIENTS),
        "-j", "2", "-T", str(seconds), *extra, "-f", script, "postgres",
    ).stdout
    tps = float(out.split("tps = ", 1)[1].split(" ", 1)[0])
    txns = int(out.split("number of transactions actually processed: ", 1)[1].split("\n", 1)[0].split("/")[0])
    return tps, txns


def fresh_table(conn):
    for (name,) in conn.execute("SELECT name FROM emit.capture_definitions").fetchall():
        conn.execute("SELECT emit.drop_capture(%s)", (name,))
    conn.execute("DROP PUBLICATION IF EXISTS small_pub")
    conn.execute("DROP TABLE IF EXISTS small")
    conn.execute("CREATE TABLE small (id bigint, note text, at timestamptz DEFAULT clock_timestamp())")
    conn.execute("TRUNCATE naive_outbox")
    conn.execute("CHECKPOINT")


def writer_cost(cluster, conn, scenario):
    rx = CountingReceiver(ndjson=True)
    fresh_table(conn)
    url = f"tcp://127.0.0.1:{rx.port}?framing=ndjson"
    if scenario == "reference":
        conn.execute("CREATE TRIGGER out AFTER INSERT ON small FOR EACH ROW EXECUTE FUNCTION naive_outbox()")
    elif scenario == "async":
        conn.execute("CREATE TRIGGER out AFTER INSERT ON small FOR EACH ROW EXECUTE FUNCTION "
                     f"row_to_destination('{url}', 'delivery=async')")
    elif scenario == "capture":
        conn.execute("CREATE PUBLICATION small_pub FOR TABLE small")
        conn.execute("SELECT emit.create_capture('small', %s, 'small_pub')", (url,))
    tps, txns = pgbench(cluster, "INSERT INTO small (id, note) VALUES (:client_id, 'a short note');\n")
    t = time.monotonic()
    if scenario in ("async", "capture"):
        got = rx.wait_for(txns, timeout=300)
        if got != txns:
            raise SystemExit(f"{scenario}: receiver got {got} of {txns} events")
    drained = time.monotonic() - t
    rx.close()
    return tps, drained


class TimingReceiver:
    """Records, per event, the seconds between the row's insert
    (`new.at`) and its arrival."""

    def __init__(self):
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.port = self.lsock.getsockname()[1]
        self.delays = []
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(c,), daemon=True).start()

    def serve(self, c):
        buf = b""
        while True:
            data = c.recv(1 << 20)
            if not data:
                return
            now = time.time()
            buf += data
            *lines, buf = buf.split(b"\n")
            for line in lines:
                at = json.loads(line)["new"]["at"]
                self.delays.append(now - parse_ts(at))


def parse_ts(s):
    from datetime import datetime
    return datetime.fromisoformat(s).timestamp()


def latency(cluster, conn):
    rx = TimingReceiver()
    fresh_table(conn)
    conn.execute("CREATE PUBLICATION small_pub FOR TABLE small")
    conn.execute("SELECT emit.create_capture('small', %s, 'small_pub')",
                  (f"tcp://127.0.0.1:{rx.port}?framing=ndjson",))
    _, txns = pgbench(cluster, "INSERT INTO small (id, note) VALUES (:client_id, 'a short note');\n",
                      "-R", "1000")
    wait_until(lambda: len(rx.delays) >= txns, timeout=120)
    d = sorted(rx.delays)
    return txns, d[len(d) // 2] * 1000, d[int(len(d) * 0.99)] * 1000


def worker_pid(conn):
    return conn.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_emit worker' "
                        "AND datname = current_database()").fetchone()[0]


def rss_mb(pid, field="RssAnon"):
    """Private memory (RSS also counts the shared buffers it touches)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return 0.0


def one_big_transaction(conn):
    rx = CountingReceiver(ndjson=True)
    fresh_table(conn)
    conn.execute("CREATE PUBLICATION small_pub FOR TABLE small")
    conn.execute("SELECT emit.create_capture('small', %s, 'small_pub')",
                  (f"tcp://127.0.0.1:{rx.port}?framing=ndjson",))
    pid = worker_pid(conn)
    before = rss_mb(pid)
    peak = [before]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mb(pid))
            time.sleep(0.05)
    threading.Thread(target=watch, daemon=True).start()
    conn.execute(f"INSERT INTO small (id, note) SELECT g, 'a short note' FROM generate_series(1, {ROWS}) g")
    t = time.monotonic()
    got = rx.wait_for(ROWS, timeout=1200)
    took = time.monotonic() - t
    stop.set()
    rx.close()
    if got != ROWS:
        raise SystemExit(f"big transaction: receiver got {got} of {ROWS}")
    return ROWS / took, before, peak[0]


def receiver_down(cluster, conn):
    fresh_table(conn)
    conn.execute("CREATE PUBLICATION small_pub FOR TABLE small")
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    conn.execute("SELECT emit.create_capture('small', %s, 'small_pub')",
                 (f"tcp://127.0.0.1:{port}?framing=ndjson",))
    start = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
    _, txns = pgbench(cluster, "INSERT INTO small (id, note) VALUES (:client_id, 'a short note');\n",
                      seconds=DOWN)
    time.sleep(20)  # the server logs running transactions every 15 s
    written, retained, queued = conn.execute(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s), c.retained_wal_bytes, "
        "(SELECT coalesce(sum(events), 0) FROM emit.outbox WHERE port = %s) "
        "FROM emit.captures c WHERE name = 'small'", (start, port)).fetchone()
    conn.execute("DELETE FROM emit.outbox WHERE port = %s", (port,))
    return txns, float(written), float(retained), int(queued)


def main():
    cluster = Cluster("pg_emit-capture-bench", port=54331, conf={
        "fsync": "on", "max_connections": "40", "wal_level": "logical",
        "shared_preload_libraries": "'pg_emit'", "max_wal_size": "4GB",
    })
    cluster.init().start()
    try:
        with cluster.connect() as conn:
            conn.execute("CREATE EXTENSION pg_emit")
            conn.execute(PLPGSQL_OUTBOX)
            rows = []
            for name, scenario in [("plain INSERT (wal_level = logical)", "plain"),
                                   ("plpgsql outbox INSERT (reference)", "reference"),
                                   ("async trigger, ndjson", "async"),
                                   ("captured, ndjson", "capture")]:
                runs = [writer_cost(cluster, conn, scenario) for _ in range(REPEAT)]
                rows.append((name, statistics.median(r[0] for r in runs),
                             statistics.median(r[1] for r in runs)))
                print(f"  measured {name}: {[round(r[0]) for r in runs]} tps", file=sys.stderr)
            lat = latency(cluster, conn)
            big = one_big_transaction(conn)
            down = receiver_down(cluster, conn)
    finally:
        cluster.destroy()
    plain = rows[0][1]
    print(f"\npgbench, {CLIENTS} clients, one-row INSERT per transaction, {SECONDS} s, "
          f"median of {REPEAT}, fsync on, wal_level = logical, {os.cpu_count()} cores\n")
    print("| scenario | tps | × plain | backlog drained after pgbench (s) |")
    print("|---|---:|---:|---:|")
    for name, tps, drained in rows:
        print(f"| {name} | {tps:,.0f} | {tps / plain:.2f} | {drained:.1f} |")
    print(f"\ncommit → receipt at 1,000 commits/s ({lat[0]:,} events): "
          f"p50 {lat[1]:.0f} ms, p99 {lat[2]:.0f} ms")
    print(f"one transaction of {ROWS:,} rows: {big[0]:,.0f} events/s from commit to the last "
          f"event; worker private memory (RssAnon) {big[1]:.0f} MB before, {big[2]:.0f} MB at most")
    print(f"receiver down for {DOWN} s of pgbench ({down[0]:,} transactions): "
          f"{down[1] / 2**20:,.0f} MB of WAL written, {down[2] / 2**20:,.1f} MB kept by the slot, "
          f"{down[3]:,} events queued")


if __name__ == "__main__":
    main()
