"""Async delivery into a Redis stream from one 200,000-event backlog, beside
Redis's own ceiling for the same XADDs (`redis-benchmark`, pipelined as
pg_emit pipelines them) on the same machine. Figures are from one run on
one machine; nothing here is asserted by the test suite.

Usage: .venv/bin/python bench/redis_streams.py   (part of make bench)
"""

import os
import re
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from pgcluster import Cluster  # noqa: E402
from receivers import RedisServer  # noqa: E402

EVENTS = 200_000
REPEAT = int(os.environ.get("BENCH_REPEAT", "3"))


def backlog(conn, server, n):
    """Seconds from COMMIT of `n` events until the stream holds them all."""
    server.client.delete("bench")
    conn.execute("DROP TABLE IF EXISTS bench")
    conn.execute("CREATE TABLE bench (id int PRIMARY KEY, note text)")
    conn.execute(
        "CREATE TRIGGER out AFTER INSERT ON bench FOR EACH ROW EXECUTE FUNCTION "
        f"row_to_destination('redis://127.0.0.1:{server.port}/bench', 'delivery=async')"
    )
    conn.execute("SELECT pg_catalog.pg_sleep(0.5)")  # the worker is idle
    conn.execute(f"INSERT INTO bench SELECT g, 'note ' || g FROM generate_series(1, {n}) g")
    t = time.perf_counter()
    while server.client.xlen("bench") < n:
        time.sleep(0.002)
        if time.perf_counter() - t > 300:
            raise SystemExit(f"only {server.client.xlen('bench')} of {n} events arrived")
    return time.perf_counter() - t


def ceiling(server, sample):
    """redis-benchmark's XADD rate with pg_emit's entry and pipeline depth."""
    out = subprocess.run(
        ["redis-benchmark", "-h", "127.0.0.1", "-p", str(server.port), "-n", str(EVENTS),
         "-P", "512", "-q", "XADD", "ceiling", "*", "id", "evt_x_1", "event", sample],
        capture_output=True, text=True, check=True).stdout
    return float(re.findall(r"([\d.]+) requests per second", out)[-1])


def main():
    cluster = Cluster("pg_emit-bench-redis", port=54334)
    cluster.init().start()
    server = RedisServer()
    try:
        with cluster.connect() as conn:
            conn.execute("CREATE EXTENSION pg_emit")
            backlog(conn, server, 10_000)  # warm-up
            times = [backlog(conn, server, EVENTS) for _ in range(REPEAT)]
            sample = server.client.xrange("bench", count=1)[0][1][b"event"].decode()
            limit = statistics.median(ceiling(server, sample) for _ in range(REPEAT))
    finally:
        server.close()
        cluster.destroy()
    rate = EVENTS / statistics.median(times)
    print(f"\nRedis Streams, {EVENTS:,}-event backlog, median of {REPEAT}, {os.cpu_count()} cores\n")
    print("| | events/s |")
    print("|---|---:|")
    print(f"| pg_emit worker → XADD (COMMIT to last entry) | {rate:,.0f} |")
    print(f"| redis-benchmark XADD, same entry, pipeline 512 (Redis's ceiling here) | {limit:,.0f} |")
    print(f"\n(target ≥ 200,000 events/s: {'met' if rate >= 200_000 else 'not met'};"
          f" {len(sample)}-byte events)")


if __name__ == "__main__":
    main()
