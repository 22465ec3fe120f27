"""Async order and ids under real operations (issue 10, findings 3, 5, 7):
transactions arrive whole and in commit order, event ids can be
de-duplicated by the README's rule without dropping anything, and a
savepoint does not cap how much a transaction can queue."""

import json

import pytest

from pgcluster import wait_until
from receivers import Receiver, free_port

pytestmark = pytest.mark.usefixtures("fast_retries")


def events(msgs):
    return [json.loads(m) for m in msgs]


def attach(db, table, port, name="out"):
    db.execute(f"CREATE TABLE IF NOT EXISTS {table} (id int, v text)")
    db.execute(
        f"CREATE TRIGGER {name} AFTER INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION "
        f"row_to_socket('127.0.0.1', {port}, 'delivery=async', 'framing=ndjson')")


class Dedupe:
    """The README's receiver rule: per stream, drop an id at or below the
    highest one processed; ids of a stream are consecutive, so a jump is a
    gap (events dead-lettered)."""

    def __init__(self):
        self.highest = {}
        self.kept = []
        self.gaps = 0

    def feed(self, event):
        last = self.highest.get(event["stream"], 0)
        if event["id"] <= last:
            return
        if event["id"] != last + 1:
            self.gaps += 1
        self.highest[event["stream"]] = event["id"]
        self.kept.append(event)


def test_transactions_arrive_whole_and_in_commit_order_across_a_backlog(cluster, db, table):
    """A large transaction that wrote its first 8 MB early, and a small one
    that committed before it: 0.1.0 delivered big's first part, then small,
    then big's rest."""
    port = free_port()
    attach(db, table, port)
    with cluster.connect("emit_test", autocommit=False) as big:
        big.execute(f"INSERT INTO {table} SELECT g, repeat('b', 900) FROM generate_series(1, 12000) g")
        db.execute(f"INSERT INTO {table} VALUES (-1, 'small')")
        big.commit()
    nd = Receiver("ndjson", port=port)
    try:
        got = events(nd.wait_for(12001, timeout=30))
        assert len(got) == 12001
        assert got[0]["new"]["id"] == -1
        assert [e["new"]["id"] for e in got[1:]] == list(range(1, 12001))
        assert [e["id"] for e in got] == list(range(got[0]["id"], got[0]["id"] + 12001))
    finally:
        nd.close()


def test_a_prepared_transaction_takes_its_place_when_it_commits(cluster, db, table):
    port = free_port()
    attach(db, table, port)
    with cluster.connect("emit_test") as c:
        c.execute("BEGIN")
        c.execute(f"INSERT INTO {table} VALUES (1, 'prepared first')")
        c.execute(f"PREPARE TRANSACTION '{table}'")
    db.execute(f"INSERT INTO {table} VALUES (2, 'committed first')")
    db.execute(f"COMMIT PREPARED '{table}'")
    # The worker, woken by COMMIT PREPARED, gives it its place (a commit a
    # few milliseconds later could still come first).
    assert wait_until(lambda: db.one(
        "SELECT count(*) FROM emit.outbox WHERE port = %s AND tx_seq IS NULL", (port,)) == 0, 5)
    db.execute(f"INSERT INTO {table} VALUES (3, 'committed last')")
    nd = Receiver("ndjson", port=port)
    try:
        got = events(nd.wait_for(3, timeout=15))
        assert [e["new"]["id"] for e in got] == [2, 1, 3]
    finally:
        nd.close()


def test_ids_dedupe_by_the_readme_rule_with_one_destination_down(cluster, db, table):
    """Two destinations, one down for a while: under the documented rule a
    receiver of both drops nothing, and sees no gap."""
    up = Receiver("ndjson")
    down_port = free_port()
    attach(db, table, up.port, "to_up")
    attach(db, table, down_port, "to_down")
    try:
        for i in range(1, 41):
            db.execute(f"INSERT INTO {table} VALUES ({i}, 'x')")
        assert len(up.wait_for(40, timeout=10)) == 40
        down = Receiver("ndjson", port=down_port)
        try:
            assert len(down.wait_for(40, timeout=15)) >= 40
            for i in range(41, 51):
                db.execute(f"INSERT INTO {table} VALUES ({i}, 'x')")
            assert len(up.wait_for(50, timeout=10)) >= 50
            assert len(down.wait_for(50, timeout=10)) >= 50
            rule = Dedupe()
            # The receiver sees the recovered destination's backlog after
            # the other's newer events.
            for m in up.messages[:40] + down.messages + up.messages[40:]:
                rule.feed(json.loads(m))
            kept = sorted((e["stream"], e["new"]["id"]) for e in rule.kept)
            streams = {s for s, _ in kept}
            assert len(streams) == 2
            for s in streams:
                assert sorted(i for t, i in kept if t == s) == list(range(1, 51))
            assert rule.gaps == 0
        finally:
            down.close()
    finally:
        up.close()


def test_a_reinstall_and_a_copy_start_new_streams(cluster, db, table):
    nd = Receiver("ndjson")
    try:
        cluster.create_db("emit_src")
        with cluster.connect("emit_src") as c:
            c.execute("CREATE EXTENSION pg_emit")
            attach(c, "t", nd.port)
            c.execute("INSERT INTO t VALUES (1, 'a')")
            first = events(nd.wait_for(1, timeout=10))[0]
            # A reinstall: the same destination, a new stream.
            c.execute("DROP EXTENSION pg_emit CASCADE")
            c.execute("CREATE EXTENSION pg_emit")
            attach(c, "t", nd.port, "out2")
            c.execute("INSERT INTO t VALUES (2, 'b')")
            second = events(nd.wait_for(2, timeout=10))[1]
            assert second["stream"] != first["stream"]
        # A copy: its worker must not go on with the original's ids. (The
        # original's worker leaves the template database for the copy.)
        with cluster.connect() as c:
            c.execute("DROP DATABASE IF EXISTS emit_copy")
            c.execute("CREATE DATABASE emit_copy TEMPLATE emit_src")
        with cluster.connect("emit_copy") as c:
            c.execute("INSERT INTO t VALUES (3, 'c')")
        with cluster.connect("emit_src") as c:
            c.execute("INSERT INTO t VALUES (4, 'd')")
        got = {e["new"]["id"]: e for e in events(nd.wait_for(4, timeout=10))}
        assert got[4]["stream"] == second["stream"] and got[4]["id"] == second["id"] + 1
        assert got[3]["stream"] not in (first["stream"], second["stream"])
        assert got[3]["id"] == 1
    finally:
        nd.close()
        with cluster.connect() as c:
            c.execute("DROP DATABASE IF EXISTS emit_copy WITH (FORCE)")
            c.execute("DROP DATABASE IF EXISTS emit_src WITH (FORCE)")


def test_savepoints_do_not_cap_an_async_transaction(cluster, db, table):
    """0.1.0 could not queue more than 64 MB inside a savepoint once the
    transaction held events (54000, blaming delivery=commit's setting).
    Events written out inside a savepoint go if it is rolled back."""
    db.execute("SET pg_emit.commit_buffer_size = '1MB'")
    nd = Receiver("ndjson")
    try:
        attach(db, table, nd.port)
        db.execute("BEGIN")
        db.execute(f"INSERT INTO {table} VALUES (0, 'before')")
        db.execute("SAVEPOINT kept")
        db.execute(f"INSERT INTO {table} SELECT g, repeat('k', 900) FROM generate_series(1, 20000) g")
        db.execute("RELEASE SAVEPOINT kept")
        db.execute("SAVEPOINT undone")
        db.execute(f"INSERT INTO {table} SELECT -g, repeat('u', 900) FROM generate_series(1, 20000) g")
        db.execute("ROLLBACK TO SAVEPOINT undone")
        db.execute(f"INSERT INTO {table} VALUES (20001, 'after')")
        db.execute("COMMIT")
        got = events(nd.wait_for(20002, timeout=30))
        assert [e["new"]["id"] for e in got] == list(range(0, 20002))
        assert db.warnings() == []
        assert wait_until(lambda: db.one("SELECT count(*) FROM emit.outbox WHERE port = %s", (nd.port,)) == 0)
    finally:
        nd.close()
        db.execute("RESET pg_emit.commit_buffer_size")


def test_an_exception_block_per_row_writes_out_as_it_goes(db, table):
    """Each block's events join its parent when it ends; past 8 MB the
    block writes them out itself, so the backend's buffer stays bounded
    (0.2's first cut let such a loop hold everything in memory)."""
    nd = Receiver("ndjson")
    try:
        attach(db, table, nd.port)
        db.execute(f"""
            CREATE FUNCTION pg_temp.each_in_a_block(n int) RETURNS void LANGUAGE plpgsql AS $$
            BEGIN
              FOR i IN 1..n LOOP
                BEGIN
                  INSERT INTO {table} VALUES (i, repeat('e', 900));
                  IF i % 1000 = 0 THEN RAISE EXCEPTION 'undo %', i; END IF;
                EXCEPTION WHEN raise_exception THEN NULL;
                END;
              END LOOP;
            END $$""")
        db.execute("BEGIN")
        db.execute(f"INSERT INTO {table} VALUES (0, 'first')")
        db.execute("SELECT pg_temp.each_in_a_block(12000)")
        db.execute(f"INSERT INTO {table} VALUES (12001, 'last')")
        db.execute("COMMIT")
        expected = [0] + [i for i in range(1, 12001) if i % 1000] + [12001]
        got = events(nd.wait_for(len(expected), timeout=30))
        assert [e["new"]["id"] for e in got] == expected
        assert [e["id"] for e in got] == list(range(got[0]["id"], got[0]["id"] + len(expected)))
    finally:
        nd.close()


def test_rows_queued_without_a_commit_number_are_delivered(db, table):
    """Rows written by a backend that still runs the 0.1.0 library after
    ALTER EXTENSION UPDATE (or requeued by hand) have no tx_seq and no tx."""
    nd = Receiver("ndjson")
    try:
        for i in (1, 2):
            db.execute(
                "INSERT INTO emit.outbox (destination, host, port, framing, events, payload) "
                "VALUES (%s, '127.0.0.1', %s, 'ndjson', 1, %s)",
                (f"tcp://127.0.0.1:{nd.port}?framing=ndjson", nd.port, json.dumps({"new": {"id": i}})))
        db.execute("NOTIFY nothing")  # any later commit; the worker also rescans every 10 s
        got = events(nd.wait_for(2, timeout=15))
        assert [e["new"]["id"] for e in got] == [1, 2]
    finally:
        nd.close()
