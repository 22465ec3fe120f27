"""Async HTTP delivery to receivers that take 0, 20 and 200 ms per request,
with the concurrency a destination allows, and a per-row order check.

Each run queues N rows and one UPDATE of each (2N events, two per row) in
one transaction, or, for hot keys, 100 rows updated 199 times (20,000
events), then times COMMIT to the last response. The receiver records the
order in which each row's events arrived: an event before one of its row
that came earlier is a reordering, and the run fails. Figures are
from one run on one machine; nothing here is asserted by the test suite.

Usage: .venv/bin/python bench/http_receivers.py   (part of make bench)
"""

import heapq
import json
import os
import selectors
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from pgcluster import Cluster  # noqa: E402


class DelayedHttpReceiver:
    """HTTP/1.1 keep-alive server on 127.0.0.1, single-threaded (epoll):
    every request is answered `delay` seconds after it arrived, however
    many are waiting, like a handler that awaits a 20 ms database call.
    `status(n)` answers the n-th request (from 1): 204, or a failure (500,
    or 429 with Retry-After: 1), whose events count as not received."""

    RESPONSE = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"
    FAILURES = {
        500: b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n",
        429: b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n",
    }

    def __init__(self, delay, status=lambda n: 204, port=0):
        self.delay = delay
        self.status = status
        self.failed = 0
        self.first_at = None
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", port))
        self.lsock.listen(1024)
        self.lsock.setblocking(False)
        self.port = self.lsock.getsockname()[1]
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.lsock, selectors.EVENT_READ, None)
        self.bufs = {}
        self.due = []  # (when, seq, conn)
        self.seq = 0
        self.arrivals = []  # (row id, v) in arrival order
        self.count = 0  # events answered
        self.requests = 0
        self.max_in_flight = 0
        self.stopped = False
        threading.Thread(target=self.loop, daemon=True).start()

    def loop(self):
        while not self.stopped:
            timeout = 0.2
            if self.due:
                timeout = max(0.0, self.due[0][0] - time.monotonic())
            for key, _ in self.sel.select(timeout):
                if key.data is None:
                    while True:
                        try:
                            c, _ = self.lsock.accept()
                        except BlockingIOError:
                            break
                        c.setblocking(False)
                        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        self.sel.register(c, selectors.EVENT_READ, True)
                        self.bufs[c] = b""
                    continue
                c = key.fileobj
                try:
                    data = c.recv(1 << 16)
                except OSError:
                    data = b""
                if not data:
                    self.sel.unregister(c)
                    self.bufs.pop(c, None)
                    c.close()
                    continue
                buf = self.bufs[c] + data
                while True:
                    head, sep, rest = buf.partition(b"\r\n\r\n")
                    if not sep:
                        break
                    length = 0
                    for line in head.split(b"\r\n"):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":", 1)[1])
                    if len(rest) < length:
                        break
                    body, buf = rest[:length], rest[length:]
                    doc = json.loads(body)
                    events = doc if isinstance(doc, list) else [doc]
                    self.seq += 1
                    if self.first_at is None:
                        self.first_at = time.monotonic()
                    status = self.status(self.seq)
                    if status == 204:
                        self.arrivals.extend((e["new"]["id"], e["new"]["v"]) for e in events)
                    heapq.heappush(self.due, (time.monotonic() + self.delay, self.seq, c, len(events),
                                              status))
                    self.max_in_flight = max(self.max_in_flight, len(self.due))
                self.bufs[c] = buf
            now = time.monotonic()
            while self.due and self.due[0][0] <= now:
                _, _, c, events, status = heapq.heappop(self.due)
                try:
                    c.sendall(self.FAILURES.get(status, self.RESPONSE))
                except OSError:
                    pass
                if status == 204:
                    self.count += events
                else:
                    self.failed += 1
                self.requests += 1

    def wait_for(self, n, timeout):
        end = time.monotonic() + timeout
        while self.count < n and time.monotonic() < end:
            time.sleep(0.002)
        return self.count

    def reordered(self):
        """Rows whose UPDATE arrived before their INSERT."""
        seen = {}
        bad = 0
        for row, v in self.arrivals:
            if seen.get(row, -1) >= v:
                bad += 1
            seen[row] = max(seen.get(row, -1), v)
        return bad

    def close(self):
        self.stopped = True
        self.lsock.close()


def run(conn, delay, options, rows, updates=1):
    rx = DelayedHttpReceiver(delay)
    url = f"http://127.0.0.1:{rx.port}/hook"
    conn.execute("DROP TABLE IF EXISTS hook_bench")
    conn.execute("CREATE TABLE hook_bench (id int PRIMARY KEY, v int)")
    if options is None:
        call = f"row_to_http('{url}', 'delivery=async')"
    else:
        conn.execute("SELECT emit.drop_destination('bench') FROM emit.stored_destinations WHERE name = 'bench'")
        conn.execute("SELECT emit.create_destination('bench', %s, %s)", (url, json.dumps(options)))
        call = "row_to_destination('bench', 'delivery=async')"
    conn.execute(f"CREATE TRIGGER out AFTER INSERT OR UPDATE ON hook_bench FOR EACH ROW EXECUTE FUNCTION {call}")
    conn.execute("BEGIN")
    conn.execute(f"INSERT INTO hook_bench SELECT g, 0 FROM generate_series(1, {rows}) g")
    for v in range(1, updates + 1):
        conn.execute(f"UPDATE hook_bench SET v = {v}")
    events = rows * (1 + updates)
    t = time.perf_counter()
    conn.execute("COMMIT")
    got = rx.wait_for(events, timeout=300)
    elapsed = time.perf_counter() - t
    rx.close()
    if got != events:
        raise SystemExit(f"delay {delay}: receiver answered {got} of {events}")
    return events / elapsed, rx.requests / elapsed, rx.reordered(), rx.max_in_flight


# name, seconds per request, stored options (None: row_to_http with a
# URL), rows, updates of each row (events: rows × (1 + updates)), target
# events/s.
SCENARIOS = [
    ("0 ms receiver, defaults", 0.0, None, 10_000, 1, 20_000),
    ("20 ms receiver, defaults (concurrency 32)", 0.02, None, 1_000, 1, 1_000),
    ("20 ms receiver, concurrency 64", 0.02, {"concurrency": 64}, 1_000, 1, 2_500),
    ("20 ms receiver, batch 100", 0.02, {"batch": 100}, 10_000, 1, 15_000),
    ("200 ms receiver, concurrency 256", 0.2, {"concurrency": 256}, 1_000, 1, 1_000),
    # Hot keys: a hundred rows updated 199 times each.
    ("20 ms receiver, hot keys, batch 50, concurrency 64", 0.02, {"batch": 50, "concurrency": 64},
     100, 199, 15_000),
]


def main():
    cluster = Cluster("pg_emit-bench-http", port=54333)
    cluster.init().start()
    results = []
    try:
        with cluster.connect() as conn:
            conn.execute("CREATE EXTENSION pg_emit")
            for name, delay, options, rows, updates, target in SCENARIOS:
                rate, reqs, bad, peak = run(conn, delay, options, rows, updates)
                results.append((name, rows * (1 + updates), rate, reqs, bad, peak, target))
                print(f"  measured {name}: {rate:,.0f} events/s, {reqs:,.0f} req/s, {bad} reordered, "
                      f"peak {peak} in flight", file=sys.stderr)
    finally:
        cluster.destroy()
    print(f"\nasync HTTP, INSERT then UPDATEs of each row in one transaction, "
          f"COMMIT to last response, {os.cpu_count()} cores\n")
    print("| receiver | events | events/s | requests/s | peak in flight | rows reordered | target (events/s) | met |")
    print("|---|---|---|---|---|---|---|---|")
    for name, events, rate, reqs, bad, peak, target in results:
        ok = rate >= target and bad == 0
        print(f"| {name} | {events:,} | {rate:,.0f} | {reqs:,.0f} | {peak} | {bad} | ≥ {target:,} | "
              f"{'yes' if ok else 'NO'} |")
    return results


if __name__ == "__main__":
    main()
