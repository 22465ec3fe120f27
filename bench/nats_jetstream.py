"""Async delivery into a NATS JetStream stream from one 200,000-event
backlog, beside the NATS project's Python client (nats-py) publishing the
same messages with 256 acknowledgements awaited at once, on the same
machine. Figures are from one run on one machine; nothing here is asserted
by the test suite.

Usage: .venv/bin/python bench/nats_jetstream.py   (part of make bench)
"""

import asyncio
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from pgcluster import Cluster  # noqa: E402
from receivers import NatsServer  # noqa: E402

EVENTS = 200_000
REPEAT = int(os.environ.get("BENCH_REPEAT", "3"))


def fresh_stream(server):
    async def work(js):
        try:
            await js.delete_stream("BENCH")
        except Exception:
            pass
        await js.add_stream(name="BENCH", subjects=["bench.>"])
    server._run(work)


def backlog(conn, server, n):
    """Seconds from COMMIT of `n` events until the stream holds them all."""
    fresh_stream(server)
    conn.execute("DROP TABLE IF EXISTS bench")
    conn.execute("CREATE TABLE bench (id int PRIMARY KEY, note text)")
    conn.execute(
        "CREATE TRIGGER out AFTER INSERT ON bench FOR EACH ROW EXECUTE FUNCTION "
        f"row_to_destination('nats://127.0.0.1:{server.port}/bench.rows', 'delivery=async')"
    )
    conn.execute(f"INSERT INTO bench SELECT g, 'note ' || g FROM generate_series(1, {n}) g")
    t = time.perf_counter()
    while conn.execute("SELECT count(*) FROM emit.outbox").fetchone()[0] > 0:
        time.sleep(0.01)
        if time.perf_counter() - t > 300:
            raise SystemExit("backlog not delivered in 5 minutes")
    elapsed = time.perf_counter() - t
    got = server.count("BENCH")
    if got != n:
        raise SystemExit(f"the stream holds {got} of {n} events")
    return elapsed


def client_rate(server, payload, n):
    """nats-py: JetStream publishes with 256 acknowledgements in flight."""
    fresh_stream(server)

    async def work(js):
        t = time.perf_counter()
        sem = asyncio.Semaphore(256)

        async def one(i):
            async with sem:
                await js.publish("bench.client", payload, headers={"Nats-Msg-Id": f"c{i}"})
        await asyncio.gather(*(one(i) for i in range(n)))
        return n / (time.perf_counter() - t)
    return server._run(work)


def main():
    cluster = Cluster("pg_emit-bench-nats", port=54335)
    cluster.init().start()
    server = NatsServer()
    try:
        with cluster.connect() as conn:
            conn.execute("CREATE EXTENSION pg_emit")
            backlog(conn, server, 10_000)  # warm-up
            times = [backlog(conn, server, EVENTS) for _ in range(REPEAT)]
        payload = b'{"id":1,"stream":"0b5e2c54-6d0f-4c8f-a1b7-5b8f0b1e3a9c","op":"INSERT",' \
                  b'"schema":"public","table":"bench","new":{"id":1,"note":"note 1"},"old":null}'
        client = statistics.median(client_rate(server, payload, 50_000) for _ in range(REPEAT))
    finally:
        server.close()
        cluster.destroy()
    rate = EVENTS / statistics.median(times)
    print(f"\nNATS JetStream (file storage), {EVENTS:,}-event backlog, median of {REPEAT}, "
          f"{os.cpu_count()} cores\n")
    print("| | events/s |")
    print("|---|---:|")
    print(f"| pg_emit worker → JetStream, acknowledged (COMMIT to last PubAck) | {rate:,.0f} |")
    print(f"| nats-py, JetStream publish, 256 acks in flight | {client:,.0f} |")
    print(f"\n(target ≥ 100,000 events/s: {'met' if rate >= 100_000 else 'not met'})")


if __name__ == "__main__":
    main()
