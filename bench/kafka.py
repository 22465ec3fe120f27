"""Async delivery into a Kafka topic (3 partitions) from one 200,000-event
backlog, beside Confluent's producer (confluent-kafka, librdkafka) sending
the same records, idempotent with acks=all, to the same broker: tansu, a
Kafka-protocol broker, its log in memory. Figures are from one run on one
machine; nothing here is asserted by the test suite.

Usage: .venv/bin/python bench/kafka.py   (part of make bench)
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from pgcluster import Cluster  # noqa: E402
from receivers import KafkaServer  # noqa: E402

EVENTS = 200_000
REPEAT = int(os.environ.get("BENCH_REPEAT", "3"))


def backlog(conn, server, topic, n):
    """Seconds from COMMIT of `n` events until the topic holds them all."""
    server.create_topic(topic)
    conn.execute("DROP TABLE IF EXISTS bench")
    conn.execute("CREATE TABLE bench (id int PRIMARY KEY, note text)")
    conn.execute(
        "CREATE TRIGGER out AFTER INSERT ON bench FOR EACH ROW EXECUTE FUNCTION "
        f"row_to_destination('kafka://127.0.0.1:{server.port}/{topic}', 'delivery=async')"
    )
    conn.execute(f"INSERT INTO bench SELECT g, 'note ' || g FROM generate_series(1, {n}) g")
    t = time.perf_counter()
    while conn.execute("SELECT count(*) FROM emit.outbox").fetchone()[0] > 0:
        time.sleep(0.01)
        if time.perf_counter() - t > 300:
            raise SystemExit("backlog not delivered in 5 minutes")
    elapsed = time.perf_counter() - t
    got = server.count(topic)
    if got != n:
        raise SystemExit(f"the topic holds {got} of {n} events")
    return elapsed


def client_rate(server, topic, payload, n):
    """confluent-kafka: idempotent, acks=all, keyed records, until flushed."""
    from confluent_kafka import Producer

    server.create_topic(topic)
    p = Producer({"bootstrap.servers": server.bootstrap, "enable.idempotence": True, "acks": "all",
                  "linger.ms": 5, "queue.buffering.max.messages": n})
    t = time.perf_counter()
    for i in range(n):
        p.produce(topic, key=f"{i:016x}".encode(), value=payload, headers=[("id", f"c{i}".encode())])
        if i % 10_000 == 0:
            p.poll(0)
    if p.flush(120) != 0:
        raise SystemExit("confluent-kafka did not deliver everything")
    return n / (time.perf_counter() - t)


def main():
    cluster = Cluster("pg_emit-bench-kafka", port=54336)
    cluster.init().start()
    server = KafkaServer()
    try:
        with cluster.connect() as conn:
            conn.execute("CREATE EXTENSION pg_emit")
            backlog(conn, server, "warmup", 10_000)
            times = [backlog(conn, server, f"bench{i}", EVENTS) for i in range(REPEAT)]
        payload = b'{"id":1,"stream":"0b5e2c54-6d0f-4c8f-a1b7-5b8f0b1e3a9c","op":"INSERT",' \
                  b'"schema":"public","table":"bench","new":{"id":1,"note":"note 1"},"old":null}'
        client = statistics.median(client_rate(server, f"client{i}", payload, EVENTS)
                                   for i in range(REPEAT))
    finally:
        server.close()
        cluster.destroy()
    rate = EVENTS / statistics.median(times)
    print(f"\nKafka (tansu, in-memory log, 3 partitions), {EVENTS:,}-event backlog, median of "
          f"{REPEAT}, {os.cpu_count()} cores\n")
    print("| | events/s |")
    print("|---|---:|")
    print(f"| pg_emit worker → Kafka, idempotent, acks=all (COMMIT to last acknowledgement) | {rate:,.0f} |")
    print(f"| confluent-kafka (librdkafka), idempotent, acks=all | {client:,.0f} |")


if __name__ == "__main__":
    main()
