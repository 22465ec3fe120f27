"""What only Redis Streams destinations do (`redis://host:port/stream`),
against a real redis-server read back with the `redis` client: a stored
destination's password (AUTH) and MAXLEN, credentials kept out of queue
rows and stats, an altered destination leaving its kept connection, and
Redis's own refusals. What every broker does is in test_brokers.py."""

import json

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

