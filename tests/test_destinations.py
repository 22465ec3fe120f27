"""Stored destinations (emit.create_destination / alter / drop),
row_to_destination and send_message, against real receivers."""

import json

import psycopg
import pytest

from conftest import Session
from pgcluster import wait_until
from receivers import HttpReceiver, Receiver, free_port

pytestmark = pytest.mark.usefixtures("fast_retries")

SECRET = "Bearer s3cret-token-do-not-log"


def body(req):
    return json.loads(req[3])


def test_stored_http_destination_keeps_credentials_out_of_triggers_and_stats(db, table, dest):
    rx = HttpReceiver()
    try:
        db.execute(
            "SELECT emit.create_destination(%s, %s, %s)",
            (dest, rx.url, json.dumps({"headers": {"Authorization": SECRET}})),
        )
        db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
        db.execute(
            f"CREATE TRIGGER out AFTER INSERT ON {table} FOR EACH ROW "
            f"EXECUTE FUNCTION row_to_destination('{dest}', 'delivery=async')"
        )
        db.execute(f"INSERT INTO {table} VALUES (1, 'a'), (2, 'b')")
        got = rx.wait_for(2)
        assert sorted(body(r)["new"]["id"] for r in got) == [1, 2]  # two rows: in parallel
        assert all(r[2]["authorization"] == SECRET for r in got)
        assert all(isinstance(body(r)["id"], int) for r in got)
        # The secret is in the catalog only: not in pg_trigger, not in stats.
        args = db.one(
            "SELECT encode(tgargs, 'escape') FROM pg_trigger WHERE tgname = 'out' "
            "AND tgrelid = %s::regclass", (table,)
        )
        assert "s3cret" not in args
        stats = db.execute("SELECT * FROM emit.stats WHERE destination = %s", (dest,)).fetchall()
        assert stats and "s3cret" not in repr(stats)
        assert wait_until(lambda: db.one(
            "SELECT delivered FROM emit.stats WHERE destination = %s", (dest,)) == 2)
    finally:
        rx.close()


def test_alter_redirects_later_and_queued_events(db, table, dest):
    old, new = HttpReceiver(), HttpReceiver()
    try:
        db.execute("SELECT emit.create_destination(%s, %s)", (dest, old.url))
        db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
        db.execute(
            f"CREATE TRIGGER out AFTER INSERT ON {table} FOR EACH ROW "
            f"EXECUTE FUNCTION row_to_destination('{dest}', 'delivery=async')"
        )
        db.execute(f"INSERT INTO {table} VALUES (1)")
        assert len(old.wait_for(1)) == 1
        # Counted delivered (else it is sent again, rightly, to the new URL).
        assert wait_until(lambda: db.one(
            "SELECT delivered FROM emit.stats WHERE destination = %s", (dest,)) == 1, 10)
        # The old receiver goes away with an event queued for it.
        old.kill()
        db.execute(f"INSERT INTO {table} VALUES (2)")
        assert wait_until(lambda: db.one(
            "SELECT failed_attempts FROM emit.stats WHERE destination = %s", (dest,)) > 0, 10)
        # One ALTER, no trigger touched: the queued event and later ones go
        # to the new URL, sync ones too.
        db.execute("SELECT emit.alter_destination(%s, url => %s)", (dest, new.url))
        db.execute(f"INSERT INTO {table} VALUES (3)")
        got = new.wait_for(2, timeout=15)
        assert [body(r)["new"]["id"] for r in got] == [2, 3]
        db.execute(
            f"CREATE TRIGGER out_sync AFTER INSERT ON {table} FOR EACH ROW "
            f"EXECUTE FUNCTION row_to_destination('{dest}')"
        )
        db.execute(f"INSERT INTO {table} VALUES (4)")
        assert sorted(body(r)["new"]["id"] for r in new.wait_for(4)) == [2, 3, 4, 4]
    finally:
        new.close()


def test_a_change_is_seen_by_other_sessions_at_once(cluster, db, table, dest):
    a, b = Receiver("ndjson"), Receiver("ndjson")
    other = Session(cluster)
    try:
        db.execute("SELECT emit.create_destination(%s, %s)",
                   (dest, f"tcp://127.0.0.1:{a.port}?framing=ndjson"))
        db.execute(f"CREATE TABLE {table} (id int)")
        db.execute(f"CREATE TRIGGER out AFTER INSERT ON {table} FOR EACH ROW "
                   f"EXECUTE FUNCTION row_to_destination('{dest}')")
        other.execute(f"INSERT INTO {table} VALUES (1)")  # caches the lookup
        assert len(a.wait_for(1)) == 1
        db.execute("SELECT emit.alter_destination(%s, %s)",
                   (dest, f"tcp://127.0.0.1:{b.port}?framing=ndjson"))
        other.execute(f"INSERT INTO {table} VALUES (2)")
        assert [json.loads(m)["new"]["id"] for m in b.wait_for(1)] == [2]
        assert len(a.messages) == 1
    finally:
        other.close()
        a.close()
        b.close()


def test_dropped_destination_fails_triggers_and_holds_queued_events(db, table, dest):
    port = free_port()
    db.execute("SELECT emit.create_destination(%s, %s)", (dest, f"tcp://127.0.0.1:{port}?framing=ndjson"))
    db.execute(f"CREATE TABLE {table} (id int)")
    db.execute(f"CREATE TRIGGER out AFTER INSERT ON {table} FOR EACH ROW "
               f"EXECUTE FUNCTION row_to_destination('{dest}', 'delivery=async')")
    db.execute(f"INSERT INTO {table} VALUES (1)")
    db.execute("SELECT emit.drop_destination(%s)", (dest,))
    with pytest.raises(psycopg.errors.UndefinedObject) as e:
        db.execute(f"INSERT INTO {table} VALUES (2)")
    assert f'destination "{dest}" does not exist' in str(e.value)
    # The queued event waits, saying why.
    assert wait_until(lambda: "does not exist" in (db.one(
        "SELECT last_error FROM emit.stats WHERE destination = %s", (dest,)) or ""), 10)
    rx = Receiver("ndjson", port=port)
    try:
        db.execute("SELECT emit.create_destination(%s, %s)", (dest, f"tcp://127.0.0.1:{port}?framing=ndjson"))
        got = rx.wait_for(1, timeout=15)
        assert [json.loads(m)["new"]["id"] for m in got] == [1]
    finally:
        rx.close()


@pytest.mark.parametrize("call, state, text", [
    ("emit.create_destination('x', 'tcp://127.0.0.1:1', '{\"header\": {}}')", "22023", "unknown field `header`"),
    ("emit.create_destination('x', 'tcp://127.0.0.1:1', '{\"headers\": {\"A\": \"b\"}}')", "22023",
     "headers apply to http"),
    ("emit.create_destination('x', 'https://h/x', '{\"headers\": {\"webhook-signature\": \"v1,x\"}}')",
     "22023", "cannot be set"),
    ("emit.create_destination('x', 'https://h/x', '{\"format\": \"xml\"}')", "22023", "unknown variant `xml`"),
    ("emit.create_destination('x', 'ftp://h/x')", "22023", "neither a destination URL"),
    ("emit.create_destination('x', 'tcp://h')", "22023", "port is missing"),
    ("emit.create_destination('1x', 'tcp://h:1')", "22023", "must start with a letter"),
    ("emit.create_destination('a:b', 'tcp://h:1')", "22023", "must start with a letter"),
    ("emit.alter_destination('nope', 'tcp://h:1')", "42704", 'destination "nope" does not exist'),
    ("emit.alter_destination(NULL, 'tcp://h:1')", "22004", "name must not be NULL"),
    ("emit.drop_destination('nope')", "42704", 'destination "nope" does not exist'),
    ("send_message('nope', '{}')", "42704", 'destination "nope" does not exist'),
    ("send_message('tcp://127.0.0.1:1', '{}', 'later')", "22023", "sync, commit or async"),
    ("send_message('tcp://127.0.0.1:1', 'hello')", "22023", "not JSON"),
])
def test_bad_input_is_refused_with_its_sqlstate(db, call, state, text):
    with pytest.raises(psycopg.Error) as e:
        db.execute(f"SELECT {call}")
    assert e.value.sqlstate == state, e.value
    assert text in str(e.value)


def test_create_twice_is_a_duplicate(db, dest):
    db.execute("SELECT emit.create_destination(%s, 'tcp://127.0.0.1:1')", (dest,))
    with pytest.raises(psycopg.errors.DuplicateObject):
        db.execute("SELECT emit.create_destination(%s, 'tcp://127.0.0.1:2')", (dest,))


def test_trigger_arguments_are_checked(db, table):
    db.execute(f"CREATE TABLE {table} (id int)")
    db.execute(f"CREATE TRIGGER out AFTER INSERT ON {table} FOR EACH ROW "
               "EXECUTE FUNCTION row_to_destination('tcp://127.0.0.1:1', 'framing=ndjson')")
    with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
        db.execute(f"INSERT INTO {table} VALUES (1)")
    assert "unknown option \"framing\"" in str(e.value)
    assert "row_to_destination takes" in e.value.diag.message_hint


def test_only_emit_admin_manages_and_reads_destinations(cluster, db, dest):
    for role, grant in (("dest_sender", "emit_sender"), ("dest_admin", "emit_admin")):
        db.execute(f"DROP ROLE IF EXISTS {role}")
        db.execute(f"CREATE ROLE {role} LOGIN IN ROLE {grant}")
    db.execute("SELECT emit.create_destination(%s, 'https://h/x', %s)",
               (dest, json.dumps({"headers": {"Authorization": SECRET}})))
    sender = Session(cluster, user="dest_sender")
    admin = Session(cluster, user="dest_admin")
    try:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            sender.execute("SELECT emit.create_destination('mine', 'tcp://127.0.0.1:1')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            sender.execute("SELECT * FROM emit.stored_destinations")
        # The sender may use it by name without seeing it.
        assert sender.one("SELECT send_message(%s, '{}', 'commit')", (dest,)) is True
        assert SECRET in admin.one("SELECT options::text FROM emit.stored_destinations WHERE name = %s", (dest,))
        admin.execute("SELECT emit.alter_destination(%s, options => '{}')", (dest,))
    finally:
        sender.close()
        admin.close()
        db.execute("DROP ROLE dest_sender")
        db.execute("DROP ROLE dest_admin")


def test_send_message_in_each_mode(db, dest):
    nd = Receiver("ndjson")
    eof = Receiver("eof")
    try:
        url = f"tcp://127.0.0.1:{nd.port}?framing=ndjson"
        db.execute("SELECT emit.create_destination(%s, %s)", (dest, url))
        # sync: sent before the call returns; a multi-line object is one line.
        assert db.one("SELECT send_message(%s, %s, 'sync')", (dest, '{\n "n": 1\n}')) is True
        assert nd.wait_for(1) == [b'{"n":1}']
        # sync with close framing: the bytes as given.
        assert db.one("SELECT send_message(%s, 'plain text', 'sync')", (f"tcp://127.0.0.1:{eof.port}",)) is True
        assert eof.wait_for(1) == [b"plain text"]
        # sync to nobody: false, and a WARNING saying why.
        assert db.one("SELECT send_message(%s, '{}', 'sync')", (f"tcp://127.0.0.1:{free_port()}",)) is False
        assert "refused" in db.warnings()[-1]
        # commit: nothing for a rollback, the message after a commit.
        db.execute("BEGIN")
        db.execute("SELECT send_message(%s, '{\"n\":2}', 'commit')", (dest,))
        db.execute("ROLLBACK")
        db.execute("BEGIN")
        db.execute("SELECT send_message(%s, '{\"n\":3}', 'commit')", (dest,))
        db.execute("COMMIT")
        # (Read before the next one, which comes on the worker's own
        # connection: the receiver reads each connection on its thread.)
        assert nd.wait_for(2) == [b'{"n":1}', b'{"n":3}']
        # async (the default): durable, and as the caller wrote it.
        db.execute("BEGIN")
        db.execute("SELECT send_message(%s, '{\"n\":4}')", (dest,))
        db.execute("ROLLBACK")
        assert db.one("SELECT send_message(%s, '{\"n\": 5}', key => 'k1')", (dest,)) is True
        assert nd.wait_for(3) == [b'{"n":1}', b'{"n":3}', b'{"n": 5}']
        assert db.one("SELECT send_message(NULL, '{}')") is None
    finally:
        nd.close()
        eof.close()


def test_slow_http_receiver_gets_requests_in_parallel_in_per_row_order(db, table):
    """A receiver that takes 20 ms per request: 600 events one at a time
    would take 12 s; 32 in flight take well under 3 s, and each row's
    events still arrive in commit order."""
    rx = HttpReceiver(delay=0.02)
    try:
        db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v int)")
        db.execute(f"CREATE TRIGGER out AFTER INSERT OR UPDATE ON {table} FOR EACH ROW "
                   f"EXECUTE FUNCTION row_to_http('{rx.url}', 'delivery=async')")
        db.execute("BEGIN")
        db.execute(f"INSERT INTO {table} SELECT g, 0 FROM generate_series(1, 200) g")
        db.execute(f"UPDATE {table} SET v = v + 1")
        db.execute(f"UPDATE {table} SET v = v + 1")
        db.execute("COMMIT")
        t = __import__("time").monotonic()
        got = rx.wait_for(600, timeout=30)
        elapsed = __import__("time").monotonic() - t
        assert len(got) == 600
        assert elapsed < 8, elapsed  # one at a time would take 12 s
        per_row = {}
        for r in got:
            e = body(r)
            per_row.setdefault(e["new"]["id"], []).append(e["new"]["v"])
        assert all(seq == [0, 1, 2] for seq in per_row.values()), per_row
        # Not merely in order because nothing overlapped.
        assert len({r[4] // 0.02 for r in got}) < 300
    finally:
        rx.close()


def test_order_destination_sends_one_at_a_time(db, table, dest):
    rx = HttpReceiver(delay=0.02)
    try:
        db.execute("SELECT emit.create_destination(%s, %s, %s)",
                   (dest, rx.url, json.dumps({"order": "destination", "concurrency": 8})))
        db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
        db.execute(f"CREATE TRIGGER out AFTER INSERT ON {table} FOR EACH ROW "
                   f"EXECUTE FUNCTION row_to_destination('{dest}', 'delivery=async')")
        db.execute(f"INSERT INTO {table} SELECT g FROM generate_series(1, 30) g")
        got = rx.wait_for(30)
        assert [body(r)["new"]["id"] for r in got] == list(range(1, 31))
        # One connection, one request at a time.
        assert len(rx.peers) == 1
    finally:
        rx.close()


def test_batches_carry_many_events_per_request_and_refusals_dead_letter_each(db, table, dest):
    rx = HttpReceiver(script=[(200, {}, b"ok"), (422, {}, b"no")])
    try:
        db.execute("SELECT emit.create_destination(%s, %s, %s)",
                   (dest, rx.url, json.dumps({"batch": 50, "order": "destination"})))
        db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
        db.execute(f"CREATE TRIGGER out AFTER INSERT ON {table} FOR EACH ROW "
                   f"EXECUTE FUNCTION row_to_destination('{dest}', 'delivery=async')")
        db.execute(f"INSERT INTO {table} SELECT g FROM generate_series(1, 120) g")
        got = rx.wait_for(3)
        batches = [json.loads(r[3]) for r in got]
        assert [len(b) for b in batches] == [50, 50, 20]
        assert [e["new"]["id"] for b in batches for e in b] == list(range(1, 121))
        # The second batch was refused (422): its 50 events, and only
        # those, are dead letters.
        assert wait_until(lambda: db.one(
            "SELECT count(*) FROM emit.dead_letter WHERE destination = %s", (dest,)) == 50)
        assert db.one("SELECT min(status) FROM emit.dead_letter WHERE destination = %s", (dest,)) == 422
    finally:
        rx.close()
        db.execute("DELETE FROM emit.dead_letter WHERE destination = %s", (dest,))


def test_key_columns_choose_what_stays_in_order(db, table):
    """key=account on a table without a primary key: each account's
    events in order, accounts in parallel (without key= every event of
    such a table would wait for the one before)."""
    rx = HttpReceiver(delay=0.06)
    try:
        db.execute(f"CREATE TABLE {table} (account int, seq int)")
        db.execute(f"CREATE TRIGGER out AFTER INSERT ON {table} FOR EACH ROW "
                   f"EXECUTE FUNCTION row_to_http('{rx.url}', 'delivery=async', 'key=account')")
        db.execute(f"INSERT INTO {table} SELECT a, s FROM generate_series(1, 5) s, generate_series(1, 20) a "
                   "ORDER BY s, a")
        t = __import__("time").monotonic()
        got = rx.wait_for(100, timeout=20)
        elapsed = __import__("time").monotonic() - t
        assert len(got) == 100
        per_account = {}
        for r in got:
            e = body(r)["new"]
            per_account.setdefault(e["account"], []).append(e["seq"])
        assert all(seq == [1, 2, 3, 4, 5] for seq in per_account.values()), per_account
        assert elapsed < 3.5, elapsed  # one at a time would take 6 s
        db.execute(f"CREATE TRIGGER bad AFTER INSERT ON {table} FOR EACH ROW "
                   f"EXECUTE FUNCTION row_to_http('{rx.url}', 'delivery=async', 'key=acount')")
        with pytest.raises(psycopg.Error) as e:
            db.execute(f"INSERT INTO {table} VALUES (1, 6)")
        assert 'key=: column "acount" does not exist' in str(e.value)
    finally:
        rx.close()


def test_warnings_name_a_stored_destination_never_its_address(db, table, dest):
    """A stored destination keeps its URL (a Slack-style path is a token)
    from writers: a failing trigger's or DDL route's WARNING names it, in
    every mode and for every failure, cooldowns included (0.2.0 printed the
    URL from the HTTP error and the cooldown's reason)."""
    port = free_port()
    secret = "services/T0001/B0001/SECRETTOKEN"
    hanging = HttpReceiver(hang=True)
    db.execute("CREATE ROLE leak_writer")
    try:
        db.execute("SELECT emit.create_destination(%s, %s)", (dest, f"http://127.0.0.1:{port}/{secret}"))
        db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
        db.execute(f"GRANT INSERT ON {table} TO leak_writer")
        for mode in ("sync", "commit"):
            db.execute(f"CREATE OR REPLACE TRIGGER out AFTER INSERT ON {table} FOR EACH ROW "
                       f"EXECUTE FUNCTION row_to_destination('{dest}', 'delivery={mode}')")
            db.execute("SET ROLE leak_writer")
            try:
                for i in range(2):  # refused, then cooling down
                    db.execute(f"INSERT INTO {table} VALUES ({i + (10 if mode == 'commit' else 0)})")
            finally:
                db.execute("RESET ROLE")
        db.execute("SELECT emit.create_ddl_trigger('leak_route', %s, '{\"delivery\": \"sync\"}')", (dest,))
        db.execute(f"CREATE INDEX ON {table} (id)")
        # A hanging receiver times out; a TCP destination is refused.
        db.execute("SET pg_emit.http_timeout = '300ms'")
        db.execute("SELECT emit.alter_destination(%s, %s)", (dest, f"{hanging.url}{secret}"))
        db.execute(f"INSERT INTO {table} VALUES (100)")
        db.execute("SELECT emit.alter_destination(%s, %s)", (dest, f"tcp://127.0.0.1:{port}"))
        db.execute(f"INSERT INTO {table} VALUES (101)")
        warnings = db.warnings()
        assert len(warnings) >= 6, warnings
        for w in warnings:
            assert dest in w, w
            assert "SECRET" not in w and str(port) not in w and str(hanging.port) not in w, w
        assert any("connection refused" in w for w in warnings)
        assert any("it failed" in w and "ms ago" in w for w in warnings)
        assert any("timed out" in w for w in warnings)
        assert any("DDL trigger" in w for w in warnings)
    finally:
        hanging.close()
        db.execute("RESET pg_emit.http_timeout")
        db.execute("SELECT emit.drop_ddl_trigger('leak_route')")
        db.execute(f"DROP TABLE IF EXISTS {table}")
        db.execute("DROP ROLE leak_writer")


def test_an_altered_destination_gets_the_next_async_event(db, table, dest):
    """The worker kept a connection to the old address: 0.2.0 wrote the
    next events to it (30 s later nothing had reached the new one)."""
    old, new = Receiver("ndjson"), Receiver("ndjson")
    try:
        db.execute("SELECT emit.create_destination(%s, %s)",
                   (dest, f"tcp://127.0.0.1:{old.port}?framing=ndjson"))
        db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
        db.execute(f"CREATE TRIGGER out AFTER INSERT ON {table} FOR EACH ROW "
                   f"EXECUTE FUNCTION row_to_destination('{dest}', 'delivery=async')")
        db.execute(f"INSERT INTO {table} VALUES (1)")
        assert len(old.wait_for(1)) == 1
        db.execute("SELECT emit.alter_destination(%s, %s)",
                   (dest, f"tcp://127.0.0.1:{new.port}?framing=ndjson"))
        db.execute(f"INSERT INTO {table} VALUES (2)")
        got = new.wait_for(1, timeout=5)
        assert [json.loads(m)["new"]["id"] for m in got] == [2]
        assert len(old.messages) == 1
    finally:
        old.close()
        new.close()
        db.execute(f"DROP TABLE IF EXISTS {table}")
