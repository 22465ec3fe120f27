"""Async delivery under the faults production brings, bounded to about a
minute and a half (issue 10): concurrent writers committing, rolling back
and rolling back to savepoints; the receiver killed and restarted; the
worker terminated; the server stopped with `-m immediate` and `-m fast`.
Every committed row must arrive (lost = 0), no rolled-back row may
(phantoms = 0); duplicates are allowed (at least once) and counted.

The receiver is HTTP: a 2xx is the receiver's acknowledgement. (Over TCP,
"delivered" means the kernel took the bytes, so a receiver killed with
unread data in its socket loses it: see the README.)

The figures are written to `chaos-report.json` in the cluster directory
and printed (`pytest -s tests/test_chaos.py` shows them).
"""

import itertools
import json
import random
import threading
import time

import psycopg
import pytest

from pgcluster import Cluster, wait_until
from receivers import HttpReceiver, free_port

WRITE_SECONDS = 40
WRITERS = 4


@pytest.fixture(scope="module")
def chaos_cluster():
    c = Cluster("pg_emit-chaos", port=54337, conf={
        "shared_preload_libraries": "'pg_emit'",
        "pg_emit.retry_backoff_min": "'20ms'",
        "pg_emit.retry_backoff_max": "'300ms'",
        "max_connections": "30",
    })
    c.init().start()
    c.create_db("chaos")
    yield c
    c.destroy()


class Ledger:
    """What the writers know: rows whose COMMIT returned (committed), rows
    whose transaction rolled back, and rows whose COMMIT was cut off by a
    crash (uncertain: either outcome is right)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.committed, self.rolled_back, self.uncertain = set(), set(), set()
        self.ids = itertools.count(1)

    def next_ids(self, n):
        with self.lock:
            return [next(self.ids) for _ in range(n)]

    def add(self, kind, ids):
        with self.lock:
            getattr(self, kind).update(ids)


def writer(cluster, ledger, stop, seed):
    rnd = random.Random(seed)
    conn = None
    while not stop.is_set():
        try:
            if conn is None or conn.closed:
                conn = psycopg.connect(cluster.dsn("chaos"), autocommit=True)
            kind = rnd.random()
            conn.execute("BEGIN")
            time.sleep(0.02)
            if kind < 0.7:
                ids = ledger.next_ids(rnd.randint(1, 5) if rnd.random() < 0.98 else 300)
                conn.execute("INSERT INTO chaos SELECT unnest(%s::bigint[]), 'c'", (ids,))
                kept, undone = ids, []
            elif kind < 0.85:
                ids = ledger.next_ids(3)
                conn.execute("INSERT INTO chaos SELECT unnest(%s::bigint[]), 'r'", (ids,))
                conn.execute("ROLLBACK")
                ledger.add("rolled_back", ids)
                continue
            else:
                a, b, c = ledger.next_ids(3)
                conn.execute("INSERT INTO chaos VALUES (%s, 'a')", (a,))
                conn.execute("SAVEPOINT s")
                conn.execute("INSERT INTO chaos VALUES (%s, 'b')", (b,))
                conn.execute("ROLLBACK TO SAVEPOINT s")
                conn.execute("INSERT INTO chaos VALUES (%s, 'c')", (c,))
                kept, undone = [a, c], [b]
            ledger.add("rolled_back", undone)
            try:
                conn.execute("COMMIT")
            except psycopg.OperationalError:
                ledger.add("uncertain", kept)
                raise
            ledger.add("committed", kept)
        except psycopg.OperationalError:
            # Before COMMIT the transaction is gone with the server: rolled
            # back. Reconnect once the server is back.
            if conn is not None:
                conn.close()
            conn = None
            time.sleep(0.2)
        except psycopg.Error:
            if conn is not None:
                conn.close()
            conn = None
    if conn is not None:
        conn.close()


def test_chaos(chaos_cluster):
    c = chaos_cluster
    port = free_port()
    with c.connect("chaos") as conn:
        conn.execute("CREATE EXTENSION pg_emit")
        conn.execute("CREATE TABLE chaos (id bigint PRIMARY KEY, v text)")
        conn.execute(
            "CREATE TRIGGER out AFTER INSERT ON chaos FOR EACH ROW EXECUTE FUNCTION "
            f"row_to_http('http://127.0.0.1:{port}/chaos', 'delivery=async')")
    ledger = Ledger()
    stop = threading.Event()
    writers = [threading.Thread(target=writer, args=(c, ledger, stop, i)) for i in range(WRITERS)]
    received = []
    rx = HttpReceiver(port=port)
    faults = {"receiver kills": 0, "worker kills": 0, "immediate stops": 0, "fast stops": 0}
    resume = []  # seconds from a receiver's restart to its first event
    for w in writers:
        w.start()
    started = time.monotonic()
    try:
        step = 0
        while time.monotonic() - started < WRITE_SECONDS:
            time.sleep(2.5)
            step += 1
            if step % 4 == 1:  # the receiver dies for a second and a half
                rx.kill()
                faults["receiver kills"] += 1
                time.sleep(1.5)
                received.extend(r[3] for r in rx.requests)
                rx = HttpReceiver(port=port)
                t = time.monotonic()
                if wait_until(lambda: rx.requests, 10):
                    resume.append(round(time.monotonic() - t, 3))
            elif step % 4 == 2:
                try:
                    with c.connect("chaos") as conn:
                        n = conn.execute(
                            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                            "WHERE backend_type = 'pg_emit worker'").fetchone()[0]
                    faults["worker kills"] += n
                except psycopg.OperationalError:
                    pass
            elif step % 4 == 3:
                mode = "immediate" if faults["immediate stops"] <= faults["fast stops"] else "fast"
                assert c.stop(mode).returncode == 0
                faults[f"{mode} stops"] += 1
                time.sleep(0.5)
                c.start()
    finally:
        stop.set()
        for w in writers:
            w.join(30)
    try:
        # Everything committed arrives, with the receiver up, without any
        # further write.
        def done():
            seen = {json.loads(m)["new"]["id"] for m in received + [r[3] for r in rx.requests]}
            return ledger.committed <= seen
        if not wait_until(done, 60, every=0.5):
            seen = {json.loads(m)["new"]["id"] for m in received + [r[3] for r in rx.requests]}
            missing = sorted(ledger.committed - seen)
            with c.connect("chaos") as conn:
                state = {
                    "outbox": conn.execute("SELECT count(*), sum(events - sent) FROM emit.outbox").fetchone(),
                    "dead": conn.execute("SELECT count(*) FROM emit.dead_letter").fetchone(),
                    "in table": conn.execute("SELECT count(*) FROM chaos WHERE id = ANY(%s)",
                                             (missing[:1000],)).fetchone(),
                    "stats": conn.execute("SELECT * FROM emit.stats").fetchall(),
                    "workers": conn.execute("SELECT pid, state, wait_event FROM pg_stat_activity "
                                            "WHERE backend_type = 'pg_emit worker'").fetchall(),
                }
            pytest.fail(f"{len(missing)} committed rows did not arrive, e.g. {missing[:10]}; {state}\n"
                        f"{c.tail_log(120)}")
        with c.connect("chaos") as conn:
            assert wait_until(lambda: conn.execute(
                "SELECT count(*) FROM emit.outbox").fetchone()[0] == 0, 30)
        time.sleep(0.5)
        received.extend(r[3] for r in rx.requests)
    finally:
        rx.close()
    events = [json.loads(m) for m in received]
    seen = {e["new"]["id"] for e in events}
    keys = {(e["stream"], e["id"]) for e in events}
    # One row, one (stream, id): redelivery keeps the id.
    assert len(keys) == len(seen)
    lost = ledger.committed - seen
    phantoms = seen - ledger.committed - ledger.uncertain
    report = {
        "seconds": round(time.monotonic() - started, 1),
        "writers": WRITERS,
        "rows committed": len(ledger.committed),
        "rows rolled back": len(ledger.rolled_back),
        "rows uncertain (COMMIT cut off by a crash)": len(ledger.uncertain),
        "uncertain rows delivered": len(ledger.uncertain & seen),
        "events received": len(events),
        "duplicates": len(events) - len(seen),
        "lost": len(lost),
        "phantoms": len(phantoms),
        "faults": faults,
        "receiver resume seconds": resume,
    }
    with open(f"{c.root}/chaos-report.json", "w") as f:
        json.dump(report, f, indent=1)
    print("\nchaos:", json.dumps(report))
    assert not lost, sorted(lost)[:20]
    assert not phantoms, sorted(phantoms)[:20]
    assert faults["immediate stops"] >= 1 and faults["fast stops"] >= 1
    assert len(ledger.committed) > 1000
