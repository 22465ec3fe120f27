"""Redis Streams destinations (`redis://host:port/stream`) against a real
redis-server, read back with the `redis` client library: every committed
event arrives, rollbacks send nothing, a server that is down gets its
events when it is back, a crash of PostgreSQL mid-delivery loses nothing
(duplicates allowed: Redis cannot drop a repeated entry), order is commit
order, credentials stay in stored destinations."""

import json
import time

import psycopg
import pytest

from conftest import attach
from pgcluster import wait_until
from receivers import RedisServer

pytestmark = pytest.mark.usefixtures("fast_retries")


@pytest.fixture
def server():
    s = RedisServer()
    yield s
    s.close()


def test_async_events_arrive_once_in_commit_order(db, table, server):
    attach(db, table, f"redis://127.0.0.1:{server.port}/orders", "delivery=async")
    for start in range(0, 500, 100):
        db.execute(f"INSERT INTO {table} SELECT g, 'x' FROM generate_series({start + 1}, {start + 100}) g")
    with pytest.raises(psycopg.errors.DivisionByZero):
        with db.conn.transaction():
            db.execute(f"INSERT INTO {table} VALUES (1000, 'rolled back')")
            db.execute("SELECT 1/0")
    db.execute(f"UPDATE {table} SET v = 'y' WHERE id = 1")
    entries = server.wait_for("orders", 501)
    assert len(entries) == 501
    events = [e for _, _, e in entries]
    assert [e["new"]["id"] for e in events[:500]] == list(range(1, 501))
    assert (events[500]["op"], events[500]["new"]["v"]) == ("UPDATE", "y")
    assert 1000 not in {e["new"]["id"] for e in events}
    # The entry's id field is the event's: (stream, id) as in the body.
    for _, eid, e in entries:
        assert eid == f"evt_{e['stream']}_{e['id']}"
    ids = [e["id"] for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert db.one("SELECT count(*) FROM emit.outbox WHERE port = %s", (server.port,)) == 0


@pytest.mark.parametrize("mode", ["sync", "commit"])
def test_sync_and_commit(db, table, server, mode):
    attach(db, table, f"redis://127.0.0.1:{server.port}/s", f"delivery={mode}", "format=debezium")
    db.execute(f"INSERT INTO {table} VALUES (1, 'a')")
    if mode == "commit":
        with pytest.raises(psycopg.errors.DivisionByZero):
            with db.conn.transaction():
                db.execute(f"INSERT INTO {table} VALUES (2, 'never')")
                db.execute("SELECT 1/0")
    db.execute(f"INSERT INTO {table} VALUES (3, 'c')")
    entries = server.wait_for("s", 2)
    assert [e["after"]["id"] for _, _, e in entries] == [1, 3]
    assert all(eid.startswith("msg_") for _, eid, _ in entries)
    assert db.warnings() == []


def test_server_down_then_back(db, table, server):
    attach(db, table, f"redis://127.0.0.1:{server.port}/s", "delivery=async")
    server.stop()
    db.execute(f"INSERT INTO {table} SELECT g, 'x' FROM generate_series(1, 100) g")
    assert wait_until(lambda: db.one(
        "SELECT last_error FROM emit.outbox WHERE port = %s", (server.port,)) is not None, 10)
    server.start()
    entries = server.wait_for("s", 100)
    assert sorted(e["new"]["id"] for _, _, e in entries) == list(range(1, 101))


def test_crash_mid_delivery_loses_nothing(cluster, server):
    # Its own table and connections: the crash ends every session.
    table = "redis_crash"
    # Redis holds every write for 3 s: the worker's XADDs are sent and wait
    # for their replies when PostgreSQL goes down.
    server.client.client_pause(3000, all=False)
    with cluster.connect("emit_test") as c:
        c.execute(f"DROP TABLE IF EXISTS {table}")
        c.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
        c.execute(f"CREATE TRIGGER out AFTER INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION "
                  f"row_to_destination('redis://127.0.0.1:{server.port}/s', 'delivery=async')")
        for start in range(0, 20000, 1000):
            c.execute(f"INSERT INTO {table} SELECT g, repeat('x', 200) "
                      f"FROM generate_series({start + 1}, {start + 1000}) g")
        assert wait_until(lambda: c.execute(
            "SELECT count(*) FROM emit.outbox WHERE first_event_id IS NOT NULL AND port = %s",
                (server.port,)).fetchone()[0], 5)
    time.sleep(0.3)
    assert cluster.stop("immediate").returncode == 0
    cluster.start()
    with cluster.connect("emit_test") as c:
        # Nothing was acknowledged: it is all still queued, to be sent again.
        assert c.execute("SELECT sum(events - sent) FROM emit.outbox WHERE port = %s",
                         (server.port,)).fetchone()[0] == 20000
        # Without shared_preload_libraries, the next async commit starts
        # the worker.
        c.execute(f"INSERT INTO {table} VALUES (20001, 'after')")
    entries = server.wait_for("s", 20001, timeout=60)
    got = [e["new"]["id"] for _, _, e in entries]
    assert set(got) == set(range(1, 20002)), "every committed row arrives"
    # At least once: entries sent before the crash may be added again, with
    # the same event id, for consumers to drop.
    by_id = {}
    for _, eid, e in entries:
        assert by_id.setdefault(eid, e["new"]["id"]) == e["new"]["id"]
    print(f"\nredis crash: {len(entries) - 20001} duplicate entries")
    with cluster.connect("emit_test") as c:
        c.execute(f"DROP TABLE {table}")


def test_stored_destination_with_password_and_maxlen(db, table, dest):
    server = RedisServer(password="s3cret-pw")
    try:
        db.execute("SELECT emit.create_destination(%s, %s, %s)",
                   (dest, f"redis://127.0.0.1:{server.port}/s",
                    json.dumps({"password": "wrong", "maxlen": 100})))
        attach(db, table, dest, "delivery=async")
        db.execute(f"INSERT INTO {table} VALUES (1, 'a')")
        assert wait_until(lambda: "WRONGPASS" in (db.one(
            "SELECT last_error FROM emit.outbox WHERE destination = %s", (dest,)) or ""), 10)
        db.execute("SELECT emit.alter_destination(%s, NULL, %s)",
                   (dest, json.dumps({"password": "s3cret-pw", "maxlen": 100})))
        assert [e["new"]["id"] for _, _, e in server.wait_for("s", 1)] == [1]
        db.execute(f"INSERT INTO {table} SELECT g, 'x' FROM generate_series(2, 3000) g")
        assert wait_until(lambda: db.one(
            "SELECT count(*) FROM emit.outbox WHERE destination = %s", (dest,)) == 0, 20)
        # MAXLEN ~ trims whole nodes: about the newest 100 stay.
        assert 100 <= server.client.xlen("s") < 1000
        # The password is in no queue row, message or stats.
        assert db.one("SELECT count(*) FROM emit.stats WHERE destination::text LIKE '%s3cret%'") == 0
    finally:
        server.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_an_altered_destination_leaves_its_kept_connection(db, table, dest, server, mode):
    other = RedisServer()
    try:
        db.execute("SELECT emit.create_destination(%s, %s)", (dest, f"redis://127.0.0.1:{server.port}/s"))
        attach(db, table, dest, f"delivery={mode}")
        db.execute(f"INSERT INTO {table} VALUES (1, 'a')")
        assert len(server.wait_for("s", 1)) == 1
        db.execute("SELECT emit.alter_destination(%s, %s)", (dest, f"redis://127.0.0.1:{other.port}/s"))
        db.execute(f"INSERT INTO {table} VALUES (2, 'b')")
        assert [e["new"]["id"] for _, _, e in other.wait_for("s", 1)] == [2]
        assert server.client.xlen("s") == 1
    finally:
        other.close()


@pytest.mark.parametrize("call, text", [
    ("send_message('redis://u:pw@127.0.0.1/s', '{}')", "stored destination's options"),
    ("send_message('redis://127.0.0.1/', '{}')", "redis://host[:port]/stream"),
    ("emit.create_destination('x', 'tcp://127.0.0.1:1', '{\"maxlen\": 5}')", "redis:// destinations only"),
    ("emit.create_destination('x', 'redis://127.0.0.1/s', '{\"username\": \"u\"}')", "needs a password"),
])
def test_bad_redis_destinations(db, call, text):
    with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
        db.execute(f"SELECT {call}")
    assert text in str(e.value)


def test_send_message_to_a_stream(db, server):
    url = f"redis://127.0.0.1:{server.port}/msgs"
    db.execute("SELECT send_message(%s, '{\"hello\": 1}', 'sync')", (url,))
    db.execute("SELECT send_message(%s, '{\"hello\": 2}')", (url,))
    assert sorted(e["hello"] for _, _, e in server.wait_for("msgs", 2)) == [1, 2]
