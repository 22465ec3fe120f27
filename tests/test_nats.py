"""NATS JetStream destinations (`nats://host:port/subject`) against a real
nats-server with JetStream, read back with nats-py: every committed event
is in the stream exactly once (Nats-Msg-Id and JetStream's duplicate
window drop what a crash makes pg_emit publish again), rollbacks send
nothing, a subject no stream captures is an error that says so, a server
that is down gets its events when it is back, order is commit order."""

import json
import os
import signal
import time

import psycopg
import pytest

from conftest import attach
from pgcluster import wait_until
from receivers import NatsServer

pytestmark = pytest.mark.usefixtures("fast_retries")


@pytest.fixture
def server():
    s = NatsServer()
    s.add_stream("ORDERS", ["orders.>"])
    yield s
    s.close()


def test_async_events_are_in_the_stream_once_in_commit_order(db, table, server):
    attach(db, table, f"nats://127.0.0.1:{server.port}/orders.created", "delivery=async")
    for start in range(0, 500, 100):
        db.execute(f"INSERT INTO {table} SELECT g, 'x' FROM generate_series({start + 1}, {start + 100}) g")
    with pytest.raises(psycopg.errors.DivisionByZero):
        with db.conn.transaction():
            db.execute(f"INSERT INTO {table} VALUES (1000, 'rolled back')")
            db.execute("SELECT 1/0")
    msgs = server.wait_for("ORDERS", 500)
    assert [e["new"]["id"] for _, e in msgs] == list(range(1, 501))
    for msg_id, e in msgs:
        assert msg_id == f"evt_{e['stream']}_{e['id']}"
    assert db.one("SELECT count(*) FROM emit.outbox WHERE port = %s", (server.port,)) == 0


@pytest.mark.parametrize("mode", ["sync", "commit"])
def test_sync_and_commit(db, table, server, mode):
    attach(db, table, f"nats://127.0.0.1:{server.port}/orders.x", f"delivery={mode}",
           "format=cloudevents")
    db.execute(f"INSERT INTO {table} VALUES (1, 'a')")
    db.execute(f"INSERT INTO {table} VALUES (2, 'b')")
    msgs = server.wait_for("ORDERS", 2)
    assert [e["data"]["new"]["id"] for _, e in msgs] == [1, 2]
    # The CloudEvent's id is the Nats-Msg-Id.
    assert all(msg_id == e["id"] and msg_id.startswith("msg_") for msg_id, e in msgs)
    assert db.warnings() == []


def test_a_subject_no_stream_captures_waits_and_says_why(db, table, server):
    attach(db, table, f"nats://127.0.0.1:{server.port}/invoices.paid", "delivery=async")
    db.execute(f"INSERT INTO {table} VALUES (1, 'a')")
    assert wait_until(lambda: "no JetStream stream captures subject" in (db.one(
        "SELECT last_error FROM emit.outbox WHERE port = %s", (server.port,)) or ""), 10)
    with pytest.raises(psycopg.errors.ConnectionFailure) as e:
        db.execute("SET pg_emit.on_error = 'error'")
        db.execute(f"SELECT send_message('nats://127.0.0.1:{server.port}/invoices.paid', '{{}}', 'sync')")
    assert "invoices.paid" in str(e.value)
    db.execute("RESET pg_emit.on_error")
    server.add_stream("INVOICES", ["invoices.>"])
    assert [e["new"]["id"] for _, e in server.wait_for("INVOICES", 1)] == [1]


def test_server_down_then_back(db, table, server):
    attach(db, table, f"nats://127.0.0.1:{server.port}/orders.x", "delivery=async")
    server.stop()
    db.execute(f"INSERT INTO {table} SELECT g, 'x' FROM generate_series(1, 100) g")
    assert wait_until(lambda: db.one(
        "SELECT last_error FROM emit.outbox WHERE port = %s", (server.port,)) is not None, 10)
    server.start()
    assert sorted(e["new"]["id"] for _, e in server.wait_for("ORDERS", 100)) == list(range(1, 101))


def test_crash_mid_delivery_leaves_each_event_in_the_stream_once(cluster, server):
    table = "nats_crash"
    with cluster.connect("emit_test") as c:
        c.execute(f"DROP TABLE IF EXISTS {table}")
        c.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
        c.execute(f"CREATE TRIGGER out AFTER INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION "
                  f"row_to_destination('nats://127.0.0.1:{server.port}/orders.crash', 'delivery=async')")
        c.execute(f"INSERT INTO {table} VALUES (1, 'x')")  # the worker connects
        assert wait_until(lambda: server.count("ORDERS") == 1, 10)
        # The server freezes (SIGSTOP): the worker's publishes go out on its
        # open connection and wait for acknowledgements when PostgreSQL
        # goes down.
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            for start in range(1, 5001, 1000):
                c.execute(f"INSERT INTO {table} SELECT g, 'x' FROM generate_series({start + 1}, {start + 1000}) g")
            assert wait_until(lambda: c.execute(
                "SELECT count(*) FROM emit.outbox WHERE first_event_id IS NOT NULL AND port = %s",
                (server.port,)).fetchone()[0], 5)
            time.sleep(0.5)
            assert cluster.stop("immediate").returncode == 0
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
    cluster.start()
    # What was published before the crash reaches the stream now...
    assert wait_until(lambda: server.count("ORDERS") > 1, 10)
    before = server.count("ORDERS") - 1
    with cluster.connect("emit_test") as c:
        # ...but was never acknowledged to pg_emit: all of it goes again.
        assert c.execute("SELECT sum(events - sent) FROM emit.outbox WHERE port = %s",
                         (server.port,)).fetchone()[0] == 5000
        c.execute(f"INSERT INTO {table} VALUES (5002, 'after')")  # starts the worker
    assert wait_until(lambda: cluster.connect("emit_test").execute(
        "SELECT count(*) FROM emit.outbox WHERE port = %s", (server.port,)).fetchone()[0] == 0, 30)
    msgs = server.messages("ORDERS")
    # Published twice (before the crash, and again after), stored once.
    assert sorted(e["new"]["id"] for _, e in msgs) == list(range(1, 5003))
    print(f"\nnats crash: {before} events published before the crash and again after, stored once")
    with cluster.connect("emit_test") as c:
        c.execute(f"DROP TABLE {table}")


@pytest.mark.parametrize("auth, options", [
    ({"user": "emit", "password": "pw"}, {"username": "emit", "password": "pw"}),
    ({"token": "t0ken"}, {"token": "t0ken"}),
])
def test_credentials_from_a_stored_destination(db, table, dest, auth, options):
    server = NatsServer(**auth)
    try:
        server.add_stream("ORDERS", ["orders.>"])
        wrong = {k: "wrong" if k != "username" else v for k, v in options.items()}
        db.execute("SELECT emit.create_destination(%s, %s, %s)",
                   (dest, f"nats://127.0.0.1:{server.port}/orders.auth", json.dumps(wrong)))
        attach(db, table, dest, "delivery=async")
        db.execute(f"INSERT INTO {table} VALUES (1, 'a')")
        assert wait_until(lambda: "uthorization" in (db.one(
            "SELECT last_error FROM emit.outbox WHERE destination = %s", (dest,)) or ""), 10)
        db.execute("SELECT emit.alter_destination(%s, NULL, %s)", (dest, json.dumps(options)))
        assert [e["new"]["id"] for _, e in server.wait_for("ORDERS", 1)] == [1]
    finally:
        server.close()


def test_no_credentials_go_to_a_server_that_requires_tls(db, table, dest, pki):
    """pg_emit's NATS client has no TLS yet: it must say so instead of
    sending the password in the clear."""
    server = NatsServer(user="emit", password="pw", tls=(os.path.join(pki, "server.pem"),
                                                         os.path.join(pki, "server.key")))
    try:
        db.execute("SELECT emit.create_destination(%s, %s, %s)",
                   (dest, f"nats://127.0.0.1:{server.port}/orders.tls",
                    json.dumps({"username": "emit", "password": "pw"})))
        attach(db, table, dest, "delivery=async")
        db.execute(f"INSERT INTO {table} VALUES (1, 'a')")
        assert wait_until(lambda: "requires TLS" in (db.one(
            "SELECT last_error FROM emit.outbox WHERE destination = %s", (dest,)) or ""), 10)
    finally:
        server.close()


@pytest.mark.parametrize("call, text", [
    ("send_message('nats://u:pw@127.0.0.1/a', '{}')", "stored destination's options"),
    ("send_message('nats://127.0.0.1/orders.*', '{}')", "without wildcards"),
    ("send_message('nats://127.0.0.1/', '{}')", "nats://host[:port]/subject"),
    ("emit.create_destination('x', 'redis://127.0.0.1/s', '{\"token\": \"t\"}')", "nats:// destinations only"),
    ("emit.create_destination('x', 'nats://127.0.0.1/a', '{\"password\": \"p\"}')", "needs its username"),
])
def test_bad_nats_destinations(db, call, text):
    with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
        db.execute(f"SELECT {call}")
    assert text in str(e.value)
