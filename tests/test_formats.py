"""Formats other people's receivers already parse: Supabase Database
Webhooks, Debezium change events and CloudEvents 1.0, compared with what
those projects publish and parsed by the CloudEvents SDK (PyPI
`cloudevents`), in every delivery mode."""

import json

import psycopg
import pytest
from cloudevents.core.bindings.http import HTTPMessage, from_http_event

from receivers import HttpReceiver, Receiver

pytestmark = pytest.mark.usefixtures("fast_retries")


@pytest.fixture
def rx():
    r = HttpReceiver()
    yield r
    r.close()


def bodies(rx, n):
    got = rx.wait_for(n)
    assert len(got) >= n, got
    return [json.loads(r[3]) for r in got[:n]]


def row_trigger(db, table, dest, *opts, ops="INSERT OR UPDATE OR DELETE"):
    extra = "".join(f", '{o}'" for o in opts)
    db.execute(f"CREATE TRIGGER out AFTER {ops} ON {table} FOR EACH ROW "
               f"EXECUTE FUNCTION row_to_destination('{dest}'{extra})")


# --- Supabase -----------------------------------------------------------
#
# Supabase's Database Webhooks send what their trigger function
# supabase_functions.http_request() builds (supabase/postgres,
# migrations/db/migrations/20240822021428_enable_webhooks_by_default.sql):
#   jsonb_build_object('old_record', OLD, 'record', NEW, 'type', TG_OP,
#                      'table', TG_TABLE_NAME, 'schema', TG_TABLE_SCHEMA)
# The documented types (https://supabase.com/docs/guides/database/webhooks#payload,
# InsertPayload / UpdatePayload / DeletePayload) name the same five keys
# (plus a `user_id` that the function has never sent). The test runs that
# very expression in a trigger beside pg_emit's and compares the two.
SUPABASE_SQL = """
CREATE FUNCTION {t}_supabase() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO {t}_expected(payload) VALUES (jsonb_build_object(
    'old_record', OLD, 'record', NEW, 'type', TG_OP,
    'table', TG_TABLE_NAME, 'schema', TG_TABLE_SCHEMA));
  RETURN NULL;
END $$;
CREATE TRIGGER supabase AFTER INSERT OR UPDATE OR DELETE ON {t}
  FOR EACH ROW EXECUTE FUNCTION {t}_supabase();
"""


@pytest.mark.parametrize("mode", ["sync", "commit", "async"])
def test_supabase_bodies_are_what_supabase_builds(db, table, rx, mode):
    db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, note text, tags text[], at timestamptz)")
    db.execute(f"CREATE TABLE {table}_expected (n serial, payload jsonb)")
    db.execute(SUPABASE_SQL.format(t=table))
    db.execute(f"CREATE TRIGGER out AFTER INSERT OR UPDATE OR DELETE ON {table} FOR EACH ROW "
               f"EXECUTE FUNCTION row_to_http('{rx.url}', 'format=supabase', 'delivery={mode}')")
    try:
        db.execute(f"INSERT INTO {table} VALUES (1, 'é \"q\"', '{{a,b}}', '2026-11-21 10:00+00')")
        db.execute(f"UPDATE {table} SET note = 'x' WHERE id = 1")
        db.execute(f"DELETE FROM {table}")
        got = bodies(rx, 3)
        expected = [r[0] for r in db.execute(f"SELECT payload FROM {table}_expected ORDER BY n")]
        assert got == expected
        assert [list(b) for b in got] == [["type", "table", "schema", "record", "old_record"]] * 3
        # No id in the body: it travels in webhook-id, stable in async.
        assert all("webhook-id" in r[2] for r in rx.requests)
        assert all(r[2]["content-type"] == "application/json" for r in rx.requests)
    finally:
        db.execute(f"DROP TABLE {table}_expected")
        db.execute(f"DROP FUNCTION {table}_supabase() CASCADE")


# --- Debezium -----------------------------------------------------------
#
# The value `payload` of Debezium's PostgreSQL connector, as its reference
# documents it (https://debezium.io/documentation/reference/stable/connectors/postgresql.html,
# sections #postgresql-create-events, -update-events, -delete-events and
# -truncate-events; debezium/debezium
# documentation/modules/ROOT/pages/connectors/postgresql.adoc). The
# create example's `source` also has `sequence`, Debezium's replication
# offsets, which a trigger has no equivalent of; the update and delete
# examples do not have it either.
DEBEZIUM_TOP = {"before", "after", "source", "op", "ts_ms", "ts_us", "ts_ns"}
DEBEZIUM_TRUNCATE_TOP = {"source", "op", "ts_ms", "ts_us", "ts_ns"}
DEBEZIUM_SOURCE = {"version", "connector", "name", "ts_ms", "ts_us", "ts_ns", "snapshot", "db",
                   "schema", "table", "txId", "lsn", "xmin"}


def test_debezium_change_events_match_the_documented_value(db, table, rx):
    db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, n numeric)")
    row_trigger(db, table, rx.url, "format=debezium", "delivery=async")
    db.execute(f"CREATE TRIGGER out_t AFTER TRUNCATE ON {table} FOR EACH STATEMENT "
               f"EXECUTE FUNCTION row_to_destination('{rx.url}', 'format=debezium', 'delivery=async')")
    with db.conn.transaction():
        before_lsn = db.one("SELECT pg_current_wal_insert_lsn() - '0/0'")
        db.execute(f"INSERT INTO {table} VALUES (1, 1.50)")
        xid = db.one("SELECT txid_current() % 4294967296")
        after_lsn = db.one("SELECT pg_current_wal_insert_lsn() - '0/0'")
        now_ms = db.one("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint")
    db.execute(f"UPDATE {table} SET n = 2.25")
    db.execute(f"DELETE FROM {table}")
    db.execute(f"TRUNCATE {table}")
    c, u, d, t = bodies(rx, 4)
    for ev in (c, u, d):
        assert set(ev) == DEBEZIUM_TOP
    assert set(t) == DEBEZIUM_TRUNCATE_TOP
    for ev in (c, u, d, t):
        assert set(ev["source"]) == DEBEZIUM_SOURCE
        assert ev["source"]["connector"] == "pg_emit"
        assert ev["source"]["db"] == ev["source"]["name"] == db.one("SELECT current_database()")
        assert (ev["source"]["schema"], ev["source"]["table"]) == ("public", table)
        assert ev["source"]["snapshot"] == "false"
        assert ev["ts_ms"] == ev["source"]["ts_ms"] == ev["ts_us"] // 1000
    assert [e["op"] for e in (c, u, d, t)] == ["c", "u", "d", "t"]
    assert (c["before"], c["after"]) == (None, {"id": 1, "n": 1.50})
    assert (u["before"], u["after"]) == ({"id": 1, "n": 1.50}, {"id": 1, "n": 2.25})
    assert (d["before"], d["after"]) == ({"id": 1, "n": 2.25}, None)
    # txId is the writing transaction's; lsn is where the WAL was when the
    # row was written; ts_ms is when.
    assert c["source"]["txId"] == xid
    assert before_lsn < c["source"]["lsn"] <= after_lsn
    assert now_ms - 5000 < c["ts_ms"] <= now_ms
    assert len({c["source"]["txId"], u["source"]["txId"], d["source"]["txId"]}) == 3


# --- CloudEvents --------------------------------------------------------

def parse_ce(req):
    """The SDK's own reading of a request (structured or binary mode)."""
    return from_http_event(HTTPMessage(headers=req[2], body=req[3]))


def test_cloudevents_structured_async_keeps_its_id_across_retries(db, table):
    rx = HttpReceiver(script=[(503, {}, b"busy")])
    try:
        db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
        row_trigger(db, table, rx.url, "format=cloudevents", "delivery=async")
        db.execute(f"INSERT INTO {table} VALUES (7)")
        first, retry = rx.wait_for(2)[:2]
        a, b = parse_ce(first), parse_ce(retry)
        assert first[2]["content-type"] == "application/cloudevents+json"
        assert a.get_id() == b.get_id() == retry[2]["webhook-id"]
        assert a.get_id().startswith("evt_")
        assert a.get_type() == "pg_emit.row.insert"
        assert a.get_source() == "/pg_emit/" + db.one("SELECT current_database()")
        assert a.get_subject() == f"public.{table}"
        assert a.get_datacontenttype() == "application/json"
        assert a.get_data() == {"op": "INSERT", "schema": "public", "table": table,
                                "new": {"id": 7}, "old": None}
        # The time is the change's, not the send's: the same on the retry.
        assert a.get_time() == b.get_time()
        assert json.loads(first[3])["time"].endswith("Z")
    finally:
        rx.close()


@pytest.mark.parametrize("mode", ["sync", "commit", "async"])
def test_cloudevents_binary_mode(db, table, dest, rx, mode):
    db.execute("SELECT emit.create_destination(%s, %s, %s)",
               (dest, rx.url, json.dumps({"format": "cloudevents", "cloudevents": "binary",
                                          "headers": {"Authorization": "Bearer t"}})))
    name = f"{table}_é"
    db.execute(f'CREATE TABLE "{name}" (id int PRIMARY KEY, big numeric)')
    try:
        db.execute(f'CREATE TRIGGER out AFTER INSERT ON "{name}" FOR EACH ROW '
                   f"EXECUTE FUNCTION row_to_destination('{dest}', 'delivery={mode}')")
        db.execute(f'INSERT INTO "{name}" VALUES (1, 12345678901234567890.5), (2, 0)')
        reqs = rx.wait_for(2)
        assert len(reqs) == 2
        events = [parse_ce(r) for r in reqs]
        for r, ev in zip(reqs, events):
            assert r[2]["content-type"] == "application/json"
            assert r[2]["authorization"] == "Bearer t"
            assert r[2]["ce-specversion"] == "1.0"
            # Percent-encoded on the wire, decoded by the SDK.
            assert "%C3%A9" in r[2]["ce-subject"]
            assert ev.get_subject() == f"public.{name}"
            assert ev.get_type() == "pg_emit.row.insert"
            assert ev.get_id() == r[2]["ce-id"] == r[2]["webhook-id"]
        # The body is only data, numbers as PostgreSQL wrote them. (Async
        # requests for different rows may arrive in either order.)
        first = next(r for r, ev in zip(reqs, events) if ev.get_data()["new"]["id"] == 1)
        assert b"12345678901234567890.5" in first[3]
        assert events[0].get_id() != events[1].get_id()
        prefix = "evt_" if mode == "async" else "msg_"
        assert all(ev.get_id().startswith(prefix) for ev in events)
    finally:
        db.execute(f'DROP TABLE "{name}"')


def test_cloudevents_batches_are_the_batched_content_mode(db, table, dest, rx):
    db.execute("SELECT emit.create_destination(%s, %s, %s)",
               (dest, rx.url, json.dumps({"format": "cloudevents", "batch": 3})))
    db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
    row_trigger(db, table, dest, "delivery=async")
    db.execute(f"INSERT INTO {table} SELECT generate_series(1, 3)")
    req = rx.wait_for(1)[0]
    assert req[2]["content-type"] == "application/cloudevents-batch+json"
    # The SDK does not read batches yet (cloudevents/sdk-python#130): each
    # element goes through its structured-mode reader.
    events = [from_http_event(HTTPMessage(headers={"content-type": "application/cloudevents+json"},
                                          body=json.dumps(e).encode()))
              for e in json.loads(req[3])]
    assert [e.get_data()["new"]["id"] for e in events] == [1, 2, 3]
    assert len({e.get_id() for e in events}) == 3


def test_binary_mode_on_a_batched_destination_goes_one_by_one(db, table, dest, rx):
    db.execute("SELECT emit.create_destination(%s, %s, '{\"batch\": 10}')", (dest, rx.url))
    db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
    row_trigger(db, table, dest, "format=cloudevents", "cloudevents=binary", "delivery=async")
    db.execute(f"INSERT INTO {table} SELECT generate_series(1, 3)")
    reqs = rx.wait_for(3)
    assert len(reqs) == 3
    assert all(r[2]["content-type"] == "application/json" and "ce-id" in r[2] for r in reqs)
    assert sorted(parse_ce(r).get_data()["new"]["id"] for r in reqs) == [1, 2, 3]


def test_two_formats_to_one_destination_keep_commit_order(db, table, dest):
    nd = Receiver("ndjson")
    try:
        db.execute("SELECT emit.create_destination(%s, %s)",
                   (dest, f"tcp://127.0.0.1:{nd.port}?framing=ndjson"))
        db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
        db.execute(f"CREATE TABLE {table}_b (id int PRIMARY KEY)")
        row_trigger(db, table, dest, "delivery=async")
        db.execute(f"CREATE TRIGGER out AFTER INSERT ON {table}_b FOR EACH ROW "
                   f"EXECUTE FUNCTION row_to_destination('{dest}', 'format=supabase', 'delivery=async')")
        with db.conn.transaction():
            db.execute(f"INSERT INTO {table} VALUES (1)")
            db.execute(f"INSERT INTO {table}_b VALUES (1)")
            db.execute(f"INSERT INTO {table} VALUES (2)")
        got = [json.loads(m) for m in nd.wait_for(3)]
        assert [(e.get("op") or e.get("type"), (e.get("new") or e.get("record"))["id"], e["table"])
                for e in got] == [("INSERT", 1, table), ("INSERT", 1, f"{table}_b"), ("INSERT", 2, table)]
    finally:
        nd.close()
        db.execute(f"DROP TABLE IF EXISTS {table}_b")


def test_cloudevents_over_tcp_and_for_messages(db, dest):
    nd = Receiver("ndjson")
    try:
        db.execute("SELECT emit.create_destination(%s, %s, '{\"format\": \"cloudevents\"}')",
                   (dest, f"tcp://127.0.0.1:{nd.port}?framing=ndjson"))
        db.execute("SELECT send_message(%s, '{\"hello\": [1, 2]}')", (dest,))
        db.execute("SELECT send_message(%s, '{\"hello\": 3}', 'sync')", (dest,))
        lines = nd.wait_for(2)
        events = [from_http_event(HTTPMessage(headers={"content-type": "application/cloudevents+json"},
                                              body=line.encode() if isinstance(line, str) else line))
                  for line in lines]
        assert sorted(json.dumps(e.get_data()) for e in events) == ['{"hello": 3}', '{"hello": [1, 2]}']
        assert {e.get_type() for e in events} == {"pg_emit.message"}
        assert all(e.get_subject() is None for e in events)
    finally:
        nd.close()


@pytest.mark.parametrize("fmt, new_key", [("supabase", "record"), ("debezium", "after"),
                                          ("cloudevents", None)])
def test_statement_level_messages_in_each_format(db, table, rx, fmt, new_key):
    db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
    db.execute(f"CREATE TRIGGER out AFTER INSERT ON {table} REFERENCING NEW TABLE AS ins "
               f"FOR EACH STATEMENT EXECUTE FUNCTION row_to_http('{rx.url}', 'format={fmt}')")
    db.execute(f"INSERT INTO {table} SELECT generate_series(1, 3)")
    msg = bodies(rx, 1)[0]
    if fmt == "cloudevents":
        ev = parse_ce(rx.requests[0])
        assert ev.get_type() == "pg_emit.statement.insert"
        assert [r["new"]["id"] for r in ev.get_data()["rows"]] == [1, 2, 3]
    else:
        assert [r[new_key]["id"] for r in msg["rows"]] == [1, 2, 3]
    if fmt == "supabase":
        assert (msg["type"], msg["table"], msg["schema"]) == ("INSERT", table, "public")
    if fmt == "debezium":
        assert msg["op"] == "c" and msg["source"]["table"] == table


@pytest.mark.parametrize("call, text", [
    ("emit.create_destination('x', 'tcp://127.0.0.1:1', "
     "'{\"format\": \"cloudevents\", \"cloudevents\": \"binary\"}')", "not http"),
    ("emit.create_destination('x', 'http://127.0.0.1:1/', '{\"cloudevents\": \"binary\"}')",
     "applies to format=cloudevents"),
    ("emit.create_destination('x', 'http://127.0.0.1:1/', "
     "'{\"format\": \"cloudevents\", \"cloudevents\": \"binary\", \"batch\": 5}')", "batch must be 1"),
    ("emit.create_destination('x', 'http://127.0.0.1:1/', '{\"format\": \"cloudevents-binary\"}')",
     "unknown variant"),
])
def test_bad_format_options_are_refused(db, call, text):
    with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
        db.execute(f"SELECT {call}")
    assert text in str(e.value)


def test_trigger_format_options_are_checked(db, table):
    db.execute(f"CREATE TABLE {table} (id int)")
    db.execute(f"CREATE TRIGGER out AFTER INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION "
               "row_to_destination('tcp://127.0.0.1:1', 'format=cloudevents', 'cloudevents=binary')")
    with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
        db.execute(f"INSERT INTO {table} VALUES (1)")
    assert "not http" in str(e.value) and "row_to_destination trigger" in str(e.value)
    db.execute(f"DROP TRIGGER out ON {table}")
    db.execute(f"CREATE TRIGGER out AFTER INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION "
               "row_to_http('http://127.0.0.1:1/', 'format=avro')")
    with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
        db.execute(f"INSERT INTO {table} VALUES (1)")
    assert "json, td, supabase, debezium or cloudevents" in str(e.value)
