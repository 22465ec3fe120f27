"""Statement-level triggers with transition tables: one message per
statement, split past pg_emit.statement_batch_size, in every mode."""

import json

import psycopg
import pytest

from receivers import HttpReceiver, Receiver


def stmt_trigger(db, table, port, op, refs, *opts, func="row_to_socket", dest=None):
    extra = "".join(f", '{o}'" for o in opts)
    dest = dest or f"'127.0.0.1', {port}, 'framing=ndjson'"
    db.execute(
        f"CREATE TRIGGER out_{op.lower()} AFTER {op} ON {table} REFERENCING {refs} "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {func}({dest}{extra})"
    )


def test_one_message_per_statement(db, table, nd):
    db.execute(f"CREATE TABLE {table} (id int primary key, v text)")
    stmt_trigger(db, table, nd.port, "INSERT", "NEW TABLE AS ins")
    stmt_trigger(db, table, nd.port, "UPDATE", "NEW TABLE AS nu OLD TABLE AS ol")
    stmt_trigger(db, table, nd.port, "DELETE", "OLD TABLE AS gone")
    db.execute(f"INSERT INTO {table} SELECT g, 'v' || g FROM generate_series(1, 100) g")
    db.execute(f"UPDATE {table} SET v = upper(v) WHERE id <= 50")
    db.execute(f"DELETE FROM {table} WHERE id > 90")
    db.execute(f"UPDATE {table} SET v = 'none' WHERE id < 0")  # no rows: no message
    msgs = [json.loads(m) for m in nd.wait_for(3)]
    assert len(msgs) == 3 and nd.wait_for(4, timeout=0.3)[3:] == []
    ins, upd, dele = msgs
    assert ins["op"] == "INSERT" and ins["schema"] == "public" and ins["table"] == table
    assert [r["new"]["id"] for r in ins["rows"]] == list(range(1, 101))
    assert all(r["old"] is None for r in ins["rows"])
    assert len(upd["rows"]) == 50
    for r in upd["rows"]:  # old and new of the same row are paired
        assert r["new"]["id"] == r["old"]["id"] and r["new"]["v"] == r["old"]["v"].upper()
    assert sorted(r["old"]["id"] for r in dele["rows"]) == list(range(91, 101))
    assert all(r["new"] is None for r in dele["rows"])


def test_big_statements_are_split(db, table, nd):
    db.execute(f"CREATE TABLE {table} (id int primary key, v text)")
    stmt_trigger(db, table, nd.port, "INSERT", "NEW TABLE AS ins")
    db.execute("SET pg_emit.statement_batch_size = '1kB'")
    db.execute(f"INSERT INTO {table} SELECT g, repeat('x', 50) FROM generate_series(1, 200) g")
    msgs = nd.wait_for(10)
    assert len(msgs) > 5
    assert all(len(m) <= 1024 + 200 for m in msgs)
    ids = [r["new"]["id"] for m in msgs for r in json.loads(m)["rows"]]
    assert ids == list(range(1, 201))


def test_two_triggers_read_the_same_transition_table(db, table, nd):
    other = Receiver("ndjson")
    try:
        db.execute(f"CREATE TABLE {table} (id int)")
        stmt_trigger(db, table, nd.port, "INSERT", "NEW TABLE AS a")
        db.execute(
            f"CREATE TRIGGER out_b AFTER INSERT ON {table} REFERENCING NEW TABLE AS b "
            f"FOR EACH STATEMENT EXECUTE FUNCTION row_to_socket('127.0.0.1', {other.port}, 'framing=ndjson')"
        )
        db.execute(f"INSERT INTO {table} SELECT generate_series(1, 10)")
        for r in (nd, other):
            assert len(json.loads(r.wait_for(1)[0])["rows"]) == 10
    finally:
        other.close()


def test_commit_and_async_modes(db, table, nd):
    db.execute(f"CREATE TABLE {table} (id int)")
    stmt_trigger(db, table, nd.port, "INSERT", "NEW TABLE AS ins", "delivery=commit")
    db.execute("BEGIN")
    db.execute(f"INSERT INTO {table} SELECT generate_series(1, 5)")
    assert nd.wait_for(1, timeout=0.3) == []
    db.execute("ROLLBACK")
    db.execute(f"INSERT INTO {table} SELECT generate_series(6, 10)")
    assert len(json.loads(nd.wait_for(1)[0])["rows"]) == 5
    db.execute(f"DROP TRIGGER out_insert ON {table}")
    stmt_trigger(db, table, nd.port, "INSERT", "NEW TABLE AS ins", "delivery=async")
    db.execute(f"INSERT INTO {table} SELECT generate_series(11, 20)")
    msg = json.loads(nd.wait_for(2)[1])
    assert isinstance(msg["id"], int) and len(msg["rows"]) == 10


def test_format_td_and_http(db, table):
    web = HttpReceiver()
    try:
        db.execute(f"CREATE TABLE {table} (id int)")
        stmt_trigger(db, table, None, "INSERT", "NEW TABLE AS ins", "format=td",
                     func="row_to_http", dest=f"'{web.url}'")
        db.execute(f"INSERT INTO {table} SELECT generate_series(1, 3)")
        body = json.loads(web.wait_for(1)[0][3])
        assert body["event"] == "INSERT" and body["level"] == "STATEMENT"
        assert body["args"] == [web.url, "format=td"]
        assert [r["new"]["id"] for r in body["rows"]] == [1, 2, 3]
    finally:
        web.close()


def test_without_transition_tables_is_an_error(db, table):
    db.execute(f"CREATE TABLE {table} (id int)")
    db.execute(
        f"CREATE TRIGGER plain AFTER INSERT ON {table} FOR EACH STATEMENT "
        "EXECUTE FUNCTION row_to_socket('127.0.0.1', '9')"
    )
    with pytest.raises(psycopg.errors.TriggerProtocolViolated) as e:
        db.execute(f"INSERT INTO {table} VALUES (1)")
    assert "REFERENCING" in str(e.value)
