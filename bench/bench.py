"""Side-by-side cost of emitting row changes, on one throwaway cluster.

The same `INSERT ... SELECT generate_series(1, N)` into a table with an int
and a text column runs with no trigger (the floor), with the plpython
recipe, and with row_to_socket in each framing. Every run checks that the
receiver got all N messages. Figures are ratios from one run on one
machine; nothing here is asserted by the test suite.

Usage: make bench  (or .venv/bin/python bench/bench.py [rows])
"""

import os
import selectors
import socket
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from pgcluster import Cluster  # noqa: E402

ROWS = int(sys.argv[1]) if len(sys.argv) > 1 else int(os.environ.get("BENCH_ROWS", "20000"))
REPEAT = int(os.environ.get("BENCH_REPEAT", "3"))


class CountingReceiver:
    """Single-threaded epoll receiver on 127.0.0.1 that only counts
    messages (EOF-delimited or newline-delimited), so it costs the
    sender as little CPU as possible."""

    def __init__(self, ndjson):
        self.ndjson = ndjson
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(4096)
        self.lsock.setblocking(False)
        self.port = self.lsock.getsockname()[1]
        self.count = 0
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.lsock, selectors.EVENT_READ, None)
        self.stopped = False
        threading.Thread(target=self.loop, daemon=True).start()

    def loop(self):
        while not self.stopped:
            for key, _ in self.sel.select(0.2):
                if key.data is None:
                    while True:
                        try:
                            c, _ = self.lsock.accept()
                        except BlockingIOError:
                            break
                        c.setblocking(False)
                        self.sel.register(c, selectors.EVENT_READ, True)
                    continue
                c = key.fileobj
                try:
                    data = c.recv(1 << 20)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    if self.ndjson:
                        self.count += data.count(b"\n")
                    continue
                self.sel.unregister(c)
                c.close()
                if not self.ndjson:
                    self.count += 1

    def wait_for(self, n, timeout=60):
        end = time.monotonic() + timeout
        while self.count < n and time.monotonic() < end:
            time.sleep(0.005)
        return self.count

    def close(self):
        self.stopped = True
        self.lsock.close()


RECIPE = """
CREATE OR REPLACE FUNCTION recipe_to_socket() RETURNS trigger AS $$
import json, socket
s = socket.create_connection((TD['args'][0], int(TD['args'][1])))
s.sendall(json.dumps(TD).encode())
s.close()
$$ LANGUAGE plpython3u
"""


def scenarios(port):
    return [
        ("plain INSERT (floor)", None, None),
        ("plpython recipe", False, f"recipe_to_socket('127.0.0.1', '{port}')"),
        ("row_to_socket sync, conn/message", False, f"row_to_socket('127.0.0.1', {port})"),
        ("row_to_socket sync, ndjson", True, f"row_to_socket('127.0.0.1', {port}, 'framing=ndjson')"),
        ("row_to_socket commit, ndjson", True,
         f"row_to_socket('127.0.0.1', {port}, 'framing=ndjson', 'delivery=commit')"),
        ("row_to_socket async (enqueue)", True,
         f"row_to_socket('127.0.0.1', {port}, 'framing=ndjson', 'delivery=async')"),
    ]


def run_one(conn, trigger, ndjson):
    rx = CountingReceiver(ndjson) if trigger else None
    conn.execute("DROP TABLE IF EXISTS bench")
    conn.execute("CREATE TABLE bench (id int, note text)")
    if trigger:
        conn.execute(
            "CREATE TRIGGER out AFTER INSERT ON bench FOR EACH ROW EXECUTE FUNCTION "
            + trigger.replace("{port}", str(rx.port)).replace("26200", str(rx.port))
        )
    conn.execute("CHECKPOINT")
    t = time.perf_counter()
    conn.execute(f"INSERT INTO bench SELECT g, 'note ' || g FROM generate_series(1, {ROWS}) g")
    elapsed = time.perf_counter() - t
    if rx:
        got = rx.wait_for(ROWS)
        rx.close()
        if got != ROWS:
            raise SystemExit(f"receiver got {got} of {ROWS} messages for {trigger}")
    return elapsed


class TimingReceiver:
    """ndjson receiver that records when each event (by its row id)
    arrived."""

    def __init__(self):
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.port = self.lsock.getsockname()[1]
        self.arrived = {}
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            threading.Thread(target=self.read, args=(c,), daemon=True).start()

    def read(self, c):
        buf = b""
        while chunk := c.recv(1 << 16):
            now = time.perf_counter()
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                # {"id":N,"op":"INSERT",...,"new":{"id":K,...
                k = int(line.split(b'"new":{"id":', 1)[1].split(b",", 1)[0])
                self.arrived.setdefault(k, now)

    def close(self):
        self.lsock.close()


def async_throughput(conn, events):
    """Events/s from the COMMIT of one big INSERT to the last receipt."""
    rx = CountingReceiver(ndjson=True)
    conn.execute("DROP TABLE IF EXISTS bench_tp")
    conn.execute("CREATE TABLE bench_tp (id int, note text)")
    conn.execute(
        "CREATE TRIGGER out AFTER INSERT ON bench_tp FOR EACH ROW EXECUTE FUNCTION "
        f"row_to_socket('127.0.0.1', {rx.port}, 'framing=ndjson', 'delivery=async')"
    )
    conn.execute("BEGIN")
    conn.execute(f"INSERT INTO bench_tp SELECT g, 'note ' || g FROM generate_series(1, {events}) g")
    t = time.perf_counter()
    conn.execute("COMMIT")
    got = rx.wait_for(events, timeout=120)
    elapsed = time.perf_counter() - t
    rx.close()
    if got != events:
        raise SystemExit(f"async throughput: got {got} of {events}")
    return events / elapsed


def async_latency(conn, rate, seconds):
    """Commit-to-receipt latency of single-row transactions at a steady rate."""
    rx = TimingReceiver()
    conn.execute("DROP TABLE IF EXISTS bench_lat")
    conn.execute("CREATE TABLE bench_lat (id int, note text)")
    conn.execute(
        "CREATE TRIGGER out AFTER INSERT ON bench_lat FOR EACH ROW EXECUTE FUNCTION "
        f"row_to_socket('127.0.0.1', {rx.port}, 'framing=ndjson', 'delivery=async')"
    )
    n = rate * seconds
    sent = {}
    start = time.perf_counter()
    for i in range(1, n + 1):
        due = start + i / rate
        while (now := time.perf_counter()) < due:
            time.sleep(min(due - now, 0.0005))
        sent[i] = time.perf_counter()
        conn.execute("INSERT INTO bench_lat VALUES (%s, 'x')", (i,))
    achieved = n / (time.perf_counter() - start)
    end = time.monotonic() + 30
    while len(rx.arrived) < n and time.monotonic() < end:
        time.sleep(0.01)
    rx.close()
    lat = sorted((rx.arrived[i] - sent[i]) * 1000 for i in sent if i in rx.arrived)
    if len(lat) != n:
        raise SystemExit(f"async latency: got {len(lat)} of {n}")
    return achieved, lat[len(lat) // 2], lat[int(len(lat) * 0.99)]


def main():
    cluster = Cluster("pg_emit-bench", port=54331)
    cluster.init().start()
    try:
        with cluster.connect() as conn:
            conn.execute("CREATE EXTENSION pg_emit")
            conn.execute("CREATE EXTENSION plpython3u")
            conn.execute(RECIPE)
            results = []
            for name, ndjson, trigger in scenarios(26200):
                times = [run_one(conn, trigger, ndjson) for _ in range(REPEAT)]
                results.append((name, statistics.median(times)))
                print(f"  measured {name}: {[round(x, 3) for x in times]}", file=sys.stderr)
            tp = statistics.median(async_throughput(conn, 200_000) for _ in range(REPEAT))
            rate, p50, p99 = async_latency(conn, 1000, 5)
    finally:
        cluster.destroy()
    floor = results[0][1]
    recipe = results[1][1]
    print(f"\n{ROWS} rows per INSERT, median of {REPEAT} runs, {os.cpu_count()} cores\n")
    print(f"| {'scenario':<34} | {'seconds':>8} | {'µs/row':>8} | {'× floor':>8} | {'× recipe':>9} |")
    print(f"|{'-' * 36}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 11}|")
    for name, secs in results:
        print(
            f"| {name:<34} | {secs:>8.3f} | {secs / ROWS * 1e6:>8.1f} | {secs / floor:>8.1f} | "
            f"{secs / recipe:>9.3f} |"
        )
    print(f"\nasync delivery throughput (200,000 events, COMMIT to last receipt, ndjson): {tp:,.0f} events/s")
    print(f"async commit-to-receipt latency at {rate:,.0f} single-row commits/s: p50 {p50:.2f} ms, p99 {p99:.2f} ms")


if __name__ == "__main__":
    main()
