"""What only Kafka destinations do (`kafka://host:port/topic`), against a
real Kafka-protocol broker (tansu) read back with confluent-kafka: records
keyed by row so that one row's events share a partition in commit order
(the partition Java's and librdkafka's murmur2 partitioner picks for the
key), keyless events in partition 0, a missing topic is an error that says
so, and Kafka's own refusals. What every broker does is in
test_brokers.py."""

import json

import psycopg
import pytest

from conftest import attach, worker_settings
from pgcluster import wait_until
from receivers import KafkaServer

pytestmark = pytest.mark.usefixtures("fast_retries")


@pytest.fixture
def server():
    s = KafkaServer()
    s.create_topic("orders")
    yield s
    s.close()


def java_partitions(server, topic, keys):
    """The partition Confluent's producer, with librdkafka's Java-compatible
    murmur2 partitioner, gives each key."""
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": server.bootstrap, "partitioner": "murmur2"})
    out = {}

    def done(err, msg):
        assert err is None, err
        out[msg.key().decode()] = msg.partition()

    for k in keys:
        p.produce(topic, key=k.encode(), value=b"{}", on_delivery=done)
    assert p.flush(20) == 0
    return out


def test_async_events_are_keyed_by_row_in_commit_order(db, table, server):
    attach(db, table, f"kafka://127.0.0.1:{server.port}/orders", "delivery=async", v="int")
    db.execute(f"INSERT INTO {table} SELECT g, 0 FROM generate_series(1, 200) g")
    for v in range(1, 6):
        db.execute(f"UPDATE {table} SET v = {v}")
    with pytest.raises(psycopg.errors.DivisionByZero):
        with db.conn.transaction():
            db.execute(f"UPDATE {table} SET v = 99")
            db.execute("SELECT 1/0")
    recs = server.records("orders", 1200)
    assert len(recs) == 1200
    by_row = {}
    for r in sorted(recs, key=lambda r: (r["partition"], r["offset"])):
        e = r["value"]
        assert r["headers"]["id"] == f"evt_{e['stream']}_{e['id']}"
        assert r["headers"]["content-type"] == "application/json"
        by_row.setdefault(e["new"]["id"], []).append((r["partition"], r["key"], e["new"]["v"]))
    assert sorted(by_row) == list(range(1, 201))
    for row, seen in by_row.items():
        # One partition and one key per row; its values in commit order.
        assert len({(p, k) for p, k, _ in seen}) == 1, seen
        assert [v for _, _, v in seen] == [0, 1, 2, 3, 4, 5]
    assert len({p for seen in by_row.values() for p, _, _ in seen}) == 3
    # The partition is the one Java's default partitioner gives the key.
    keys = {seen[0][1]: seen[0][0] for seen in by_row.values()}
    server.create_topic("java")
    assert java_partitions(server, "java", keys) == keys
    assert db.one("SELECT count(*) FROM emit.outbox WHERE port = %s", (server.port,)) == 0


@pytest.mark.parametrize("mode", ["sync", "commit"])
def test_sync_and_commit_keep_a_row_in_one_partition(db, table, server, mode):
    attach(db, table, f"kafka://127.0.0.1:{server.port}/orders", f"delivery={mode}",
           "format=cloudevents", v="int")
    db.execute(f"INSERT INTO {table} VALUES (1, 0)")
    db.execute(f"UPDATE {table} SET v = 1")
    db.execute(f"INSERT INTO {table} VALUES (2, 0)")
    recs = server.records("orders", 3)
    assert len(recs) == 3
    one = [r for r in recs if r["value"]["data"]["new"]["id"] == 1]
    assert [r["value"]["data"]["new"]["v"] for r in sorted(one, key=lambda r: r["offset"])] == [0, 1]
    assert len({(r["partition"], r["key"]) for r in one}) == 1
    for r in recs:
        # The CloudEvent's id is the id header; structured mode's type.
        assert r["headers"]["id"] == r["value"]["id"]
        assert r["headers"]["content-type"] == "application/cloudevents+json"
    assert db.warnings() == []


def test_events_without_a_key_are_spread_over_partitions(db, table, server):
    """As Kafka's sticky partitioner does: each round's keyless records to
    one partition, the next round's to the next (0.2.0 put all on 0)."""
    url = f"kafka://127.0.0.1:{server.port}/orders"
    db.execute(f"CREATE TABLE {table} (v int)")  # no primary key
    db.execute(f"CREATE TRIGGER out AFTER INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION "
               f"row_to_destination('{url}', 'delivery=async')")
    for n in range(6):
        db.execute(f"INSERT INTO {table} SELECT g FROM generate_series({n * 10 + 1}, {n * 10 + 10}) g")
        # Delivered before the next, so that each is a round of its own.
        assert wait_until(lambda: db.one("SELECT delivered FROM emit.stats WHERE destination = %s",
                                         (url,)) == (n + 1) * 10)
    recs = server.records("orders", 60)
    assert {r["key"] for r in recs} == {None}
    by_partition = {}
    for r in sorted(recs, key=lambda r: (r["partition"], r["offset"])):
        by_partition.setdefault(r["partition"], []).append(r["value"]["new"]["v"])
    assert sorted(by_partition) == [0, 1, 2]
    for vs in by_partition.values():
        assert vs == sorted(vs) and len(vs) == 20


def test_a_missing_topic_waits_and_says_why(db, table, server):
    attach(db, table, f"kafka://127.0.0.1:{server.port}/invoices", "delivery=async", v="int")
    db.execute(f"INSERT INTO {table} VALUES (1, 0)")
    assert wait_until(lambda: "does not exist" in (db.one(
        "SELECT last_error FROM emit.outbox WHERE port = %s", (server.port,)) or ""), 10)
    db.execute("SET pg_emit.on_error = 'error'")
    with pytest.raises(psycopg.errors.ConnectionFailure) as e:
        db.execute(f"SELECT send_message('kafka://127.0.0.1:{server.port}/invoices', '{{}}', 'sync')")
    assert 'topic "invoices" does not exist' in str(e.value)
    db.execute("RESET pg_emit.on_error")
    server.create_topic("invoices", partitions=1)
    assert [r["value"]["new"]["id"] for r in server.records("invoices", 1, partitions=1)] == [1]


@pytest.mark.parametrize("call, text", [
    ("send_message('kafka://u:pw@127.0.0.1/a', '{}')", "options (username, password)"),
    ("send_message('kafka://127.0.0.1/a/b', '{}')", "kafka://host[:port]/topic"),
    ("send_message('kafka://127.0.0.1/', '{}')", "kafka://host[:port]/topic"),
    ("emit.create_destination('x', 'kafka://127.0.0.1/a', '{\"password\": \"p\"}')",
     "are for SASL, which security_protocol plaintext does not use"),
    ("emit.create_destination('x', 'kafka://127.0.0.1/a', "
     "'{\"format\": \"cloudevents\", \"cloudevents\": \"binary\"}')", "not http"),
    ("emit.create_destination('x', 'kafka://127.0.0.1/a', '{\"record_key\": \"json\"}')",
     'record_key "json" is not hash or columns'),
    ("emit.create_destination('x', 'redis://127.0.0.1/a', '{\"record_key\": \"columns\"}')",
     "record_key applies to kafka:// destinations only"),
])
def test_bad_kafka_destinations(db, call, text):
    with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
        db.execute(f"SELECT {call}")
    assert text in str(e.value)


def test_stored_destination(db, table, dest, server):
    db.execute("SELECT emit.create_destination(%s, %s, %s)",
               (dest, f"kafka://127.0.0.1:{server.port}/orders", json.dumps({"format": "debezium"})))
    attach(db, table, dest, "delivery=async", v="int")
    db.execute(f"INSERT INTO {table} VALUES (7, 0)")
    (r,) = server.records("orders", 1)
    assert r["value"]["after"] == {"id": 7, "v": 0} and r["value"]["op"] == "c"
    assert r["headers"]["id"].startswith("evt_")


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
def test_compressed_batches_read_back(db, table, dest, server, codec):
    """Every codec, read back and decompressed by librdkafka."""
    db.execute("SELECT emit.create_destination(%s, %s, %s)",
               (dest, f"kafka://127.0.0.1:{server.port}/orders", json.dumps({"compression": codec})))
    attach(db, table, dest, "delivery=async")
    db.execute(f"INSERT INTO {table} SELECT g, repeat('x', 1000) FROM generate_series(1, 200) g")
    got = server.records("orders", 200)
    assert sorted(r["value"]["new"]["id"] for r in got) == list(range(1, 201))
    assert all(r["value"]["new"]["v"] == "x" * 1000 for r in got)
    assert db.one("SELECT send_message(%s, '{\"n\": 1}', 'sync')", (dest,)) is True


def test_the_next_bootstrap_broker_is_tried(db, table, server):
    """kafka://down,up/topic: the first does not answer, the second does."""
    from receivers import free_port

    url = f"kafka://127.0.0.1:{free_port()},127.0.0.1:{server.port}/orders"
    attach(db, table, url, "delivery=async")
    db.execute(f"INSERT INTO {table} SELECT g, 'a' FROM generate_series(1, 20) g")
    assert sorted(r["value"]["new"]["id"] for r in server.records("orders", 20)) == list(range(1, 21))
    assert db.one("SELECT destination FROM emit.stats WHERE destination LIKE 'kafka://%%,%%'") == url


@pytest.mark.parametrize("mode", ["sync", "commit", "async"])
def test_record_key_columns_keys_records_by_the_triggers_key_columns(db, table, dest, server, mode):
    """record_key "columns" with a trigger's key=: the record key is those
    columns' values as JSON, in the order key= names them, whatever the
    delivery mode; rows of one key share a partition, Java's for that key."""
    db.execute("SELECT emit.create_destination(%s, %s, %s)",
               (dest, f"kafka://127.0.0.1:{server.port}/orders", json.dumps({"record_key": "columns"})))
    db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, region text, shop int, v int)")
    db.execute(f"CREATE TRIGGER out AFTER INSERT OR UPDATE ON {table} FOR EACH ROW EXECUTE FUNCTION "
               f"row_to_destination('{dest}', 'delivery={mode}', 'key=shop,region')")
    db.execute(f"INSERT INTO {table} SELECT g, CASE WHEN g % 2 = 0 THEN 'eu' ELSE 'us' END, g % 3, 0 "
               "FROM generate_series(1, 12) g")
    db.execute(f"UPDATE {table} SET v = 1")
    recs = server.records("orders", 24)
    assert len(recs) == 24
    partitions = {}
    for r in recs:
        row = r["value"]["new"]
        assert r["key"] == json.dumps({"shop": row["id"] % 3, "region": row["region"]},
                                      separators=(",", ":"))
        partitions.setdefault(r["key"], set()).add(r["partition"])
    assert all(len(p) == 1 for p in partitions.values())
    server.create_topic("java")
    assert java_partitions(server, "java", list(partitions)) == {k: p.pop() for k, p in partitions.items()}
    assert db.warnings() == []


def test_dead_letters_keep_their_keys_when_requeued(cluster, db, table, dest, server):
    """A dead letter keeps each event's ordering key and record key:
    re-queued, a row's events go to its key's partition in order, under
    its record key (before, they went out keyless)."""
    try:
        with worker_settings(cluster, max_attempts=2):
            db.execute("SELECT emit.create_destination(%s, %s, %s)",
                       (dest, f"kafka://127.0.0.1:{server.port}/invoices", json.dumps({"record_key": "columns"})))
            db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v int)")
            db.execute(f"CREATE TRIGGER out AFTER INSERT OR UPDATE ON {table} FOR EACH ROW EXECUTE FUNCTION "
                       f"row_to_destination('{dest}', 'delivery=async')")
            db.execute(f"INSERT INTO {table} SELECT g, 0 FROM generate_series(1, 6) g")
            db.execute(f"UPDATE {table} SET v = 1")
            dead = lambda: db.one("SELECT coalesce(sum(events), 0) FROM emit.dead_letter WHERE destination = %s",
                                  (dest,))
            assert wait_until(lambda: dead() == 12, 20)
            assert db.one("SELECT bool_and(cardinality(keys) = events AND cardinality(record_keys) = events) "
                          "FROM emit.dead_letter WHERE destination = %s", (dest,))
            server.create_topic("invoices")
            assert db.one("SELECT emit.requeue_dead_letters(%s)", (dest,)) == 12
            recs = server.records("invoices", 12)
            assert len(recs) == 12
            by_key = {}
            for r in sorted(recs, key=lambda r: (r["partition"], r["offset"])):
                assert r["key"] == json.dumps({"id": r["value"]["new"]["id"]}, separators=(",", ":"))
                by_key.setdefault(r["key"], []).append((r["partition"], r["value"]["op"]))
            assert all(len({p for p, _ in evs}) == 1 and [op for _, op in evs] == ["INSERT", "UPDATE"]
                       for evs in by_key.values())
            assert java_partitions(server, "invoices", list(by_key)) == {k: v[0][0] for k, v in by_key.items()}
    finally:
        db.execute("DELETE FROM emit.dead_letter WHERE destination = %s", (dest,))
