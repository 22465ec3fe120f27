"""Brokers as deployed: async delivery of one backlog per sink with and
without TLS (and SASL SCRAM for Kafka), and Kafka with each compression
codec, on the same machine, to the same servers the tests run (redis-server
--tls-port, nats-server --tls, tansu behind a TLS and SASL gate written in
Python, whose own cost is part of the Kafka TLS figures). Figures are from
one run on one machine; nothing here is asserted by the test suite.

Usage: .venv/bin/python bench/brokers_tls.py   (part of make bench)
"""

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import conftest  # noqa: E402
from pgcluster import Cluster  # noqa: E402
from receivers import KafkaGate, KafkaServer, NatsServer, RedisServer  # noqa: E402

EVENTS = int(os.environ.get("BENCH_EVENTS", "50000"))
REPEAT = int(os.environ.get("BENCH_REPEAT", "3"))


def backlog(conn, dest, n, delivered):
    """Seconds from COMMIT of `n` events to `dest` until `delivered()`
    counts them all."""
    conn.execute("DROP TABLE IF EXISTS bench")
    conn.execute("CREATE TABLE bench (id int PRIMARY KEY, note text)")
    conn.execute("CREATE TRIGGER out AFTER INSERT ON bench FOR EACH ROW EXECUTE FUNCTION "
                 f"row_to_destination('{dest}', 'delivery=async')")
    conn.execute(f"INSERT INTO bench SELECT g, repeat('note ', 20) || g FROM generate_series(1, {n}) g")
    t = time.perf_counter()
    while conn.execute("SELECT count(*) FROM emit.outbox").fetchone()[0] > 0:
        time.sleep(0.01)
        if time.perf_counter() - t > 300:
            raise SystemExit(f"{dest}: backlog not delivered in 5 minutes")
    elapsed = time.perf_counter() - t
    got = delivered()
    if got < n:
        raise SystemExit(f"{dest}: {got} of {n} delivered")
    return elapsed


def rate(conn, name, url, options, delivered):
    conn.execute("SELECT emit.drop_destination(name) FROM emit.stored_destinations WHERE name = %s",
                 (name,))
    conn.execute("SELECT emit.create_destination(%s, %s, %s)", (name, url, json.dumps(options)))
    backlog(conn, name, 2_000, lambda: 2_000)  # warm-up: connections, handshakes
    times = []
    for _ in range(REPEAT):
        before = delivered()
        times.append(backlog(conn, name, EVENTS, lambda: delivered() - before))
    return EVENTS / statistics.median(times)


def main():
    pki = conftest.pki.__wrapped__()
    ca = os.path.join(pki, "ca.pem")
    cluster = Cluster("pg_emit-bench-tls", port=54339)
    cluster.init().start()
    rows = []
    try:
        with cluster.connect() as conn:
            conn.execute("CREATE EXTENSION pg_emit")

            for tls in (False, True):
                r = RedisServer(tls=pki if tls else None)
                try:
                    url = f"{'rediss' if tls else 'redis'}://127.0.0.1:{r.port}/bench"
                    rows.append(("Redis Streams", "TLS" if tls else "plain", rate(
                        conn, "bench_redis", url, {"ca_file": ca} if tls else {},
                        lambda: r.client.xlen("bench"))))
                finally:
                    r.close()

            for tls in (False, True):
                n = NatsServer(tls=pki if tls else None)
                try:
                    n.add_stream("BENCH", ["bench.>"])
                    url = f"{'tls' if tls else 'nats'}://127.0.0.1:{n.port}/bench.rows"
                    rows.append(("NATS JetStream", "TLS" if tls else "plain", rate(
                        conn, "bench_nats", url, {"ca_file": ca} if tls else {},
                        lambda: n.count("BENCH"))))
                finally:
                    n.close()

            kafka_cases = [("plain", None, {}), ("TLS + SASL SCRAM-SHA-512", "gate", {
                "security_protocol": "sasl_ssl", "sasl_mechanism": "SCRAM-SHA-512",
                "username": "emit", "password": "s3cret", "ca_file": ca})]
            kafka_cases += [(f"compression={c}", None, {"compression": c})
                            for c in ("gzip", "snappy", "lz4", "zstd")]
            for label, gated, options in kafka_cases:
                gate = KafkaGate(users={"emit": "s3cret"}, mechanisms=("SCRAM-SHA-512",),
                                 tls=pki) if gated else None
                k = KafkaServer(gate=gate)
                try:
                    k.create_topic("bench")
                    url = f"kafka://{k.bootstrap}/bench"
                    rows.append(("Kafka (tansu)", label, rate(
                        conn, "bench_kafka", url, options, lambda: k.count("bench", idle=1.0))))
                finally:
                    k.close()
                    if gate:
                        gate.close()
    finally:
        cluster.destroy()
    print(f"\nBrokers with and without TLS, {EVENTS:,}-event backlog of ~120-byte rows, median of "
          f"{REPEAT}, {os.cpu_count()} cores\n")
    print("| sink | connection | events/s |")
    print("|---|---|---:|")
    for sink, label, r in rows:
        print(f"| {sink} | {label} | {r:,.0f} |")


if __name__ == "__main__":
    main()
