"""What a row event carries: `columns=`, `exclude=` and `unchanged=skip`,
in every format, in sync and async delivery, for row and statement
triggers (issue 27)."""

import json

import psycopg
import pytest


def make(db, table):
    db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, total numeric, note text, "
               "secret text, big text)")


def trigger(db, table, port, *opts, timing="AFTER", events="INSERT OR UPDATE OR DELETE"):
    extra = "".join(f", '{o}'" for o in opts)
    db.execute(f"CREATE TRIGGER out {timing} {events} ON {table} FOR EACH ROW EXECUTE FUNCTION "
               f"row_to_destination('tcp://127.0.0.1:{port}?framing=ndjson'{extra})")


def received(nd, n):
    got = [json.loads(m) for m in nd.wait_for(n)]
    assert len(got) == n, got
    assert nd.wait_for(n + 1, timeout=0.3)[n:] == [], "more events than expected"
    return got


@pytest.mark.parametrize("delivery", ["sync", "async"])
def test_columns_carries_only_those_in_that_order(db, table, nd, delivery):
    make(db, table)
    trigger(db, table, nd.port, "columns=total, id", f"delivery={delivery}")
    db.execute(f"INSERT INTO {table} VALUES (1, 7.00, 'n', 's3cret', 'b')")
    db.execute(f"UPDATE {table} SET total = 9.50, secret = 'other'")
    db.execute(f"DELETE FROM {table}")
    ins, upd, dele = received(nd, 3)
    assert list(ins["new"].items()) == [("total", 7.00), ("id", 1)] and ins["old"] is None
    assert upd["new"] == {"total": 9.50, "id": 1} and upd["old"] == {"total": 7.00, "id": 1}
    assert dele["old"] == {"total": 9.50, "id": 1} and dele["new"] is None
    raw = b"".join(nd.wait_for(3))
    assert b"s3cret" not in raw and b"other" not in raw


@pytest.mark.parametrize("fmt,new,old", [
    ("supabase", "record", "old_record"),
    ("debezium", "after", "before"),
    ("td", "new", "old"),
])
def test_exclude_keeps_the_column_out_of_every_format(db, table, nd, fmt, new, old):
    make(db, table)
    trigger(db, table, nd.port, "exclude=secret,big", f"format={fmt}")
    db.execute(f"INSERT INTO {table} VALUES (1, 7.00, 'n', 's3cret', 'b')")
    db.execute(f"UPDATE {table} SET note = 'm'")
    ins, upd = received(nd, 2)
    assert ins[new] == {"id": 1, "total": 7.00, "note": "n"}
    assert upd[new]["note"] == "m" and upd[old]["note"] == "n"
    assert set(upd[old]) == {"id", "total", "note"}


def test_unchanged_skip_sends_only_updates_that_change_what_is_carried(db, table, nd):
    make(db, table)
    trigger(db, table, nd.port, "exclude=secret", "unchanged=skip")
    db.execute(f"INSERT INTO {table} VALUES (1, 7.00, NULL, 's', repeat('x', 100000))")
    db.execute(f"UPDATE {table} SET secret = 'rotated'")          # only an excluded column
    db.execute(f"UPDATE {table} SET total = 7.00, note = NULL")   # the same values, NULL stays NULL
    db.execute(f"UPDATE {table} SET big = repeat('x', 100000)")  # a TOASTed value, equal
    db.execute(f"UPDATE {table} SET note = 'set'")                # NULL to a value
    db.execute(f"UPDATE {table} SET big = repeat('y', 100000)")  # a TOASTed value, changed
    db.execute(f"UPDATE {table} SET total = 7.0")                 # 7.00 and 7.0 differ as values
    ins, note, big, total = received(nd, 4)
    assert ins["op"] == "INSERT"
    assert note["new"]["note"] == "set" and note["old"]["note"] is None
    assert big["new"]["big"] == "y" * 100000 and big["old"]["big"] == "x" * 100000
    assert str(total["new"]["total"]) == "7.0"


def test_unchanged_skip_in_a_before_trigger_keeps_the_update(db, table, nd):
    make(db, table)
    trigger(db, table, nd.port, "unchanged=skip", timing="BEFORE", events="UPDATE")
    db.execute(f"INSERT INTO {table} VALUES (1, 1, 'a')")
    db.execute(f"UPDATE {table} SET note = 'a'")
    db.execute(f"UPDATE {table} SET note = 'b'")
    assert db.one(f"SELECT note FROM {table}") == "b"
    (upd,) = received(nd, 1)
    assert upd["new"]["note"] == "b"


def test_statement_triggers_carry_the_subset_and_skip_unchanged_rows(db, table, nd):
    make(db, table)
    db.execute(f"CREATE TRIGGER out AFTER UPDATE ON {table} REFERENCING NEW TABLE AS n OLD TABLE AS o "
               f"FOR EACH STATEMENT EXECUTE FUNCTION row_to_socket('127.0.0.1', {nd.port}, "
               "'framing=ndjson', 'columns=id,note', 'unchanged=skip')")
    db.execute(f"INSERT INTO {table} SELECT g, g, 'n' FROM generate_series(1, 10) g")
    db.execute(f"UPDATE {table} SET note = CASE WHEN id <= 3 THEN 'changed' ELSE note END, total = 0")
    (msg,) = received(nd, 1)
    assert sorted(r["new"]["id"] for r in msg["rows"]) == [1, 2, 3]
    assert all(set(r["new"]) == {"id", "note"} == set(r["old"]) for r in msg["rows"])


def test_unknown_columns_and_bad_combinations_are_errors_naming_the_trigger(db, table, nd):
    make(db, table)
    trigger(db, table, nd.port, "columns=id,totl")
    with pytest.raises(psycopg.errors.UndefinedColumn) as e:
        db.execute(f"INSERT INTO {table} (id) VALUES (1)")
    assert e.value.diag.message_primary == (
        f'row_to_destination trigger "out" on "public"."{table}": columns=: column "totl" does not exist')
    db.execute(f"DROP TRIGGER out ON {table}")
    trigger(db, table, nd.port, "exclude=Secret")  # names are as stored: secret, not Secret
    with pytest.raises(psycopg.errors.UndefinedColumn, match='exclude=: column "Secret"'):
        db.execute(f"INSERT INTO {table} (id) VALUES (1)")
    db.execute(f"DROP TRIGGER out ON {table}")
    trigger(db, table, nd.port, "columns=id", "exclude=note")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="columns= and exclude= cannot both"):
        db.execute(f"INSERT INTO {table} (id) VALUES (1)")
    db.execute(f"DROP TRIGGER out ON {table}")
    # A column dropped after the trigger was made is an error at the next row.
    trigger(db, table, nd.port, "columns=id,note")
    db.execute(f"INSERT INTO {table} (id) VALUES (2)")
    db.execute(f"ALTER TABLE {table} DROP COLUMN note")
    with pytest.raises(psycopg.errors.UndefinedColumn, match='column "note"'):
        db.execute(f"INSERT INTO {table} (id) VALUES (3)")
    assert [json.loads(m)["new"] for m in nd.wait_for(1)] == [{"id": 2, "note": None}]


def test_the_readme_s_when_example(db, table, nd):
    """Rows are filtered by the trigger's WHEN clause, as the README shows."""
    db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, total numeric, card_number text)")
    db.execute(f"""CREATE TRIGGER big_orders AFTER INSERT OR UPDATE ON {table} FOR EACH ROW
                     WHEN (NEW.total > 1000)
                     EXECUTE FUNCTION row_to_socket('127.0.0.1', {nd.port}, 'framing=ndjson',
                                                    'exclude=card_number', 'unchanged=skip')""")
    db.execute(f"INSERT INTO {table} VALUES (1, 10, '4111'), (2, 5000, '4242')")
    db.execute(f"UPDATE {table} SET card_number = '0000'")
    db.execute(f"UPDATE {table} SET total = total + 1")
    ins, upd = received(nd, 2)
    assert ins["new"] == {"id": 2, "total": 5000} and upd["new"] == {"id": 2, "total": 5001}
