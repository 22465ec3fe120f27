"""Many small concurrent transactions: pgbench, 8 clients, one one-row
INSERT per transaction, side by side with a plain INSERT, on one throwaway
cluster with fsync on (commits wait for the WAL flush, as in production).

Each scenario runs REPEAT times; medians are printed with the WAL each
transaction wrote, and the async scenario checks that the receiver got
every event. Nothing here is asserted by the test suite.

The plpgsql outbox runs twice: alone (what writers pay for an outbox row)
and with the simplest consumer there is (one session deleting the oldest
1,000 rows and writing their payloads to the receiver, no ids, no order
across retries): an async outbox is consumed on the same cores as its
writers, so that is the figure to hold pg_emit's async against.

Usage: .venv/bin/python bench/small_tx.py [seconds]   (part of make bench)
"""

import os
import socket
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pgcluster import BIN, Cluster  # noqa: E402
from bench import CountingReceiver  # noqa: E402

SECONDS = int(sys.argv[1]) if len(sys.argv) > 1 else int(os.environ.get("BENCH_SECONDS", "10"))
REPEAT = int(os.environ.get("BENCH_REPEAT", "3"))
CLIENTS = 8

# A plpgsql trigger doing its own outbox INSERT: the naive reference that
# native code has to beat.
PLPGSQL_OUTBOX = """
CREATE TABLE naive_outbox (id bigserial PRIMARY KEY, payload jsonb NOT NULL,
                           created_at timestamptz NOT NULL DEFAULT now());
CREATE FUNCTION naive_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO naive_outbox (payload) VALUES (pg_catalog.to_jsonb(NEW));
  RETURN NULL;
END $$;
"""

SCENARIOS = [
    ("plain INSERT", None),
    ("plpgsql outbox INSERT (reference)", "naive_outbox()"),
    ("plpgsql outbox + a consumer (reference)", "naive_outbox() consumed"),
    ("async, ndjson", "row_to_socket('127.0.0.1', {port}, 'framing=ndjson', 'delivery=async')"),
    ("commit, ndjson", "row_to_socket('127.0.0.1', {port}, 'framing=ndjson', 'delivery=commit')"),
    ("sync, ndjson", "row_to_socket('127.0.0.1', {port}, 'framing=ndjson')"),
]


def consume(cluster, port, stop):
    """The simplest outbox consumer: take the oldest rows, send their
    payloads, commit; poll every 2 ms when there is nothing."""
    sock = socket.create_connection(("127.0.0.1", port))
    with cluster.connect() as conn:
        while True:
            with conn.transaction():
                rows = conn.execute(
                    "DELETE FROM naive_outbox WHERE id IN "
                    "(SELECT id FROM naive_outbox ORDER BY id LIMIT 1000) RETURNING payload::text"
                ).fetchall()
                if rows:
                    sock.sendall("".join(r[0] + "\n" for r in rows).encode())
            if not rows:
                if stop.is_set():
                    break
                time.sleep(0.002)
    sock.close()


def run(cluster, conn, trigger):
    rx = CountingReceiver(ndjson=True)
    conn.execute("DROP TABLE IF EXISTS small")
    conn.execute("CREATE TABLE small (id bigint, note text)")
    consumer = None
    if trigger and trigger.endswith(" consumed"):
        trigger = trigger.removesuffix(" consumed")
        stop = threading.Event()
        consumer = threading.Thread(target=consume, args=(cluster, rx.port, stop))
    if trigger:
        call = trigger.format(port=rx.port)
        conn.execute(f"CREATE TRIGGER out AFTER INSERT ON small FOR EACH ROW EXECUTE FUNCTION {call}")
    conn.execute("TRUNCATE naive_outbox")
    conn.execute("CHECKPOINT")
    script = os.path.join(cluster.root, "small.sql")
    with open(script, "w") as f:
        f.write("INSERT INTO small VALUES (:client_id, 'a short note');\n")
    os.chmod(script, 0o644)
    lsn = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
    if consumer:
        consumer.start()
    out = cluster.run(
        f"{BIN}/pgbench", "-n", "-h", cluster.sock, "-p", str(cluster.port), "-c", str(CLIENTS),
        "-j", "2", "-T", str(SECONDS), "-f", script, "postgres",
    ).stdout
    tps = float(out.split("tps = ", 1)[1].split(" ", 1)[0])
    txns = int(out.split("number of transactions actually processed: ", 1)[1].split("\n", 1)[0].split("/")[0])
    wal = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", (lsn,)).fetchone()[0]
    if consumer:
        stop.set()
        consumer.join()
    if consumer or (trigger and "naive" not in trigger):
        got = rx.wait_for(txns, timeout=120)
        if got != txns:
            raise SystemExit(f"{trigger}: receiver got {got} of {txns} events")
    rx.close()
    return tps, float(wal) / txns


def main():
    cluster = Cluster("pg_emit-smalltx", port=54330, conf={"fsync": "on", "max_connections": "40"})
    cluster.init().start()
    results = []
    try:
        with cluster.connect() as conn:
            conn.execute("CREATE EXTENSION pg_emit")
            conn.execute(PLPGSQL_OUTBOX)
            for name, trigger in SCENARIOS:
                runs = [run(cluster, conn, trigger) for _ in range(REPEAT)]
                tps = statistics.median(r[0] for r in runs)
                wal = statistics.median(r[1] for r in runs)
                results.append((name, tps, wal))
                print(f"  measured {name}: {[round(r[0]) for r in runs]} tps", file=sys.stderr)
                time.sleep(1)
    finally:
        cluster.destroy()
    plain_tps, plain_wal = results[0][1], results[0][2]
    print(f"\npgbench, {CLIENTS} clients, one-row INSERT per transaction, {SECONDS} s, "
          f"median of {REPEAT}, fsync on, {os.cpu_count()} cores\n")
    print(f"| {'scenario':<34} | {'tps':>8} | {'× plain':>7} | {'WAL B/txn':>9} | {'extra WAL':>9} |")
    print(f"|{'-' * 36}|{'-' * 10}|{'-' * 9}|{'-' * 11}|{'-' * 11}|")
    for name, tps, wal in results:
        print(f"| {name:<34} | {tps:>8.0f} | {tps / plain_tps:>7.2f} | {wal:>9.0f} | {wal - plain_wal:>9.0f} |")
    return results


if __name__ == "__main__":
    main()
