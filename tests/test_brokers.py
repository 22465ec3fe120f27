"""What every broker sink promises, one suite run against each real server
(redis-server, nats-server with JetStream, tansu for Kafka) and read back
with each project's own client (`redis`, nats-py, confluent-kafka): every
committed event arrives under its stable id, rollbacks send nothing, order
is commit order (per partition for Kafka), sync and commit deliver with
fresh ids, a server that is down gets its events when it is back, and a
crash of PostgreSQL mid-delivery loses nothing. What only one broker does
(Redis's MAXLEN and passwords, NATS's missing streams and credentials,
Kafka's partitioner) is tested in test_redis.py, test_nats.py and
test_kafka.py.

A new broker adds an adapter class below and one entry in BROKERS."""

import os
import signal
import time

import psycopg
import pytest

from conftest import attach
from pgcluster import wait_until
from receivers import KafkaServer, NatsServer, RedisServer

pytestmark = pytest.mark.usefixtures("fast_retries")


class Redis:
    # Redis cannot drop a repeated XADD: a crash may add an event twice.
    stores_once = False

    def __init__(self):
        self.server = RedisServer()

    def target(self, name):
        return f"redis://127.0.0.1:{self.server.port}/{name}"

    def read(self, name, n, timeout=20.0):
        """(lane, event id, event) of everything in `name`, each lane in
        the order the broker keeps."""
        return [(0, eid, e) for _, eid, e in self.server.wait_for(name, n, timeout)]


class Nats:
    # Nats-Msg-Id within JetStream's duplicate window: stored once.
    stores_once = True

    def __init__(self):
        self.server = NatsServer()
        self.streams = set()

    def target(self, name):
        if name not in self.streams:
            self.server.add_stream(name.upper(), [f"{name}.>"])
            self.streams.add(name)
        return f"nats://127.0.0.1:{self.server.port}/{name}.events"

    def read(self, name, n, timeout=20.0):
        return [(0, mid, e) for mid, e in self.server.wait_for(name.upper(), n, timeout)]


class Kafka:
    # A new producer session cannot be told from new records.
    stores_once = False

    def __init__(self):
        self.server = KafkaServer()
        self.topics = set()

    def target(self, name):
        if name not in self.topics:
            self.server.create_topic(name)
            self.topics.add(name)
        return f"kafka://127.0.0.1:{self.server.port}/{name}"

    def read(self, name, n, timeout=20.0):
        recs = sorted(self.server.records(name, n, timeout=timeout),
                      key=lambda r: (r["partition"], r["offset"]))
        return [(r["partition"], r["headers"]["id"], r["value"]) for r in recs]

    def restarted(self):
        # tansu keeps its log in memory: a restarted broker is empty.
        for t in self.topics:
            self.server.create_topic(t)


BROKERS = {"redis": Redis, "nats": Nats, "kafka": Kafka}


@pytest.fixture(params=list(BROKERS))
def broker(request):
    b = BROKERS[request.param]()
    yield b
    b.server.close()


def row_id(e):
    """The row id of a plain, Debezium or CloudEvents event."""
    e = e.get("data", e)
    return (e.get("new") or e.get("after"))["id"]


def in_commit_order(got):
    """Each lane's row ids, in the lane's order."""
    lanes = {}
    for lane, _, e in got:
        lanes.setdefault(lane, []).append(row_id(e))
    return lanes


def test_async_events_arrive_under_their_ids_in_commit_order(db, table, broker):
    attach(db, table, broker.target("orders"), "delivery=async")
    for start in range(0, 500, 100):
        db.execute(f"INSERT INTO {table} SELECT g, 'x' FROM generate_series({start + 1}, {start + 100}) g")
    with pytest.raises(psycopg.errors.DivisionByZero):
        with db.conn.transaction():
            db.execute(f"INSERT INTO {table} VALUES (1000, 'rolled back')")
            db.execute("SELECT 1/0")
    got = broker.read("orders", 500)
    assert sorted(row_id(e) for _, _, e in got) == list(range(1, 501))
    for ids in in_commit_order(got).values():
        assert ids == sorted(ids)
    for _, eid, e in got:
        # The broker's id is the event's: (stream, id) as in the body.
        assert eid == f"evt_{e['stream']}_{e['id']}"
    assert db.one("SELECT count(*) FROM emit.outbox WHERE destination = %s",
                  (broker.target("orders"),)) == 0


@pytest.mark.parametrize("mode", ["sync", "commit"])
@pytest.mark.parametrize("fmt", ["json", "debezium", "cloudevents"])
def test_sync_and_commit(db, table, broker, mode, fmt):
    attach(db, table, broker.target("s"), f"delivery={mode}", f"format={fmt}")
    db.execute(f"INSERT INTO {table} VALUES (1, 'a')")
    with pytest.raises(psycopg.errors.DivisionByZero):
        with db.conn.transaction():
            db.execute(f"INSERT INTO {table} VALUES (2, 'never')")
            db.execute("SELECT 1/0")
    db.execute(f"INSERT INTO {table} VALUES (3, 'c')")
    # Sync sends within the statement, before the transaction's fate is
    # known; commit only what committed.
    rows = [1, 2, 3] if mode == "sync" else [1, 3]
    got = broker.read("s", len(rows))
    assert sorted(row_id(e) for _, _, e in got) == rows
    for _, eid, e in got:
        assert eid.startswith("msg_")
        if fmt == "cloudevents":
            assert eid == e["id"]  # the CloudEvent's own id
    assert len({eid for _, eid, _ in got}) == len(rows)
    assert db.warnings() == []


def test_send_message(db, broker):
    url = broker.target("msgs")
    db.execute("SELECT send_message(%s, '{\"hello\": 1}', 'sync')", (url,))
    db.execute("SELECT send_message(%s, '{\"hello\": 2}')", (url,))
    got = broker.read("msgs", 2)
    assert sorted(e["hello"] for _, _, e in got) == [1, 2]
    assert all(eid.startswith("message_") for _, eid, _ in got)


def test_server_down_then_back(db, table, broker):
    url = broker.target("s")
    attach(db, table, url, "delivery=async")
    broker.server.stop()
    db.execute(f"INSERT INTO {table} SELECT g, 'x' FROM generate_series(1, 100) g")
    assert wait_until(lambda: db.one(
        "SELECT last_error FROM emit.outbox WHERE destination = %s", (url,)) is not None, 10)
    broker.server.start()
    getattr(broker, "restarted", lambda: None)()
    got = broker.read("s", 100)
    assert sorted(row_id(e) for _, _, e in got) == list(range(1, 101))


def test_crash_mid_delivery_loses_nothing(cluster, broker):
    """The server freezes (SIGSTOP) with the worker's sends out and their
    acknowledgements awaited, and PostgreSQL goes down (immediate): nothing
    was acknowledged, so everything is sent again, under the same ids."""
    table = "broker_crash"
    url = broker.target("crash")
    with cluster.connect("emit_test") as c:
        c.execute(f"DROP TABLE IF EXISTS {table}")
        c.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
        c.execute(f"CREATE TRIGGER out AFTER INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION "
                  f"row_to_destination('{url}', 'delivery=async')")
        c.execute(f"INSERT INTO {table} VALUES (1, 'x')")  # the worker connects
        assert len(broker.read("crash", 1, timeout=10)) == 1
        os.kill(broker.server.proc.pid, signal.SIGSTOP)
        try:
            for start in range(1, 5001, 1000):
                c.execute(f"INSERT INTO {table} SELECT g, 'x' "
                          f"FROM generate_series({start + 1}, {start + 1000}) g")
            assert wait_until(lambda: c.execute(
                "SELECT count(*) FROM emit.outbox WHERE first_event_id IS NOT NULL "
                "AND destination = %s", (url,)).fetchone()[0], 5)
            time.sleep(0.5)
            assert cluster.stop("immediate").returncode == 0
        finally:
            os.kill(broker.server.proc.pid, signal.SIGCONT)
    cluster.start()
    with cluster.connect("emit_test") as c:
        assert c.execute("SELECT sum(events - sent) FROM emit.outbox WHERE destination = %s",
                         (url,)).fetchone()[0] == 5000
        c.execute(f"INSERT INTO {table} VALUES (5002, 'after')")  # starts the worker
        assert wait_until(lambda: c.execute(
            "SELECT count(*) FROM emit.outbox WHERE destination = %s", (url,)).fetchone()[0] == 0, 30)
        c.execute(f"DROP TABLE {table}")
    got = broker.read("crash", 5002)
    assert {row_id(e) for _, _, e in got} == set(range(1, 5003)), "every committed row arrives"
    by_id = {}
    for _, eid, e in got:
        by_id.setdefault(eid, set()).add(row_id(e))
    # Every copy of an event carries that event's id, and only it.
    assert len(by_id) == 5002 and all(len(v) == 1 for v in by_id.values())
    if broker.stores_once:
        assert len(got) == 5002
    print(f"\n{type(broker).__name__} crash: {len(got) - 5002} events stored twice")
