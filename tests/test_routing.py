"""Routing by table: a broker URL whose stream, subject or topic names
{schema} and {table} is filled in by each row trigger, so each table's
events land in their own (Debezium's topic per table), in every mode, and
a stored destination's credentials still never reach the outbox."""

import json

import psycopg
import pytest


from receivers import KafkaServer, NatsServer, RedisServer

pytestmark = pytest.mark.usefixtures("fast_retries")


@pytest.fixture
def tables(db, request):
    names = [f"route_{c}_{abs(hash(request.node.name)) % 10_000}" for c in "ab"]
    for t in names:
        db.execute(f"DROP TABLE IF EXISTS {t}")
        db.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, v text)")
    yield names
    for t in names:
        db.execute(f"DROP TABLE IF EXISTS {t}")


def attach_all(db, tables, dest, *opts):
    extra = "".join(f", '{o}'" for o in opts)
    for t in tables:
        db.execute(f"CREATE TRIGGER out AFTER INSERT OR UPDATE ON {t} FOR EACH ROW "
                   f"EXECUTE FUNCTION row_to_destination('{dest}'{extra})")


def test_kafka_topic_per_table(db, tables):
    server = KafkaServer()
    try:
        for t in tables:
            server.create_topic(f"cdc.public.{t}")
        url = f"kafka://127.0.0.1:{server.port}/cdc.{{schema}}.{{table}}"
        attach_all(db, tables, url, "delivery=async")
        for n, t in enumerate(tables):
            db.execute(f"INSERT INTO {t} SELECT g, '{t}' FROM generate_series(1, {5 + n}) g")
        for n, t in enumerate(tables):
            got = server.records(f"cdc.public.{t}", 5 + n)
            assert sorted(r["value"]["new"]["id"] for r in got) == list(range(1, 6 + n))
            assert {r["value"]["table"] for r in got} == {t}
        # Each table is a destination of its own.
        stats = dict(db.conn.execute(
            "SELECT destination, delivered FROM emit.stats WHERE destination LIKE %s",
            (f"kafka://127.0.0.1:{server.port}/cdc.public.route_%",)).fetchall())
        assert sorted(stats.values()) == [5, 6], stats
    finally:
        server.close()


@pytest.mark.parametrize("mode", ["sync", "commit", "async"])
def test_stored_redis_stream_per_table(db, tables, dest, mode):
    server = RedisServer(password="s3cret")
    try:
        db.execute("SELECT emit.create_destination(%s, %s, %s)",
                   (dest, f"redis://127.0.0.1:{server.port}/{{schema}}.{{table}}",
                    json.dumps({"password": "s3cret"})))
        attach_all(db, tables, dest, f"delivery={mode}")
        for t in tables:
            db.execute(f"INSERT INTO {t} VALUES (1, 'x'), (2, 'y')")
        for t in tables:
            got = server.wait_for(f"public.{t}", 2)
            assert [e["new"]["id"] for _, _, e in got] == [1, 2]
        assert db.warnings() == []
        if mode == "async":
            # The outbox and stats know the table, never the password.
            keys = [k for (k,) in db.conn.execute(
                "SELECT destination FROM emit.stats WHERE destination LIKE %s", (f"{dest}@%",))]
            assert sorted(keys) == sorted(f"{dest}@public.{t}" for t in tables)
    finally:
        server.close()


def test_nats_subject_per_table(db, tables):
    server = NatsServer()
    try:
        server.add_stream("CDC", ["cdc.>"])
        attach_all(db, tables, f"nats://127.0.0.1:{server.port}/cdc.{{schema}}.{{table}}")
        for t in tables:
            db.execute(f"INSERT INTO {t} VALUES (1, 'x')")
        assert sorted(e["table"] for _, e in server.wait_for("CDC", 2)) == sorted(tables)
    finally:
        server.close()


def test_only_triggers_can_send_to_a_routed_destination(db, dest):
    db.execute("SELECT emit.create_destination(%s, 'kafka://127.0.0.1:9/cdc.{schema}.{table}')", (dest,))
    for target in (dest, "kafka://127.0.0.1:9/cdc.{table}"):
        with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
            db.execute("SELECT send_message(%s, '{}')", (target,))
        assert "names its stream, subject or topic by {schema} and {table}" in str(e.value)


def test_a_name_the_broker_cannot_take_is_an_error_naming_the_trigger(db):
    db.execute('DROP TABLE IF EXISTS "order items"')
    db.execute('CREATE TABLE "order items" (id int PRIMARY KEY)')
    try:
        db.execute('CREATE TRIGGER out AFTER INSERT ON "order items" FOR EACH ROW EXECUTE FUNCTION '
                   "row_to_destination('kafka://127.0.0.1:9/cdc.{table}', 'delivery=async')")
        with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
            db.execute('INSERT INTO "order items" VALUES (1)')
        assert 'trigger "out" on "public"."order items"' in str(e.value)
    finally:
        db.execute('DROP TABLE "order items"')


@pytest.mark.parametrize("url, why", [
    ("kafka://{schema}:9092/t", "in the path, not the server"),
    ("http://127.0.0.1/{table}", "route a broker's"),
    ("tcp://127.0.0.1:1/{table}", "route a broker's"),
])
def test_templates_only_in_broker_paths(db, dest, url, why):
    with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
        db.execute("SELECT emit.create_destination(%s, %s)", (dest, url))
    assert why in str(e.value)


def test_tls_files_of_a_routed_destination_need_the_right_to_read_them(db, cluster, dest, pki):
    """A URL that routes by table hides its broker behind a template: the
    file rule applies to what it fills in all the same."""
    from conftest import DB, Session

    db.execute("DROP ROLE IF EXISTS route_admin")
    db.execute("CREATE ROLE route_admin LOGIN")
    db.execute("GRANT emit_admin TO route_admin")
    s = Session(cluster, DB, user="route_admin")
    try:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            s.execute("SELECT emit.create_destination(%s, 'rediss://127.0.0.1:9/{table}', %s)",
                      (dest, json.dumps({"ca_file": "/etc/hostname"})))
        # A superuser's files, kept, do not go to another server.
        db.execute("SELECT emit.create_destination(%s, 'rediss://127.0.0.1:9/s', %s)",
                   (dest, json.dumps({"ca_file": f"{pki}/ca.pem"})))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            s.execute("SELECT emit.alter_destination(%s, 'rediss://127.0.0.1:10/{table}')", (dest,))
    finally:
        s.close()
        db.execute("DROP OWNED BY route_admin")
        db.execute("DROP ROLE route_admin")


def test_ddl_routes_to_a_destination_altered_to_route_by_table_warn(db, dest):
    """Someone else's DDL never fails for it: a WARNING."""
    db.execute("SELECT emit.create_destination(%s, 'kafka://127.0.0.1:9/ddl')", (dest,))
    db.execute("SELECT emit.create_ddl_trigger('route_ddl', %s)", (dest,))
    try:
        db.execute("SELECT emit.alter_destination(%s, 'kafka://127.0.0.1:9/ddl.{table}')", (dest,))
        db.notices.clear()
        db.execute("CREATE TABLE route_ddl_probe (id int)")
        assert any("which DDL events do not have" in w for w in db.warnings()), db.warnings()
    finally:
        db.execute("DROP TABLE IF EXISTS route_ddl_probe")
        db.execute("SELECT emit.drop_ddl_trigger('route_ddl')")


def test_dot_names_cannot_leave_the_path(db):
    db.execute('DROP TABLE IF EXISTS ".."')
    db.execute('CREATE TABLE ".." (id int PRIMARY KEY)')
    try:
        db.execute('CREATE TRIGGER out AFTER INSERT ON ".." FOR EACH ROW EXECUTE FUNCTION '
                   "row_to_destination('redis://127.0.0.1:9/cdc/{table}', 'delivery=async')")
        with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
            db.execute('INSERT INTO ".." VALUES (1)')
        assert "named . or .." in str(e.value)
    finally:
        db.execute('DROP TABLE ".."')
