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
from receivers import Listener  # noqa: E402

ROWS = int(sys.argv[1]) if len(sys.argv) > 1 else int(os.environ.get("BENCH_ROWS", "20000"))
REPEAT = int(os.environ.get("BENCH_REPEAT", "3"))


class CountingReceiver:
    """Single-threaded epoll receiver on 127.0.0.1 that only counts
    messages (EOF-delimited or newline-delimited), so it costs the
    sender as little CPU as possible."""

    def __init__(self, ndjson, count=b"\n"):
        self.ndjson = ndjson
        self.token = count
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(4096)
        self.lsock.setblocking(False)
        self.port = self.lsock.getsockname()[1]
        self.count = 0
        self.tails = {}
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
                        # Tokens never straddle reads often enough to matter
                        # for "\n"; for row markers keep a short tail.
                        tail = self.tails.get(c, b"")
                        self.count += (tail + data).count(self.token)
                        self.tails[c] = data[-(len(self.token) - 1):] if len(self.token) > 1 else b""
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


class CountingHttpReceiver(Listener):
    """Minimal HTTP/1.1 keep-alive server on 127.0.0.1 that answers every
    request with 204 and counts them, a thread per connection (the worker
    keeps up to 32 in flight): the receiver's per-request cost bounds what
    can be measured, and http.server costs several times this."""

    RESPONSE = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"

    def __init__(self):
        self.count = 0
        self.lock = threading.Lock()
        super().__init__(backlog=64)

    def serve(self, c, seq):
        buf = b""
        while True:
            head_end = buf.find(b"\r\n\r\n")
            if head_end < 0:
                chunk = c.recv(1 << 16)
                if not chunk:
                    return
                buf += chunk
                continue
            head = buf[:head_end].lower()
            i = head.find(b"content-length:")
            length = int(head[i + 15:head.find(b"\r\n", i) if head.find(b"\r\n", i) > 0 else None]) if i >= 0 else 0
            total = head_end + 4 + length
            while len(buf) < total:
                chunk = c.recv(1 << 16)
                if not chunk:
                    return
                buf += chunk
            buf = buf[total:]
            with self.lock:
                self.count += 1
            c.sendall(self.RESPONSE)

    def wait_for(self, n, timeout=120):
        end = time.monotonic() + timeout
        while self.count < n and time.monotonic() < end:
            time.sleep(0.005)
        return self.count


# name, receiver ("eof", "ndjson", "http" or None), trigger function call,
# level ("row" or "statement").
SCENARIOS = [
    ("plain INSERT (floor)", None, None, "row"),
    ("plpython recipe", "eof", "recipe_to_socket('127.0.0.1', '{port}')", "row"),
    ("sync, conn/message", "eof", "row_to_socket('127.0.0.1', {port})", "row"),
    ("sync, ndjson", "ndjson", "row_to_socket('127.0.0.1', {port}, 'framing=ndjson')", "row"),
    ("commit, ndjson", "ndjson",
     "row_to_socket('127.0.0.1', {port}, 'framing=ndjson', 'delivery=commit')", "row"),
    ("async, ndjson (enqueue)", "ndjson",
     "row_to_socket('127.0.0.1', {port}, 'framing=ndjson', 'delivery=async')", "row"),
    ("row_to_http async (enqueue)", "http",
     "row_to_http('http://127.0.0.1:{port}/hook', 'delivery=async')", "row"),
    ("statement-level sync, ndjson", "rows",
     "row_to_socket('127.0.0.1', {port}, 'framing=ndjson')", "statement"),
    ("statement-level async (enqueue)", "rows",
     "row_to_socket('127.0.0.1', {port}, 'framing=ndjson', 'delivery=async')", "statement"),
]


def receiver(kind):
    if kind == "http":
        return CountingHttpReceiver()
    if kind == "rows":
        return CountingReceiver(ndjson=True, count=b'"new":')
    return CountingReceiver(ndjson=kind == "ndjson")


def run_one(conn, kind, trigger, level):
    rx = receiver(kind) if trigger else None
    conn.execute("DROP TABLE IF EXISTS bench")
    conn.execute("CREATE TABLE bench (id int, note text)")
    if trigger:
        call = trigger.format(port=rx.port)
        if level == "statement":
            conn.execute(
                "CREATE TRIGGER out AFTER INSERT ON bench REFERENCING NEW TABLE AS n "
                f"FOR EACH STATEMENT EXECUTE FUNCTION {call}"
            )
        else:
            conn.execute(f"CREATE TRIGGER out AFTER INSERT ON bench FOR EACH ROW EXECUTE FUNCTION {call}")
    conn.execute("CHECKPOINT")
    t = time.perf_counter()
    conn.execute(f"INSERT INTO bench SELECT g, 'note ' || g FROM generate_series(1, {ROWS}) g")
    elapsed = time.perf_counter() - t
    if rx:
        got = rx.wait_for(ROWS)
        rx.close()
        if got != ROWS:
            raise SystemExit(f"receiver got {got} of {ROWS} rows for {trigger}")
    return elapsed


class TimingReceiver(Listener):
    """ndjson receiver that records when each event (by its row id)
    arrived."""

    def __init__(self):
        self.arrived = {}
        super().__init__(backlog=16)

    def serve(self, c, seq):
        buf = b""
        while chunk := c.recv(1 << 16):
            now = time.perf_counter()
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                # {"id":N,"op":"INSERT",...,"new":{"id":K,...
                k = int(line.split(b'"new":{"id":', 1)[1].split(b",", 1)[0])
                self.arrived.setdefault(k, now)


def async_throughput(conn, events, kind):
    """Events/s from the COMMIT of one big INSERT to the last receipt, over
    TCP ndjson or HTTP keep-alive (one request per event)."""
    rx = receiver(kind)
    call = {
        "ndjson": f"row_to_socket('127.0.0.1', {rx.port}, 'framing=ndjson', 'delivery=async')",
        "http": f"row_to_http('http://127.0.0.1:{rx.port}/hook', 'delivery=async')",
    }[kind]
    conn.execute("DROP TABLE IF EXISTS bench_tp")
    conn.execute("CREATE TABLE bench_tp (id int PRIMARY KEY, note text)")
    conn.execute(f"CREATE TRIGGER out AFTER INSERT ON bench_tp FOR EACH ROW EXECUTE FUNCTION {call}")
    conn.execute("BEGIN")
    conn.execute(f"INSERT INTO bench_tp SELECT g, 'note ' || g FROM generate_series(1, {events}) g")
    t = time.perf_counter()
    conn.execute("COMMIT")
    got = rx.wait_for(events, timeout=300)
    elapsed = time.perf_counter() - t
    rx.close()
    if got != events:
        raise SystemExit(f"async throughput ({kind}): got {got} of {events}")
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


def chart(results, path):
    """Bar chart of µs/row per scenario (log scale), floor marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, _ in results]
    us = [secs / ROWS * 1e6 for _, secs in results]
    fig, ax = plt.subplots(figsize=(9, 4.8))
    colors = ["#999999", "#cc6666"] + ["#4477aa"] * (len(results) - 2)
    bars = ax.barh(names[::-1], us[::-1], color=colors[::-1])
    ax.set_xscale("log")
    ax.set_xlim(min(us) / 1.5, max(us) * 2.5)
    ax.axvline(us[0], color="#999999", linestyle="--", linewidth=1)
    ax.axvline(us[0] * 3, color="#44aa77", linestyle=":", linewidth=1, label="3 × floor")
    for b, v in zip(bars, us[::-1]):
        ax.text(v * 1.08, b.get_y() + b.get_height() / 2, f"{v:.1f} µs", va="center", fontsize=8)
    ax.set_xlabel(f"µs per row, INSERT of {ROWS:,} rows (log scale, lower is better)")
    ax.set_title("pg_emit: cost per row against a plain INSERT and the plpython recipe")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    cluster = Cluster("pg_emit-bench", port=54331)
    cluster.init().start()
    try:
        with cluster.connect() as conn:
            conn.execute("CREATE EXTENSION pg_emit")
            conn.execute("CREATE EXTENSION plpython3u")
            conn.execute(RECIPE)
            results = []
            for name, kind, trigger, level in SCENARIOS:
                times = [run_one(conn, kind, trigger, level) for _ in range(REPEAT)]
                results.append((name, statistics.median(times)))
                print(f"  measured {name}: {[round(x, 3) for x in times]}", file=sys.stderr)
            tcp = statistics.median(async_throughput(conn, 200_000, "ndjson") for _ in range(REPEAT))
            http = statistics.median(async_throughput(conn, 20_000, "http") for _ in range(REPEAT))
            rate, p50, p99 = async_latency(conn, 1000, 5)
    finally:
        cluster.destroy()
    t = dict(results)
    floor, recipe = t["plain INSERT (floor)"], t["plpython recipe"]
    print(f"\n{ROWS:,} rows per INSERT, median of {REPEAT} runs, {os.cpu_count()} cores\n")
    print(f"| {'scenario':<32} | {'seconds':>8} | {'µs/row':>7} | {'× floor':>8} | {'× recipe':>9} |")
    print(f"|{'-' * 34}|{'-' * 10}|{'-' * 9}|{'-' * 10}|{'-' * 11}|")
    for name, secs in results:
        print(
            f"| {name:<32} | {secs:>8.3f} | {secs / ROWS * 1e6:>7.2f} | {secs / floor:>8.1f} | "
            f"{secs / recipe:>9.3f} |"
        )
    print()
    print(f"- async delivery, TCP ndjson (200,000 events, COMMIT to last receipt): {tcp:,.0f} events/s")
    print(f"- async delivery, HTTP keep-alive (20,000 requests, one per event): {http:,.0f} requests/s")
    print(f"- async commit-to-receipt latency at {rate:,.0f} single-row commits/s: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    sync_nd = t["sync, ndjson"]
    targets = [
        ("sync ndjson ≥ 20× faster than the plpython recipe", recipe / sync_nd >= 20, f"{recipe / sync_nd:.0f}×"),
        ("sync ndjson within 3× of a plain INSERT", sync_nd / floor <= 3, f"{sync_nd / floor:.1f}×"),
        ("async enqueue within 3× of a plain INSERT", t["async, ndjson (enqueue)"] / floor <= 3,
         f"{t['async, ndjson (enqueue)'] / floor:.1f}×"),
        ("async delivery ≥ 1,000,000 events/s over TCP ndjson", tcp >= 1_000_000, f"{tcp:,.0f}/s"),
        ("async delivery ≥ 20,000 requests/s over HTTP", http >= 20_000, f"{http:,.0f}/s"),
        ("commit-to-receipt p99 < 20 ms at 1,000 events/s", p99 < 20, f"{p99:.2f} ms"),
    ]
    print("\n| target | measured | met |\n|---|---|---|")
    for what, ok, got in targets:
        print(f"| {what} | {got} | {'yes' if ok else 'NO'} |")
    png = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.png")
    chart(results, png)
    print(f"\nchart: {png}")


if __name__ == "__main__":
    main()
