"""Databases that are not UTF-8: receivers get valid UTF-8 JSON in every
mode, or the statement fails clearly; never a broken or empty event counted
as delivered (issue 10, finding 2)."""

import json

import psycopg
import pytest

from pgcluster import wait_until
from receivers import HttpReceiver, Receiver

pytestmark = pytest.mark.usefixtures("fast_retries")


@pytest.fixture
def encoded_db(cluster, request):
    name = f"emit_{request.param.lower()}"
    with cluster.connect() as c:
        c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        c.execute(f"CREATE DATABASE {name} ENCODING '{request.param}' "
                  "LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    with cluster.connect(name) as c:
        c.execute("CREATE EXTENSION pg_emit")
    yield name
    with cluster.connect() as c:
        c.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
def receivers():
    """An ndjson receiver per mode (and the statement-level trigger's), and
    an HTTP one."""
    rx = {k: Receiver("ndjson") for k in ("sync", "commit", "async", "statement")}
    web = HttpReceiver()
    yield rx, web
    for r in rx.values():
        r.close()
    web.close()


def attach_all(c, table, rx, web, suffix=""):
    modes = {"sync": "", "commit": ", 'delivery=commit'", "async": ", 'delivery=async'"}
    for mode, opt in modes.items():
        c.execute(f'CREATE TRIGGER "{mode}{suffix}" AFTER INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION '
                  f"row_to_socket('127.0.0.1', {rx[mode].port}, 'framing=ndjson'{opt})")
    c.execute(f"CREATE TRIGGER stmt AFTER INSERT ON {table} REFERENCING NEW TABLE AS n "
              "FOR EACH STATEMENT EXECUTE FUNCTION "
              f"row_to_socket('127.0.0.1', {rx['statement'].port}, 'framing=ndjson', 'delivery=async')")
    c.execute(f"CREATE TRIGGER http AFTER INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION "
              f"row_to_http('{web.url}', 'delivery=async', 'format=td')")


@pytest.mark.parametrize("encoded_db", ["LATIN1"], indirect=True)
def test_latin1_database_sends_utf8_in_every_mode(cluster, encoded_db, receivers):
    rx, web = receivers
    with cluster.connect(encoded_db) as c:
        assert c.execute("SHOW server_encoding").fetchone()[0] == "LATIN1"
        c.execute('CREATE TABLE "café" (id int, "naïve" text)')
        attach_all(c, '"café"', rx, web, suffix="_é")
        c.execute("""INSERT INTO "café" VALUES (1, 'é à ß ÿ'), (2, 'plain')""")
    for mode in ("sync", "commit", "async"):
        got = [json.loads(m.decode("utf-8")) for m in rx[mode].wait_for(2, timeout=10)]
        assert [e["table"] for e in got] == ["café", "café"], mode
        assert [e["new"]["naïve"] for e in got] == ["é à ß ÿ", "plain"], mode
    stmt = json.loads(rx["statement"].wait_for(1, timeout=10)[0].decode("utf-8"))
    assert [r["new"]["naïve"] for r in stmt["rows"]] == ["é à ß ÿ", "plain"]
    td = [json.loads(r[3].decode("utf-8")) for r in web.wait_for(2)]
    assert [e["table_name"] for e in td] == ["café", "café"]
    assert td[0]["name"] == "http" and td[0]["new"]["naïve"] == "é à ß ÿ"
    with cluster.connect(encoded_db) as c:
        assert wait_until(lambda: c.execute(
            "SELECT count(*) FROM emit.outbox").fetchone()[0] == 0, 10)
        assert c.execute("SELECT count(*) FROM emit.dead_letter").fetchone()[0] == 0


@pytest.mark.parametrize("encoded_db", ["SQL_ASCII"], indirect=True)
def test_sql_ascii_database_sends_utf8_bytes_and_refuses_others(cluster, encoded_db, receivers):
    rx, web = receivers
    with cluster.connect(encoded_db) as c:
        c.execute("CREATE TABLE t (id int, v text)")
        attach_all(c, "t", rx, web)
        # UTF-8 bytes stored in SQL_ASCII: sent as they are.
        c.execute("INSERT INTO t VALUES (1, convert_from('\\xc3a9'::bytea, 'SQL_ASCII'))")
        # A LATIN1 byte: no encoding says what it is. The statement fails.
        with pytest.raises(psycopg.errors.CharacterNotInRepertoire) as e:
            c.execute("INSERT INTO t VALUES (2, convert_from('\\xe9'::bytea, 'SQL_ASCII'))")
        assert "not valid UTF-8" in str(e.value) and "t" in str(e.value)
        assert c.execute("SELECT count(*) FROM t").fetchone()[0] == 1
    for mode in ("sync", "commit", "async"):
        got = [json.loads(m.decode("utf-8")) for m in rx[mode].wait_for(2, timeout=3)]
        assert [e["new"]["v"] for e in got] == ["é"], mode
    with cluster.connect(encoded_db) as c:
        assert wait_until(lambda: c.execute(
            "SELECT count(*) FROM emit.outbox").fetchone()[0] == 0, 10)
        assert c.execute("SELECT count(*) FROM emit.dead_letter").fetchone()[0] == 0


@pytest.mark.parametrize("encoded_db", ["LATIN1"], indirect=True)
def test_latin1_database_backfills_and_keys_kafka_records_in_utf8(cluster, encoded_db):
    """Backfill reads rows and key values whatever the encoding, and Kafka
    record keys (record_key "columns") are UTF-8 in every mode: from the
    trigger, and from the backfill, kept in the outbox as the database's
    text. (Names are ASCII here: backfill does not take others in such a
    database.)"""
    from receivers import KafkaServer

    k = KafkaServer()
    rx = Receiver("ndjson")
    try:
        k.create_topic("keys")
        with cluster.connect(encoded_db) as c:
            c.execute("SELECT emit.create_destination('keys', %s, %s)",
                      (f"kafka://127.0.0.1:{k.port}/keys", json.dumps({"record_key": "columns"})))
            c.execute('CREATE TABLE cle (nom text PRIMARY KEY, v text)')
            c.execute("INSERT INTO cle VALUES ('àé', 'ß')")
            assert c.execute("SELECT emit.backfill('cle', 'keys')").fetchone()[0] == 1
            ndjson = f"tcp://127.0.0.1:{rx.port}?framing=ndjson"
            assert c.execute("SELECT emit.backfill('cle', %s)", (ndjson,)).fetchone()[0] == 1
            for mode in ("sync", "async"):
                c.execute(f'CREATE TRIGGER "{mode}" AFTER INSERT ON cle FOR EACH ROW EXECUTE FUNCTION '
                          f"row_to_destination('keys', 'delivery={mode}')")
            c.execute("INSERT INTO cle VALUES ('ÿ', 'x')")
        got = k.records("keys", 3)
        assert sorted((r["key"], r["value"]["op"]) for r in got) == [
            ('{"nom":"àé"}', "READ"), ('{"nom":"ÿ"}', "INSERT"), ('{"nom":"ÿ"}', "INSERT")]
        (read,) = [json.loads(m.decode("utf-8")) for m in rx.wait_for(1, timeout=10)]
        assert (read["table"], read["new"]) == ("cle", {"nom": "àé", "v": "ß"})
        with cluster.connect(encoded_db) as c:
            assert wait_until(lambda: c.execute(
                "SELECT count(*) FROM emit.outbox").fetchone()[0] == 0, 10)
            assert c.execute("SELECT count(*) FROM emit.dead_letter").fetchone()[0] == 0
    finally:
        rx.close()
        k.close()
