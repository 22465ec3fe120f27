"""Who may send, where to, and what they may read: a real non-superuser
role against a live cluster."""

import time

import psycopg
import pytest

from conftest import DB, Session
from pgcluster import wait_until
from receivers import HttpReceiver, Receiver, free_port


@pytest.fixture
def alice(cluster):
    """A fresh ordinary role that owns a table in its own schema."""
    with cluster.connect(DB) as c:
        c.execute("DROP SCHEMA IF EXISTS alice CASCADE")
        c.execute("DROP ROLE IF EXISTS alice")
        c.execute("CREATE ROLE alice LOGIN")
        c.execute("CREATE SCHEMA alice AUTHORIZATION alice")
    s = Session(cluster, user="alice")
    s.execute("SET search_path = alice, public")
    s.execute("CREATE TABLE orders (id int primary key, v text)")
    yield s
    s.close()
    with cluster.connect(DB) as c:
        c.execute("DROP SCHEMA alice CASCADE")
        c.execute("REVOKE emit_admin, emit_sender FROM alice")
        c.execute("DROP ROLE alice")


@pytest.fixture
def rx():
    r = Receiver("eof")
    yield r
    r.close()


def denied(s, sql):
    with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
        s.execute(sql)
    return str(e.value)


def test_locked_by_default(alice, rx):
    denied(alice, f"SELECT send_socket('x', '127.0.0.1', {rx.port})")
    denied(
        alice,
        "CREATE TRIGGER out AFTER INSERT ON orders FOR EACH ROW "
        f"EXECUTE FUNCTION row_to_socket('127.0.0.1', {rx.port})",
    )
    for table in ("emit.outbox", "emit.dead_letter", "emit.stats", "emit.destinations"):
        denied(alice, f"SELECT * FROM {table}")
    denied(alice, "INSERT INTO emit.outbox (destination, host, port, framing, events, payload) "
                  "VALUES ('x', 'x', 1, 'close', 1, '{}')")
    denied(alice, "SELECT emit.requeue_dead_letters()")
    assert rx.wait_for(1, timeout=0.2) == []


def test_ordinary_role_cannot_loosen_the_allowlist(cluster, db, alice, rx):
    db.execute("GRANT emit_sender TO alice")
    db.execute("LOAD 'pg_emit'")
    db.execute("ALTER SYSTEM SET pg_emit.allowed_destinations = '127.0.0.1:1'")
    db.execute("SELECT pg_reload_conf()")
    s = Session(cluster, user="alice")
    try:
        # Before pg_emit is loaded in a session (no preloading), the name is
        # a placeholder and SET cannot check it; loading discards the value.
        s.execute("SET pg_emit.allowed_destinations = '*'")
        denied(s, f"SELECT send_socket('x', '127.0.0.1', {rx.port})")
        assert 'permission denied to set parameter "pg_emit.allowed_destinations"' in s.warnings()
        # Once loaded, SET is refused outright.
        denied(s, "SET pg_emit.allowed_destinations = '*'")
        denied(s, "SET pg_emit.max_message_size = '1GB'")
        denied(s, "SET pg_emit.max_outbox_size = 0")
        assert rx.wait_for(1, timeout=0.2) == []
    finally:
        s.close()
        db.execute("ALTER SYSTEM RESET pg_emit.allowed_destinations")
        db.execute("SELECT pg_reload_conf()")


def test_emit_sender_grant_opens_sending(db, alice, rx):
    db.execute("GRANT emit_sender TO alice")
    assert alice.one(f"SELECT send_socket('hi', '127.0.0.1', {rx.port})") == 1
    alice.execute(
        "CREATE TRIGGER out AFTER INSERT ON orders FOR EACH ROW "
        f"EXECUTE FUNCTION row_to_socket('127.0.0.1', {rx.port}, 'delivery=async')"
    )
    # Async queues through emit.outbox, which alice still cannot read.
    alice.execute("INSERT INTO orders VALUES (1, 'x')")
    assert [m for m in rx.wait_for(2, timeout=5)][0] == b"hi"
    assert b'"table":"orders"' in rx.wait_for(2, timeout=5)[1]
    denied(alice, "SELECT * FROM emit.outbox")
    denied(alice, "SELECT * FROM emit.stats")


def test_emit_admin_reads_stats_and_dead_letters(db, alice):
    db.execute("GRANT emit_admin TO alice")
    dest = f"tcp://127.0.0.1:{free_port()}"
    db.execute("INSERT INTO emit.destinations (destination, delivered, failed_attempts) "
               "VALUES (%s, 7, 3)", (dest,))
    db.execute("INSERT INTO emit.dead_letter (outbox_id, destination, host, port, framing, events, "
               "payload, attempts, enqueued_at) VALUES (0, %s, '127.0.0.1', 1, 'close', 1, '{}', 1, now())",
               (dest,))
    try:
        assert alice.conn.execute(
            "SELECT delivered, failed_attempts FROM emit.stats WHERE destination = %s", (dest,)
        ).fetchone() == (7, 3)
        assert alice.one("SELECT count(*) FROM emit.dead_letter WHERE destination = %s", (dest,)) == 1
    finally:
        db.execute("DELETE FROM emit.destinations WHERE destination = %s", (dest,))
        db.execute("DELETE FROM emit.dead_letter WHERE destination = %s", (dest,))
    assert alice.one("SELECT emit.requeue_dead_letters('tcp://nowhere:1')") == 0
    denied(alice, "SELECT * FROM emit.outbox")  # row payloads stay private


def test_emit_admin_discards_dead_letters_but_cannot_stall_the_worker(db, alice, table):
    """DELETE on emit.dead_letter would also let emit_admin LOCK it in
    ACCESS EXCLUSIVE mode, and the worker, which writes dead letters, would
    wait for that transaction with all delivery stalled (0.2.0). emit_admin
    discards through a function instead; its open transaction holds up
    nothing."""
    db.execute("GRANT emit_admin TO alice")
    rejecting = HttpReceiver(default=(400, {}, b"no"))
    healthy = Receiver("ndjson")
    try:
        alice.execute("BEGIN")
        denied(alice, "LOCK TABLE emit.dead_letter IN ACCESS EXCLUSIVE MODE")
        alice.execute("ROLLBACK")
        denied(alice, "DELETE FROM emit.dead_letter")
        db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
        for url in (rejecting.url, f"tcp://127.0.0.1:{healthy.port}?framing=ndjson"):
            db.execute(f"CREATE TRIGGER \"{url}\" AFTER INSERT ON {table} FOR EACH ROW "
                       f"EXECUTE FUNCTION row_to_destination('{url}', 'delivery=async')")
        db.execute(f"INSERT INTO {table} VALUES (1), (2), (3)")
        assert len(healthy.wait_for(3)) == 3
        dead = lambda: db.one("SELECT count(*) FROM emit.dead_letter WHERE destination = %s",  # noqa: E731
                              (rejecting.url,))
        assert wait_until(lambda: dead() == 3)
        ids = [i for (i,) in db.conn.execute(
            "SELECT id FROM emit.dead_letter WHERE destination = %s ORDER BY id", (rejecting.url,)).fetchall()]
        # One by id, inside a transaction emit_admin keeps open: the worker
        # goes on delivering and dead-lettering meanwhile.
        alice.execute("BEGIN")
        assert alice.one("SELECT emit.discard_dead_letters(ids => %s)", ([ids[0]],)) == 1
        db.execute(f"INSERT INTO {table} VALUES (4)")
        assert len(healthy.wait_for(4)) == 4
        assert wait_until(lambda: dead() == 4)
        alice.execute("COMMIT")
        assert dead() == 3
        # The rest of that destination's; nothing of any other.
        assert alice.one("SELECT emit.discard_dead_letters(%s)", (rejecting.url,)) == 3
        assert dead() == 0
        assert alice.one("SELECT emit.discard_dead_letters('tcp://nowhere:1')") == 0
    finally:
        rejecting.close()
        healthy.close()
        db.execute("REVOKE emit_admin FROM alice")


def test_existing_triggers_fire_for_every_writer(db, alice, rx):
    """Revoking EXECUTE stops attaching triggers, not writing to tables
    that already have one."""
    db.execute(
        "CREATE TRIGGER out AFTER INSERT ON alice.orders FOR EACH ROW "
        f"EXECUTE FUNCTION row_to_socket('127.0.0.1', {rx.port})"
    )
    alice.execute("INSERT INTO orders VALUES (1, 'x')")
    assert len(rx.wait_for(1, timeout=2)) == 1


# --- the allowlist -----------------------------------------------------------


def test_allowlist_refuses_a_port_and_a_host(db, rx):
    other = Receiver("eof")
    try:
        db.execute(f"SET pg_emit.allowed_destinations = '127.0.0.1:{rx.port}, receiver.example'")
        assert db.one(f"SELECT send_socket('ok', '127.0.0.1', {rx.port})") == 1
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            db.execute(f"SELECT send_socket('no', '127.0.0.1', {other.port})")
        assert f"127.0.0.1:{other.port} is not allowed by pg_emit.allowed_destinations" in str(e.value)
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            db.execute(f"SELECT send_socket('no', '::1', {rx.port})")
        assert "pg_emit.allowed_destinations" in str(e.value)
        assert rx.wait_for(2, timeout=0.3) == [b"ok"]
        assert other.wait_for(1, timeout=0.1) == []
    finally:
        other.close()


def test_allowlist_checks_what_a_name_resolves_to(db, rx):
    db.execute("SET pg_emit.allowed_destinations = '10.0.0.0/8'")
    with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
        db.execute(f"SELECT send_socket('x', 'localhost', {rx.port})")
    assert "resolves to" in str(e.value) and "127.0.0.1" in str(e.value)
    # Allowing the address (not the name) lets the name through, and the
    # connection goes to the allowed address.
    db.execute(f"SET pg_emit.allowed_destinations = '127.0.0.1/32:{rx.port}'")
    assert db.one(f"SELECT send_socket('via name', 'localhost', {rx.port})") == 1
    assert rx.wait_for(1, timeout=2) == [b"via name"]


def test_metadata_address_refused_unless_listed(db):
    t = time.monotonic()
    with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
        db.execute("SELECT send_socket('x', '169.254.169.254', 80)")
    assert "link-local and cloud metadata" in str(e.value)
    assert time.monotonic() - t < 0.5  # refused before any connect
    db.execute("SET pg_emit.allowed_destinations = '*'")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        db.execute("SELECT send_socket('x', '::ffff:169.254.169.254', 80)")


def test_malformed_allowlist_is_rejected(db):
    db.execute("LOAD 'pg_emit'")
    with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
        db.execute("SET pg_emit.allowed_destinations = '10.0.0.0/8, ftp://x/'")
    assert "ftp://x/" in e.value.diag.message_detail


def test_commit_and_async_triggers_are_refused_when_written(db, table, rx):
    db.execute(f"CREATE TABLE {table} (id int)")
    for mode in ("commit", "async"):
        db.execute(f"DROP TRIGGER IF EXISTS out ON {table}")
        db.execute(
            f"CREATE TRIGGER out AFTER INSERT ON {table} FOR EACH ROW "
            f"EXECUTE FUNCTION row_to_socket('127.0.0.1', {rx.port}, 'delivery={mode}')"
        )
        db.execute("SET pg_emit.allowed_destinations = '127.0.0.1:1'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            db.execute(f"INSERT INTO {table} VALUES (1)")
        db.execute("RESET pg_emit.allowed_destinations")


def test_worker_refuses_a_destination_disallowed_after_queueing(cluster, db, table, rx):
    db.execute("LOAD 'pg_emit'")
    db.execute("ALTER SYSTEM SET pg_emit.allowed_destinations = '127.0.0.1:1'")
    db.execute("SELECT pg_reload_conf()")
    try:
        time.sleep(0.3)  # the worker has read the new value
        # This session still allows it (a superuser SET), so it is queued.
        db.execute(f"SET pg_emit.allowed_destinations = '127.0.0.1:{rx.port}'")
        db.execute(f"CREATE TABLE {table} (id int)")
        db.execute(
            f"CREATE TRIGGER out AFTER INSERT ON {table} FOR EACH ROW "
            f"EXECUTE FUNCTION row_to_socket('127.0.0.1', {rx.port}, 'delivery=async')"
        )
        db.execute(f"INSERT INTO {table} VALUES (1)")
        assert wait_until(lambda: db.one(
            "SELECT count(*) FROM emit.dead_letter WHERE port = %s", (rx.port,)) == 1, 5)
        err = db.one("SELECT last_error FROM emit.dead_letter WHERE port = %s", (rx.port,))
        assert "pg_emit.allowed_destinations" in err
        assert rx.wait_for(1, timeout=0.2) == []
    finally:
        db.execute("ALTER SYSTEM RESET pg_emit.allowed_destinations")
        db.execute("SELECT pg_reload_conf()")
        db.execute("DELETE FROM emit.dead_letter WHERE port = %s", (rx.port,))


# --- limits and hostile input ---------------------------------------------------


def test_max_message_size(db, table, rx):
    db.execute("SET pg_emit.max_message_size = '1kB'")
    with pytest.raises(psycopg.errors.ProgramLimitExceeded) as e:
        db.execute(f"SELECT send_socket(repeat('x', 2000), '127.0.0.1', {rx.port})")
    assert "pg_emit.max_message_size" in str(e.value)
    db.execute(f"CREATE TABLE {table} (id int, v text)")
    db.execute(
        f"CREATE TRIGGER out AFTER INSERT ON {table} FOR EACH ROW "
        f"EXECUTE FUNCTION row_to_socket('127.0.0.1', {rx.port}, 'delivery=async')"
    )
    with pytest.raises(psycopg.errors.ProgramLimitExceeded):
        db.execute(f"INSERT INTO {table} VALUES (1, repeat('x', 2000))")
    assert rx.wait_for(1, timeout=0.2) == []


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1:22", "[::1]:22", "a" * (1 << 20), "evil\r\nHost: x", "user@127.0.0.1"],
)
def test_hostile_hosts_are_22023(db, host):
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        db.execute("SELECT send_socket('x', %s, 80)", (host,))
