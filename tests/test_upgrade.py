"""ALTER EXTENSION pg_emit UPDATE from 0.1.0 and from 0.2.0: the same
objects as a fresh install; a queued backlog, dead letters, delivery
counters and settings survive, and the backlog and the requeued dead
letters are delivered.

`fixtures/pg_emit--<version>.sql` are the install scripts those releases
generated (`cargo pgrx schema` at the release), installed beside the
current one.
"""

import json
import os
import subprocess

import pytest

from pgcluster import BIN, wait_until
from receivers import Receiver, free_port

OLD = ["0.1.0", "0.2.0"]
CURRENT = "0.3.0"


def fixture(version):
    return os.path.join(os.path.dirname(__file__), "fixtures", f"pg_emit--{version}.sql")

CATALOG = {
    "functions": """
        SELECT p.proname, pg_get_function_identity_arguments(p.oid), p.prosrc, p.proisstrict,
               p.provolatile, p.proparallel, p.prosecdef, p.proconfig, p.proacl::text,
               obj_description(p.oid, 'pg_proc')
          FROM pg_proc p JOIN pg_depend d ON d.objid = p.oid AND d.classid = 'pg_proc'::regclass
          JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_emit'
         ORDER BY 1, 2""",
    "relations": """
        SELECT c.relname, c.relkind, c.relacl::text, c.reloptions, obj_description(c.oid, 'pg_class')
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'emit' ORDER BY 1""",
    # In table order: SELECT * and COPY see the same columns either way.
    "columns": """
        SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
               pg_get_expr(ad.adbin, ad.adrelid), a.attcompression
          FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'emit'
          LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
         WHERE a.attnum > 0 AND NOT a.attisdropped ORDER BY c.relname, a.attnum""",
    "indexes": """
        SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'emit' ORDER BY 1""",
    "constraints": """
        SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)
          FROM pg_constraint WHERE connamespace = 'emit'::regnamespace ORDER BY 1, 2""",
    # pg_dump's list of tables and sequences whose contents it keeps.
    "dumped": """
        SELECT array(SELECT c::regclass::text FROM unnest(extconfig) c ORDER BY 1), extcondition
          FROM pg_extension WHERE extname = 'pg_emit'""",
    "sequences": """
        SELECT c.relname, c.relacl::text FROM pg_class c
         WHERE c.relkind = 'S' AND c.relnamespace = 'emit'::regnamespace ORDER BY 1""",
    "event_triggers": """
        SELECT evtname, evtevent, evtfoid::regprocedure::text, evtenabled, evttags
          FROM pg_event_trigger ORDER BY 1""",
    "views": """
        SELECT viewname, definition FROM pg_views WHERE schemaname = 'emit' ORDER BY 1""",
}


def extension_dir():
    share = subprocess.run([f"{BIN}/pg_config", "--sharedir"], capture_output=True,
                           text=True, check=True).stdout.strip()
    return os.path.join(share, "extension")


def as_root(*cmd):
    subprocess.run(([] if os.geteuid() == 0 else ["sudo"]) + list(cmd), check=True)


@pytest.fixture(scope="module")
def old_scripts():
    installed_here = []
    for version in OLD:
        target = os.path.join(extension_dir(), os.path.basename(fixture(version)))
        if not os.path.exists(target):
            as_root("cp", fixture(version), target)
            installed_here.append(target)
    yield
    for target in installed_here:
        as_root("rm", "-f", target)


def snapshot(conn):
    return {k: conn.execute(q).fetchall() for k, q in CATALOG.items()}


@pytest.mark.parametrize("old", OLD)
def test_update_matches_a_fresh_install_and_keeps_the_backlog(cluster, old_scripts, old):
    port = free_port()
    for db in ("emit_old", "emit_new"):
        cluster.create_db(db)
    try:
        with cluster.connect("emit_old") as c:
            c.execute(f"CREATE EXTENSION pg_emit VERSION '{old}'")
            c.execute("CREATE TABLE orders (id int PRIMARY KEY)")
            c.execute(
                "CREATE TRIGGER out AFTER INSERT ON orders FOR EACH ROW EXECUTE FUNCTION "
                f"row_to_socket('127.0.0.1', {port}, 'delivery=async', 'framing=ndjson')")
            c.execute("INSERT INTO orders SELECT generate_series(1, 5)")
            assert c.execute("SELECT sum(events) FROM emit.outbox").fetchone()[0] == 5
            # What the old worker left: a dead letter and its counters, as
            # 0.1.0 wrote them; a setting of the database.
            dest = f"tcp://127.0.0.1:{port}?framing=ndjson"
            c.execute(
                "INSERT INTO emit.dead_letter (outbox_id, destination, host, port, framing, events, "
                "payload, attempts, last_error, enqueued_at) VALUES (1, %s, '127.0.0.1', %s, 'ndjson', "
                "1, '{\"dead\":1}', 10, 'connection refused', now())", (dest, port))
            c.execute("INSERT INTO emit.destinations (destination, delivered, dead_lettered) "
                      "VALUES (%s, 41, 1)", (dest,))
            c.execute("ALTER DATABASE emit_old SET pg_emit.connect_timeout = '3s'")
            c.execute("ALTER EXTENSION pg_emit UPDATE")
            assert c.execute(
                "SELECT extversion FROM pg_extension WHERE extname = 'pg_emit'").fetchone()[0] == CURRENT
            updated = snapshot(c)
        with cluster.connect("emit_new") as c:
            c.execute("CREATE EXTENSION pg_emit")
            fresh = snapshot(c)
        for k in CATALOG:
            assert updated[k] == fresh[k], k
        nd = Receiver("ndjson", port=port)
        try:
            got = nd.wait_for(5, timeout=20)
            assert sorted({json.loads(m)["new"]["id"] for m in got}) == [1, 2, 3, 4, 5]
            with cluster.connect("emit_old") as c:
                assert wait_until(lambda: c.execute("SELECT count(*) FROM emit.outbox").fetchone()[0] == 0)
                assert c.execute("SELECT format, last_error FROM emit.dead_letter").fetchall() == [
                    ("json", "connection refused")]
                assert c.execute("SELECT delivered >= 46, dead_lettered FROM emit.destinations "
                                 "WHERE destination = %s", (dest,)).fetchone() == (True, 1)
                assert c.execute("SHOW pg_emit.connect_timeout").fetchone()[0] == "3s"
                assert c.execute("SELECT emit.requeue_dead_letters()").fetchone()[0] == 1
            # Delivered as async events are, with an id in front.
            got = [json.loads(m) for m in nd.wait_for(6, timeout=20)]
            assert [e for e in got if "dead" in e][0]["dead"] == 1
        finally:
            nd.close()
    finally:
        with cluster.connect() as c:
            for db in ("emit_old", "emit_new"):
                c.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def test_dead_letters_requeued_before_the_update_are_delivered_after_it(cluster, old_scripts):
    """Between installing this library and ALTER EXTENSION UPDATE, the
    0.2 schema's requeue_dead_letters runs this library's code, which
    must not name the 0.3 columns (keys, record_keys) its tables lack."""
    port = free_port()
    cluster.create_db("emit_requeue")
    try:
        with cluster.connect("emit_requeue") as c:
            c.execute("CREATE EXTENSION pg_emit VERSION '0.2.0'")
            dest = f"tcp://127.0.0.1:{port}?framing=ndjson"
            c.execute(
                "INSERT INTO emit.dead_letter (outbox_id, destination, host, port, framing, events, "
                "payload, attempts, last_error, enqueued_at) VALUES (1, %s, '127.0.0.1', %s, 'ndjson', "
                "1, '{\"dead\":1}', 10, 'connection refused', now())", (dest, port))
            assert c.execute("SELECT emit.requeue_dead_letters(%s)", (dest,)).fetchone()[0] == 1
            assert c.execute("SELECT count(*) FROM emit.dead_letter").fetchone()[0] == 0
            assert c.execute("SELECT destination, events, format FROM emit.outbox").fetchall() == [
                (dest, 1, "json")]
            c.execute("ALTER EXTENSION pg_emit UPDATE")
        nd = Receiver("ndjson", port=port)
        try:
            got = [json.loads(m) for m in nd.wait_for(1, timeout=20)]
            assert got[0]["dead"] == 1
        finally:
            nd.close()
    finally:
        with cluster.connect() as c:
            c.execute("DROP DATABASE IF EXISTS emit_requeue WITH (FORCE)")
