"""delivery=async: durable outbox + background worker, against live
clusters: one started on demand (no preloading), one preloaded for the
crash and restart tests."""

import json
import time

import pytest

from pgcluster import Cluster, wait_until
from receivers import Listener, Receiver, Stalled, free_port


# Retries every 20–300 ms instead of 100 ms–30 s, so failure tests are quick.
pytestmark = pytest.mark.usefixtures("fast_retries")


def events(msgs):
    return [json.loads(m) for m in msgs]


def distinct(msgs):
    """Events by id: async is at-least-once, receivers drop duplicates."""
    return {e["id"]: e for e in events(msgs)}


def attach(db, table, port, *opts, ops="INSERT"):
    extra = "".join(f", '{o}'" for o in opts)
    db.execute(f"CREATE TABLE IF NOT EXISTS {table} (id int primary key, v text)")
    db.execute(
        f"CREATE TRIGGER out AFTER {ops} ON {table} FOR EACH ROW "
        f"EXECUTE FUNCTION row_to_socket('127.0.0.1', {port}, 'delivery=async'{extra})"
    )


def worker_pids(conn):
    return [r[0] for r in conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_emit worker' AND datname = current_database()"
    ).fetchall()]


def test_writer_does_not_touch_the_network(db, table):
    stalled = Stalled()  # a receiver whose connects hang
    try:
        attach(db, table, stalled.port)
        db.execute("SET pg_emit.connect_timeout = '20s'")
        t = time.monotonic()
        db.execute(f"INSERT INTO {table} SELECT g, 'x' FROM generate_series(1, 1000) g")
        assert time.monotonic() - t < 10.0  # one connect would take 20 s
        assert db.warnings() == []
        assert db.one(f"SELECT count(*) FROM {table}") == 1000
    finally:
        db.execute(f"DROP TABLE {table}")
        db.execute("DELETE FROM emit.outbox WHERE port = %s", (stalled.port,))
        stalled.close()


def test_delivered_promptly_with_increasing_ids(db, table):
    nd = Receiver("ndjson")
    try:
        attach(db, table, nd.port, "framing=ndjson")
        db.execute(f"INSERT INTO {table} VALUES (1, 'a')")
        t = time.monotonic()
        db.execute(f"INSERT INTO {table} VALUES (2, 'b')")
        got = nd.wait_for(2, timeout=5)
        # Woken by the commit, not by a poll (the idle rescan is 10 s).
        assert time.monotonic() - t < 5.0
        evs = events(got)
        assert [e["new"]["id"] for e in evs] == [1, 2]
        assert evs[0]["id"] < evs[1]["id"]
        assert set(evs[0]) == {"id", "stream", "op", "schema", "table", "new", "old"}
        assert wait_until(lambda: db.one("SELECT count(*) FROM emit.outbox WHERE port = %s", (nd.port,)) == 0)
    finally:
        nd.close()


def test_rollback_and_savepoint_rollback_send_nothing(db, table):
    nd = Receiver("ndjson")
    try:
        attach(db, table, nd.port, "framing=ndjson")
        db.execute("BEGIN")
        db.execute(f"INSERT INTO {table} VALUES (1, 'rolled back')")
        db.execute("ROLLBACK")
        db.execute("BEGIN")
        db.execute(f"INSERT INTO {table} VALUES (2, 'kept')")
        db.execute("SAVEPOINT s")
        db.execute(f"INSERT INTO {table} VALUES (3, 'undone')")
        db.execute("ROLLBACK TO SAVEPOINT s")
        db.execute(f"INSERT INTO {table} VALUES (4, 'kept')")
        db.execute("COMMIT")
        db.execute(f"INSERT INTO {table} VALUES (5, 'kept')")
        got = nd.wait_for(3, timeout=5)
        time.sleep(0.2)
        got = nd.wait_for(4, timeout=0.1)
        assert [e["new"]["id"] for e in events(got)] == [2, 4, 5]
    finally:
        nd.close()


def test_receiver_down_while_2000_rows_commit_then_up(db, table):
    port = free_port()
    attach(db, table, port, "framing=ndjson")
    for i in range(20):  # 20 transactions of 100 rows
        db.execute(
            f"INSERT INTO {table} SELECT g, 'x' FROM generate_series({i * 100 + 1}, {i * 100 + 100}) g"
        )
    assert db.warnings() == []
    # The worker keeps failing meanwhile, counting attempts.
    assert wait_until(lambda: (db.one(
        "SELECT failed_attempts FROM emit.stats WHERE destination LIKE %s", (f"%:{port}?%",)) or 0) >= 2, 5)
    stats = db.conn.execute(
        "SELECT queued + in_flight, delivered, last_error FROM emit.stats WHERE destination LIKE %s",
        (f"%:{port}?%",),
    ).fetchone()
    assert stats[0] == 2000 and stats[1] == 0 and "refused" in stats[2]
    nd = Receiver("ndjson", port=port)
    try:
        got = distinct(nd.wait_for(2000, timeout=15))
        assert sorted(e["new"]["id"] for e in got.values()) == list(range(1, 2001))
        assert nd.connections == 1  # 20 outbox rows, one kept-open connection
        assert wait_until(lambda: db.one(
            "SELECT delivered FROM emit.stats WHERE destination LIKE %s", (f"%:{port}?%",)) == 2000)
    finally:
        nd.close()


def test_commit_order_not_start_order(cluster, db, table):
    nd = Receiver("ndjson")
    try:
        attach(db, table, nd.port, "framing=ndjson")
        other = cluster.connect("emit_test")
        try:
            db.execute("BEGIN")
            db.execute(f"INSERT INTO {table} VALUES (1, 'started first, commits last')")
            other.execute("BEGIN")
            other.execute(f"INSERT INTO {table} VALUES (2, 'started second, commits first')")
            other.execute("COMMIT")
            assert [e["new"]["id"] for e in events(nd.wait_for(1, timeout=5))] == [2]
            db.execute("COMMIT")
            evs = events(nd.wait_for(2, timeout=5))
            assert [e["new"]["id"] for e in evs] == [2, 1]
            assert evs[0]["id"] < evs[1]["id"]  # ids follow delivery order
        finally:
            other.close()
    finally:
        nd.close()


def test_dead_letters_and_requeue(cluster, db, table):
    port = free_port()
    with cluster.connect() as c:
        c.execute("LOAD 'pg_emit'")
        c.execute("ALTER SYSTEM SET pg_emit.max_attempts = 3")
        c.execute("SELECT pg_reload_conf()")
    try:
        attach(db, table, port)
        db.execute(f"INSERT INTO {table} SELECT g, 'x' FROM generate_series(1, 5) g")
        assert wait_until(lambda: db.one(
            "SELECT count(*) FROM emit.dead_letter WHERE port = %s", (port,)) == 1, 10)
        assert db.one("SELECT count(*) FROM emit.outbox WHERE port = %s", (port,)) == 0
        row = db.conn.execute(
            "SELECT events, attempts, last_error FROM emit.dead_letter WHERE port = %s", (port,)
        ).fetchone()
        assert row[0] == 5 and row[1] == 3 and "refused" in row[2]
        assert db.one("SELECT dead_lettered FROM emit.stats WHERE destination = %s",
                      (f"tcp://127.0.0.1:{port}",)) == 5
        rx = Receiver("eof", port=port)
        try:
            assert db.one("SELECT emit.requeue_dead_letters(%s)", (f"tcp://127.0.0.1:{port}",)) == 5
            got = distinct(rx.wait_for(5, timeout=5))
            assert sorted(e["new"]["id"] for e in got.values()) == [1, 2, 3, 4, 5]
            assert db.one("SELECT count(*) FROM emit.dead_letter WHERE port = %s", (port,)) == 0
        finally:
            rx.close()
    finally:
        with cluster.connect() as c:
            c.execute("LOAD 'pg_emit'")
            c.execute("ALTER SYSTEM RESET pg_emit.max_attempts")
            c.execute("SELECT pg_reload_conf()")


def test_a_hanging_destination_does_not_hold_up_others(cluster, db, table):
    stalled = Stalled()
    nd = Receiver("ndjson")
    with cluster.connect() as c:
        c.execute("LOAD 'pg_emit'")
        c.execute("ALTER SYSTEM SET pg_emit.connect_timeout = '10s'")
        c.execute("SELECT pg_reload_conf()")
    try:
        db.execute(f"CREATE TABLE {table} (id int primary key, v text)")
        db.execute(
            f"CREATE TRIGGER a AFTER INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION "
            f"row_to_socket('127.0.0.1', {stalled.port}, 'delivery=async', 'framing=ndjson')"
        )
        db.execute(
            f"CREATE TRIGGER b AFTER INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION "
            f"row_to_socket('127.0.0.1', {nd.port}, 'delivery=async', 'framing=ndjson')"
        )
        for i in range(1, 6):
            t = time.monotonic()
            db.execute(f"INSERT INTO {table} VALUES ({i}, 'x')")
            assert len(nd.wait_for(i, timeout=5)) == i
            # The worker's connect to the stalled destination takes ten
            # seconds per attempt; the healthy one must not wait for it.
            assert time.monotonic() - t < 5.0, i
            time.sleep(0.2)
    finally:
        db.execute(f"DROP TABLE {table}")
        db.execute("DELETE FROM emit.outbox WHERE port = %s", (stalled.port,))
        stalled.close()
        with cluster.connect() as c:
            c.execute("LOAD 'pg_emit'")
            c.execute("ALTER SYSTEM RESET pg_emit.connect_timeout")
            c.execute("SELECT pg_reload_conf()")
        nd.close()


def test_worker_terminated_mid_delivery_resumes(cluster, db, table):
    slow = SlowReceiver()
    try:
        attach(db, table, slow.port, "framing=ndjson")
        for i in range(10):
            db.execute(f"INSERT INTO {table} SELECT g, 'x' FROM generate_series({i * 30 + 1}, {i * 30 + 30}) g")
        assert wait_until(lambda: len(slow.messages) >= 20, 10)
        [pid] = worker_pids(db.conn)
        db.execute("SELECT pg_terminate_backend(%s)", (pid,))
        slow.hurry()
        got = wait_until(lambda: len(slow.distinct()) >= 300 and slow.distinct(), 30)
        assert got and sorted(e["new"]["id"] for e in got.values()) == list(range(1, 301))
        assert worker_pids(db.conn) != [pid]  # a new worker finished the job
    finally:
        slow.close()


def test_two_databases_at_once(cluster, db, table):
    cluster.create_db("emit_test_b")
    nd = Receiver("ndjson")
    try:
        with cluster.connect("emit_test_b") as b:
            b.execute("CREATE EXTENSION pg_emit")
            for conn, name in ((db.conn, "a"), (b, "b")):
                conn.execute(f"CREATE TABLE {table} (id int primary key, v text)")
                conn.execute(
                    f"CREATE TRIGGER out AFTER INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION "
                    f"row_to_socket('127.0.0.1', {nd.port}, 'delivery=async', 'framing=ndjson')"
                )
                conn.execute(f"INSERT INTO {table} SELECT g, '{name}' FROM generate_series(1, 50) g")
            got = events(nd.wait_for(100, timeout=10))
            assert sorted((e["new"]["v"], e["new"]["id"]) for e in got) == sorted(
                [("a", i) for i in range(1, 51)] + [("b", i) for i in range(1, 51)]
            )
            assert len(worker_pids(db.conn)) == 1 and len(worker_pids(b)) == 1
    finally:
        nd.close()
        with cluster.connect() as c:
            c.execute("DROP DATABASE emit_test_b WITH (FORCE)")


def test_drop_extension_while_the_worker_runs(cluster):
    cluster.create_db("emit_test_drop")
    try:
        with cluster.connect("emit_test_drop") as c:
            c.execute("CREATE EXTENSION pg_emit")
            c.execute("CREATE TABLE t (id int)")
            c.execute(
                "CREATE TRIGGER out AFTER INSERT ON t FOR EACH ROW EXECUTE FUNCTION "
                f"row_to_socket('127.0.0.1', {free_port()}, 'delivery=async')"
            )
            c.execute("INSERT INTO t VALUES (1)")  # starts the worker; it keeps failing
            # In its main loop (a worker still starting finds no extension
            # and exits without a word, which is not what this tests).
            assert wait_until(lambda: c.execute(
                "SELECT count(*) FROM emit.outbox WHERE last_error IS NOT NULL").fetchone()[0], 10)
            c.execute("SET lock_timeout = '5s'")
            c.execute("DROP EXTENSION pg_emit CASCADE")
            assert wait_until(lambda: not worker_pids(c), 15)
            c.execute("CREATE EXTENSION pg_emit")  # and back, cleanly
    finally:
        with cluster.connect() as c:
            c.execute("DROP DATABASE emit_test_drop WITH (FORCE)")
    assert "extension dropped" in cluster.tail_log(100_000)


def test_large_transaction_spills_to_several_outbox_rows(db, table):
    nd = Receiver("ndjson")
    try:
        attach(db, table, nd.port, "framing=ndjson")
        db.execute("BEGIN")
        db.execute(f"INSERT INTO {table} SELECT g, repeat('x', 100000) FROM generate_series(1, 200) g")
        # 20 MB of events: written out in 8 MB rows before COMMIT.
        assert db.one("SELECT count(*) FROM emit.outbox WHERE port = %s", (nd.port,)) >= 2
        db.execute("COMMIT")
        got = distinct(nd.wait_for(200, timeout=20))
        assert sorted(e["new"]["id"] for e in got.values()) == list(range(1, 201))
    finally:
        nd.close()


# --- crash safety, on a cluster with shared_preload_libraries ---------------


class SlowReceiver(Listener):
    """ndjson receiver that reads 512 bytes every 5 ms (until `hurry()`)
    through a small receive buffer, so the worker's writes block and a few
    thousand events take seconds to deliver."""

    def __init__(self):
        self.messages = []
        self.delay = 0.005
        super().__init__(backlog=64, rcvbuf=4096)

    def hurry(self):
        self.delay = 0

    def serve(self, c, seq):
        buf = b""
        while True:
            try:
                chunk = c.recv(512 if self.delay else 1 << 20)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            self.messages.extend(lines)
            if self.delay:
                time.sleep(self.delay)
        c.close()

    def distinct(self):
        return distinct(list(self.messages))


def test_a_large_transaction_reaches_a_slow_reader(cluster, db, table):
    """0.1.0 bounded the write of a whole outbox row (up to 8 MB) by
    write_timeout and restarted the row on every retry: a slow but reading
    receiver never got a large transaction. Now the timeout means no
    progress for that long, and a retry resumes after what was written."""
    with cluster.connect() as c:
        c.execute("LOAD 'pg_emit'")
        c.execute("ALTER SYSTEM SET pg_emit.write_timeout = '300ms'")
        c.execute("SELECT pg_reload_conf()")
    slow = SlowReceiver()
    slow.delay = 0.002  # ~250 kB/s
    try:
        attach(db, table, slow.port, "framing=ndjson")
        db.execute(f"INSERT INTO {table} SELECT g, repeat('x', 600) FROM generate_series(1, 3000) g")
        got = wait_until(lambda: len(slow.distinct()) >= 3000 and slow.distinct(), 60)
        assert got, len(slow.distinct())
        assert sorted(e["new"]["id"] for e in got.values()) == list(range(1, 3001))
        # Whole lines are never sent twice on a healthy connection.
        assert len(slow.messages) == 3000
    finally:
        slow.close()
        with cluster.connect() as c:
            c.execute("ALTER SYSTEM RESET pg_emit.write_timeout")
            c.execute("SELECT pg_reload_conf()")


@pytest.fixture(scope="module")
def preloaded():
    c = Cluster("pg_emit-preload", port=54332, conf={
        "shared_preload_libraries": "'pg_emit'",
        "pg_emit.retry_backoff_min": "'20ms'",
        "pg_emit.retry_backoff_max": "'300ms'",
    })
    c.init().start()
    c.create_db("emit_pre")
    with c.connect("emit_pre") as conn:
        conn.execute("CREATE EXTENSION pg_emit")
    yield c
    c.destroy()


def test_immediate_shutdown_mid_delivery_then_restart(preloaded):
    slow = SlowReceiver()
    try:
        with preloaded.connect("emit_pre") as c:
            c.execute("CREATE TABLE crash (id int primary key)")
            c.execute(
                "CREATE TRIGGER out AFTER INSERT ON crash FOR EACH ROW EXECUTE FUNCTION "
                f"row_to_socket('127.0.0.1', {slow.port}, 'delivery=async', 'framing=ndjson')"
            )
            for i in range(30):  # 3000 events in 30 transactions
                c.execute(f"INSERT INTO crash SELECT generate_series({i * 100 + 1}, {i * 100 + 100})")
        assert wait_until(lambda: len(slow.messages) >= 50, 10)
        r = preloaded.stop("immediate")
        assert r.returncode == 0
        before = len(slow.distinct())
        assert 0 < before < 3000, before  # really mid-delivery
        slow.hurry()
        preloaded.start()
        # No new write: the launcher starts the worker, which resumes.
        got = wait_until(lambda: len(slow.distinct()) >= 3000 and slow.distinct(), 60)
        assert got, len(slow.distinct())
        assert sorted(e["new"]["id"] for e in got.values()) == list(range(1, 3001))
        # Redelivered events kept their ids: one id per row.
        assert len({e["new"]["id"] for e in got.values()}) == len(got)
    finally:
        slow.close()


def test_preloaded_worker_runs_without_any_write(preloaded):
    """After a restart only the launcher can start the worker (nothing
    writes): the backlog left by a receiver that was down arrives."""
    port = free_port()
    with preloaded.connect("emit_pre") as c:
        c.execute("CREATE TABLE backlog (id int primary key)")
        c.execute(
            "CREATE TRIGGER out AFTER INSERT ON backlog FOR EACH ROW EXECUTE FUNCTION "
            f"row_to_socket('127.0.0.1', {port}, 'delivery=async', 'framing=ndjson')"
        )
        c.execute("INSERT INTO backlog SELECT generate_series(1, 10)")
    preloaded.stop("fast")
    nd = Receiver("ndjson", port=port)
    try:
        preloaded.start()
        got = distinct(nd.wait_for(10, timeout=15))
        assert sorted(e["new"]["id"] for e in got.values()) == list(range(1, 11))
        with preloaded.connect("emit_pre") as c:
            assert worker_pids(c)
            c.execute("DROP TABLE backlog")
    finally:
        nd.close()
    with preloaded.connect("postgres") as c:
        assert wait_until(lambda: not worker_pids(c), 10)
