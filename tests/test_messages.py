"""Messages are the caller's: `send_message` delivers the body exactly as
written in every mode and to every sink, its event id beside the body, and
nothing a sender writes is signed with a key it cannot read (0.2.0 added
`"id"` and `"stream"` in front of the caller's keys, duplicating an `id`,
and signed messages to any URL with the server's key: a signing oracle)."""

import base64
import json
import os
import re

import pytest
from standardwebhooks.webhooks import Webhook

from receivers import HttpReceiver, KafkaServer, NatsServer, RedisServer

pytestmark = pytest.mark.usefixtures("fast_retries")

# The caller's own "id" (0.2.0 sent {"id":1,"stream":"…","id":42,…}).
MSG = '{"id": 42, "name": "x"}'
MODES = ["sync", "commit", "async"]
SIGNATURE_HEADERS = ("webhook-signature", "webhook-timestamp", "x-emit-signature", "x-emit-timestamp")


def send(db, dest, mode, msg=MSG):
    assert db.one("SELECT send_message(%s, %s, %s)", (dest, msg, mode)) is True


@pytest.fixture
def server_key(db, secret_file):
    """pg_emit.signing_secret_file set for the cluster (the worker too)."""
    path = secret_file("server-key")
    db.execute(f"ALTER SYSTEM SET pg_emit.signing_secret_file = '{path}'")
    db.execute("SELECT pg_reload_conf()")
    db.execute("LOAD 'pg_emit'")
    db.execute(f"SET pg_emit.signing_secret_file = '{path}'")
    yield
    db.execute("ALTER SYSTEM RESET pg_emit.signing_secret_file")
    db.execute("SELECT pg_reload_conf()")


@pytest.mark.parametrize("mode", MODES)
def test_tcp_gets_the_bytes_as_written(db, nd, mode):
    """Over TCP there is no room beside the body: a message carries no id
    (row events do, in their envelope)."""
    send(db, f"tcp://127.0.0.1:{nd.port}?framing=ndjson", mode, '{"id": 42, "a": [1, 2]}')
    assert nd.wait_for(1) == [b'{"id": 42, "a": [1, 2]}']


def test_any_json_value_and_multi_line_objects_in_async(db, nd):
    dest = f"tcp://127.0.0.1:{nd.port}?framing=ndjson"
    for msg in ['[1, 2]', '"text"', '{\n  "b": 1,\n  "a": "x y"\n}']:
        send(db, dest, "async", msg)
    # A message of several lines becomes one (an outbox line): only the
    # whitespace between tokens goes, keys keep their order.
    assert nd.wait_for(3) == [b"[1, 2]", b'"text"', b'{"b":1,"a":"x y"}']


def test_http_messages_are_unsigned_even_with_a_server_key(db, table, dest, server_key):
    """A sender must not collect signatures made with the server's key: it
    could replay them to the receiver that trusts them. Trigger events to the
    same URL are still signed (the key is in use)."""
    rx = HttpReceiver()
    try:
        db.execute("SELECT emit.create_destination(%s, %s)", (dest, rx.url))
        for target in (rx.url, dest):
            for mode in MODES:
                send(db, target, mode)
        db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
        db.execute(f"CREATE TRIGGER out AFTER INSERT ON {table} FOR EACH ROW "
                   f"EXECUTE FUNCTION row_to_http('{rx.url}', 'delivery=async')")
        db.execute(f"INSERT INTO {table} VALUES (1)")
        reqs = rx.wait_for(7)
        messages = [r for r in reqs if r[3] == MSG.encode()]
        events = [r for r in reqs if r[3] != MSG.encode()]
        assert len(messages) == 6 and len(events) == 1
        for _, _, headers, _, _ in messages:
            assert not any(h in headers for h in SIGNATURE_HEADERS), headers
            assert headers["webhook-id"].startswith("message_")
        assert "x-emit-signature" in events[0][2]
        assert events[0][2]["webhook-id"].startswith("evt_")
        # Async messages: numbered by the worker in their destination's
        # stream (the URL's is the row event's).
        stream = json.loads(events[0][3])["stream"]
        numbered = [r[2]["webhook-id"] for r in messages
                    if re.fullmatch(r"message_[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}_\d+", r[2]["webhook-id"])]
        assert len(numbered) == 2 and any(i.startswith(f"message_{stream}_") for i in numbered)
    finally:
        rx.close()


def test_a_destinations_own_secret_signs_messages_as_messages(db, table, dest):
    """A stored destination with its own secret signs what any sender sends
    to it, under a `message_` id: the signed id tells its receiver that a
    caller wrote the body, even a body identical to a row event."""
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    rx = HttpReceiver()
    try:
        db.execute("SELECT emit.create_destination(%s, %s, %s)",
                   (dest, rx.url, json.dumps({"secret": secret})))
        db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
        db.execute(f"CREATE TRIGGER out AFTER INSERT ON {table} FOR EACH ROW "
                   f"EXECUTE FUNCTION row_to_destination('{dest}', 'delivery=async')")
        db.execute(f"INSERT INTO {table} VALUES (1)")
        (event,) = rx.wait_for(1)
        # The same bytes as the row event, sent as a message in each mode.
        forged = event[3].decode()
        for mode in MODES:
            send(db, dest, mode, forged)
        reqs = rx.wait_for(4)
        assert [r[3] for r in reqs] == [event[3]] * 4
        wh = Webhook(secret)
        ids = []
        for _, _, headers, body, _ in reqs:
            wh.verify(body, headers)
            ids.append(headers["webhook-id"])
        assert ids[0].startswith("evt_")
        assert all(i.startswith("message_") for i in ids[1:]), ids
    finally:
        rx.close()


def test_cloudevents_wrap_a_message_with_a_message_id(db, dest):
    rx = HttpReceiver()
    try:
        db.execute("SELECT emit.create_destination(%s, %s, '{\"format\": \"cloudevents\"}')", (dest, rx.url))
        for mode in MODES:
            send(db, dest, mode)
        reqs = rx.wait_for(3)
        for _, _, headers, body, _ in reqs:
            ce = json.loads(body)
            assert ce["type"] == "pg_emit.message" and ce["data"] == json.loads(MSG)
            assert ce["id"] == headers["webhook-id"] and ce["id"].startswith("message_")
    finally:
        rx.close()


@pytest.mark.parametrize("mode", MODES)
def test_redis_gets_the_id_in_its_field(db, mode):
    server = RedisServer()
    try:
        send(db, f"redis://127.0.0.1:{server.port}/s", mode)
        ((_, eid, event),) = server.wait_for("s", 1)
        raw = server.client.xrange("s")[0][1][b"event"]
        assert raw == MSG.encode() and event == {"id": 42, "name": "x"}
        assert eid.startswith("message_")
    finally:
        server.close()


@pytest.mark.parametrize("mode", MODES)
def test_nats_gets_the_id_as_nats_msg_id(db, mode):
    server = NatsServer()
    try:
        server.add_stream("ORDERS", ["orders.>"])
        send(db, f"nats://127.0.0.1:{server.port}/orders.x", mode)
        ((msg_id, event),) = server.wait_for("ORDERS", 1)
        assert event == {"id": 42, "name": "x"}
        assert msg_id.startswith("message_")
    finally:
        server.close()


def test_kafka_gets_the_id_as_a_header(db):
    server = KafkaServer()
    try:
        server.create_topic("orders")
        for mode in MODES:
            send(db, f"kafka://127.0.0.1:{server.port}/orders", mode)
        records = server.records("orders", 3)
        assert [r["value"] for r in records] == [{"id": 42, "name": "x"}] * 3
        assert all(r["headers"]["id"].startswith("message_") for r in records)
    finally:
        server.close()
