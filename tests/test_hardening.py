"""pg_emit attacked the way a hostile tenant would: an ordinary role that may
write one table, a database owner, a role with CREATE on `public`. Each test
here failed on 0.1.0 (issue 9 names the finding it covers).

Everything runs in one preloaded cluster whose server environment carries
proxy variables and RUST_BACKTRACE, as a careless host might set them.
"""

import json
import os
import socket
import tempfile
import time

import psycopg
import pytest

from pgcluster import Cluster, wait_until
from receivers import HttpReceiver, Listener, Receiver, free_port

DB = "hard"
LOCK_KEY = 0x7067456D  # 0.1.0's advisory lock key for the worker


class Proxy(Listener):
    """Where the server's HTTP_PROXY points: it must never be used."""

    def serve(self, conn, seq):
        conn.close()


@pytest.fixture(scope="module")
def proxy():
    p = Proxy()
    yield p
    p.close()


@pytest.fixture(scope="module")
def hard(proxy):
    c = Cluster("pg_emit-hard", port=54334, conf={
        "shared_preload_libraries": "'pg_emit'",
        "pg_emit.retry_backoff_min": "'20ms'",
        "pg_emit.retry_backoff_max": "'200ms'",
        "pg_emit.max_attempts": "3",
    })
    url = f"http://127.0.0.1:{proxy.port}"
    env = {k: url for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                            "http_proxy", "https_proxy", "all_proxy")}
    env["RUST_BACKTRACE"] = "1"
    c.env = env
    c.init().start(env=env)
    with c.connect() as conn:
        conn.execute(f"CREATE DATABASE {DB}")
    with c.connect(DB) as conn:
        conn.execute("CREATE EXTENSION pg_emit")
    yield c
    c.destroy()


def admin(cluster, dbname=DB):
    """A superuser session. In the trapped database it trusts nothing in
    `public` or the database's settings, so that the test's own queries do
    not trip the traps."""
    opts = ""
    if dbname == "shadow":
        opts = (" options='-csearch_path=pg_catalog,pg_temp -crole=none "
                "-cstatement_timeout=0 -cdefault_transaction_read_only=off'")
    return psycopg.connect(cluster.dsn(dbname) + opts, autocommit=True)


def login(cluster, user, dbname=DB, **settings):
    opts = " ".join(f"-c{k}={v}" for k, v in settings.items())
    dsn = cluster.dsn(dbname, user) + (f" options='{opts}'" if opts else "")
    conn = psycopg.connect(dsn, autocommit=True)
    conn.warnings = []
    conn.add_notice_handler(lambda d: conn.warnings.append(d.message_primary))
    return conn


def fresh_role(c, name, *attrs):
    """Creates `name` anew; its grants in this database go with the old one."""
    if c.execute("SELECT FROM pg_catalog.pg_roles WHERE rolname = %s", (name,)).fetchone():
        c.execute(f"DROP OWNED BY {name}")
        c.execute(f"DROP ROLE {name}")
    c.execute(f"CREATE ROLE {name} LOGIN {' '.join(attrs)}")


def is_superuser(c, role):
    return c.execute(
        "SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = %s", (role,)).fetchone()[0]


# --- Finding 1 and 2: nobody becomes superuser through names pg_emit calls ---

# (name, argument types, return type, what the original returns). Every name
# pg_emit's SQL uses, in the signatures that could beat pg_catalog's.
SHADOWED = [
    ("pg_total_relation_size", "text", "bigint", "0"),
    ("pg_total_relation_size", "regclass", "bigint", "0"),
    ("make_interval", "secs integer", "interval", "pg_catalog.make_interval(secs => secs::float8)"),
    ("make_interval", "secs bigint", "interval", "pg_catalog.make_interval(secs => secs::float8)"),
    ("pg_backend_pid", "", "integer", "pg_catalog.pg_backend_pid()"),
    ("pg_try_advisory_lock", "integer, integer", "boolean", "pg_catalog.pg_try_advisory_lock($1, $2)"),
    ("pg_try_advisory_lock", "bigint", "boolean", "pg_catalog.pg_try_advisory_lock($1)"),
    ("now", "", "timestamptz", "pg_catalog.now()"),
    ("clock_timestamp", "", "timestamptz", "pg_catalog.clock_timestamp()"),
    ("to_regclass", "text", "regclass", "pg_catalog.to_regclass($1)"),
    ("array_to_string", "text[], text", "text", "pg_catalog.array_to_string($1, $2)"),
    ("string_to_array", "text, text", "text[]", "pg_catalog.string_to_array($1, $2)"),
]
# (operator, left, right, pg_catalog expression)
OPERATORS = [
    ("=", "bigint", "bigint"), ("=", "integer", "integer"), ("=", "text", "text"),
    ("=", "name", "text"), (">", "integer", "integer"), (">=", "integer", "integer"),
    ("-", "integer", "integer"), ("+", "integer", "integer"), ("+", "bigint", "bigint"),
    ("<", "timestamptz", "timestamptz"), ("-", "timestamptz", "interval"),
]


def plant_traps(c):
    """As an attacker with CREATE on public: functions, aggregates,
    operators and views that make the attacker superuser when anyone else
    calls them, and log who did."""
    c.execute("CREATE TABLE public.calls (name text, who text)")
    c.execute("GRANT INSERT ON public.calls TO PUBLIC")
    c.execute("""
        CREATE FUNCTION public.trap(n text) RETURNS boolean LANGUAGE plpgsql
        SET search_path = pg_catalog AS $$
        BEGIN
          IF current_user OPERATOR(pg_catalog.<>) 'mallory' THEN
            INSERT INTO public.calls VALUES (n, current_user);
            BEGIN EXECUTE 'ALTER ROLE mallory SUPERUSER';
            EXCEPTION WHEN OTHERS THEN NULL; END;
          END IF;
          RETURN true;
        END $$""")
    for name, args, ret, expr in SHADOWED:
        c.execute(f"""
            CREATE FUNCTION public.{name}({args}) RETURNS {ret} LANGUAGE plpgsql
            SET search_path = pg_catalog AS $$
            BEGIN PERFORM public.trap('{name}({args})'); RETURN {expr}; END $$""")
    for t in ("bigint", "integer"):
        c.execute(f"""
            CREATE FUNCTION public.unnest({t}[]) RETURNS SETOF {t} LANGUAGE plpgsql
            SET search_path = pg_catalog AS $$
            BEGIN PERFORM public.trap('unnest({t}[])'); RETURN QUERY SELECT pg_catalog.unnest($1); END $$""")
    c.execute("""
        CREATE FUNCTION public.sum_step(bigint, integer) RETURNS bigint LANGUAGE plpgsql
        SET search_path = pg_catalog AS $$
        BEGIN PERFORM public.trap('sum(integer)'); RETURN $1 OPERATOR(pg_catalog.+) $2; END $$""")
    c.execute("CREATE AGGREGATE public.sum(integer) (sfunc = public.sum_step, stype = bigint, initcond = '0')")
    for i, (op, left, right) in enumerate(OPERATORS):
        ret = "boolean" if op in ("=", ">", ">=", "<") else (
            "timestamptz" if left == "timestamptz" else left)
        c.execute(f"""
            CREATE FUNCTION public.op_{i}({left}, {right}) RETURNS {ret} LANGUAGE plpgsql
            SET search_path = pg_catalog AS $$
            BEGIN PERFORM public.trap('{op}({left}, {right})');
                  RETURN $1 OPERATOR(pg_catalog.{op}) $2; END $$""")
        c.execute(f"CREATE OPERATOR public.{op} (leftarg = {left}, rightarg = {right}, function = public.op_{i})")
    for view in ("pg_extension", "pg_roles", "pg_namespace"):
        c.execute(f"CREATE VIEW public.{view} AS SELECT * FROM pg_catalog.{view} WHERE public.trap('{view}')")


@pytest.fixture(scope="module")
def shadowed(hard):
    """Database `shadow`: owned by `dbowner`, who points its search_path at
    public and sets a statement timeout and read-only default for everyone
    (the worker included); `mallory` planted traps in public before pg_emit
    was installed; orders has sync, commit, async, dead-ending and default
    triggers."""
    with admin(hard, "postgres") as c:
        c.execute("DROP DATABASE IF EXISTS shadow WITH (FORCE)")
        for r in ("mallory", "dbowner"):
            fresh_role(c, r)
        c.execute("CREATE DATABASE shadow OWNER dbowner")
    with admin(hard, "shadow") as c:
        c.execute("GRANT CREATE ON SCHEMA public TO mallory")
    with login(hard, "mallory", "shadow") as m:
        plant_traps(m)
    with login(hard, "dbowner", "shadow") as o:
        o.execute("ALTER DATABASE shadow SET search_path = public, pg_catalog")
        o.execute("ALTER DATABASE shadow SET statement_timeout = '1ms'")
        o.execute("ALTER DATABASE shadow SET default_transaction_read_only = on")
        o.execute("ALTER DATABASE shadow SET lock_timeout = '1ms'")
        o.execute("ALTER DATABASE shadow SET role = 'dbowner'")
    with admin(hard, "shadow") as c:
        c.execute("CREATE EXTENSION pg_emit SCHEMA public")
        c.execute("CREATE TABLE public.orders (id int PRIMARY KEY, v text)")
        c.execute("GRANT INSERT, SELECT ON public.orders TO mallory")
        c.execute("GRANT emit_admin TO mallory")
    yield hard
    with admin(hard, "postgres") as c:
        c.execute("DROP DATABASE shadow WITH (FORCE)")


def test_no_path_through_pg_emit_makes_anyone_superuser(shadowed):
    hard = shadowed
    rx = {k: Receiver("ndjson") for k in ("sync", "commit", "async", "default")}
    web = HttpReceiver()
    dead_port = free_port()
    try:
        with admin(hard, "shadow") as c:
            for kind, opts in (("sync", ""), ("commit", ", 'delivery=commit'"),
                               ("async", ", 'delivery=async'"), ("default", "")):
                c.execute(
                    f"CREATE TRIGGER o_{kind} AFTER INSERT ON public.orders FOR EACH ROW EXECUTE "
                    f"FUNCTION public.row_to_socket('127.0.0.1', {rx[kind].port}, 'framing=ndjson'{opts})")
            c.execute(
                "CREATE TRIGGER o_dead AFTER INSERT ON public.orders FOR EACH ROW EXECUTE FUNCTION "
                f"public.row_to_socket('127.0.0.1', {dead_port}, 'framing=ndjson', 'delivery=async')")
            c.execute(
                "CREATE TRIGGER o_http AFTER INSERT ON public.orders FOR EACH ROW EXECUTE FUNCTION "
                f"public.row_to_http('{web.url}', 'delivery=async')")
        # The writer runs under the database's search_path (public first).
        m = login(hard, "mallory", "shadow", statement_timeout=0, lock_timeout=0,
                  default_transaction_read_only="off")
        try:
            assert m.execute("SHOW search_path").fetchone()[0] == "public, pg_catalog"
            # Finding 1's attack: switch the default trigger to async, whose
            # outbox write once ran unqualified SQL as superuser.
            try:
                m.execute("SET pg_emit.default_delivery = async")
                refused = False
            except psycopg.errors.InsufficientPrivilege:
                refused = True
            for i in range(1, 6):
                m.execute(f"INSERT INTO public.orders VALUES ({i}, 'x')")
            with admin(hard, "shadow") as c:
                assert not is_superuser(c, "mallory")
            with m.transaction():
                m.execute("INSERT INTO public.orders VALUES (6, 'x')")
                try:
                    with m.transaction():
                        m.execute("INSERT INTO public.orders VALUES (7, 'x')")
                        raise RuntimeError
                except RuntimeError:
                    pass
            for kind in rx:
                got = rx[kind].wait_for(6, timeout=10)
                assert len(got) >= 6, (kind, got)
            assert len(web.wait_for(6)) == 6
            # Retried, then dead-lettered (max_attempts = 3), then requeued
            # by emit_admin from the same hostile search_path.
            with admin(hard, "shadow") as c:
                assert wait_until(lambda: c.execute(
                    "SELECT count(*) FROM emit.dead_letter").fetchone()[0] >= 6, 15)
                # Requeued events wait for the restart below.
                c.execute("ALTER SYSTEM SET pg_emit.max_attempts = 100000")
                c.execute("SELECT pg_catalog.pg_reload_conf()")
                time.sleep(0.3)
            assert m.execute("SELECT emit.requeue_dead_letters()").fetchone()[0] >= 6
            assert m.execute("SELECT count(*) FROM emit.stats").fetchone()[0] >= 1
        finally:
            m.close()
        # Restart with that backlog: the launcher starts the worker, under
        # the database's settings, and it delivers once the receiver is up.
        hard.stop("fast")
        late = Receiver("ndjson", port=dead_port)
        try:
            hard.start(env=hard.env)
            got = late.wait_for(6, timeout=20)
            assert {eval_id(g) for g in got} >= set(range(1, 7)), got
        finally:
            late.close()
        with admin(hard, "shadow") as c:
            c.execute("ALTER SYSTEM SET pg_emit.max_attempts = 3")
            c.execute("SELECT pg_catalog.pg_reload_conf()")
            calls = c.execute("SELECT name, who FROM public.calls").fetchall()
            assert calls == []
            for role in ("mallory", "dbowner"):
                assert not is_superuser(c, role), role
        assert refused
    finally:
        for r in rx.values():
            r.close()
        web.close()


def eval_id(msg):
    return json.loads(msg)["new"]["id"]


def test_a_schema_named_emit_in_another_database_is_not_trusted(hard):
    """With preloading, the launcher starts a worker in every database; in
    one without pg_emit, a role with CREATE there can make a schema `emit`
    whose tables fire its triggers. The worker must not touch them."""
    with admin(hard, "postgres") as c:
        c.execute("DROP DATABASE IF EXISTS squat WITH (FORCE)")
        fresh_role(c, "squatter")
        c.execute("CREATE DATABASE squat")
        c.execute("GRANT CREATE ON DATABASE squat TO squatter")
    with login(hard, "squatter", "squat") as q:
        q.execute("CREATE SCHEMA emit")
        q.execute("CREATE TABLE emit.worker (one bool, pid int, started_at timestamptz)")
        q.execute("INSERT INTO emit.worker VALUES (true, NULL, NULL)")
        q.execute("GRANT ALL ON emit.worker TO PUBLIC")
        q.execute("""CREATE FUNCTION emit.escalate() RETURNS trigger LANGUAGE plpgsql AS $$
                     BEGIN EXECUTE 'ALTER ROLE squatter SUPERUSER'; RETURN NEW; END $$""")
        q.execute("CREATE TRIGGER t BEFORE UPDATE ON emit.worker FOR EACH ROW "
                  "EXECUTE FUNCTION emit.escalate()")
    try:
        hard.stop("fast")
        hard.start(env=hard.env)
        time.sleep(2)  # the launcher has started (and ended) a worker there
        with admin(hard, "squat") as c:
            assert c.execute("SELECT pid FROM emit.worker").fetchone()[0] is None
            assert not is_superuser(c, "squatter")
    finally:
        with admin(hard, "postgres") as c:
            c.execute("DROP DATABASE squat WITH (FORCE)")


def test_long_urls_are_cut_in_warnings(hard):
    with admin(hard) as c:
        c.warnings = []
        c.add_notice_handler(lambda d: c.warnings.append(d.message_primary))
        c.execute("SET pg_emit.failure_cooldown = 0")
        url = "http://127.0.0.1:1/" + "a" * 100000
        assert c.execute("SELECT public.send_http(%s, 'x')", (url,)).fetchone()[0] == 0
        assert c.warnings and all(len(w) < 1000 for w in c.warnings), [len(w) for w in c.warnings]


# --- Finding 6: no role can keep the worker from starting ---

def test_no_lock_a_role_can_take_stops_the_worker(hard):
    nd = Receiver("ndjson")
    with admin(hard) as c:
        fresh_role(c, "locker")
        c.execute("CREATE TABLE IF NOT EXISTS locked (id int)")
        c.execute("TRUNCATE locked")
        c.execute("DROP TRIGGER IF EXISTS out ON locked")
        c.execute(
            "CREATE TRIGGER out AFTER INSERT ON locked FOR EACH ROW EXECUTE FUNCTION "
            f"public.row_to_socket('127.0.0.1', {nd.port}, 'delivery=async', 'framing=ndjson')")
        c.execute("GRANT INSERT ON locked TO locker")
        c.execute("INSERT INTO locked VALUES (1)")
        assert len(nd.wait_for(1, timeout=10)) == 1
        # Recorded as delivered before the worker goes (else it is rightly
        # sent again).
        assert wait_until(lambda: c.execute(
            "SELECT count(*) FROM emit.outbox WHERE port = %s", (nd.port,)).fetchone()[0] == 0, 10)
        dboid = c.execute("SELECT oid FROM pg_catalog.pg_database WHERE datname = %s", (DB,)).fetchone()[0]
        pid = c.execute("SELECT pid FROM emit.worker").fetchone()[0]
        locker = login(hard, "locker")
        try:
            # Every lock SQL lets a role take, taken while the worker is down.
            c.execute("SELECT pg_catalog.pg_terminate_backend(%s)", (pid,))
            locker.execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_KEY, dboid))
            locker.execute("SELECT pg_advisory_lock(%s)", ((LOCK_KEY << 32) | dboid,))
            assert wait_until(lambda: c.execute(
                "SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE pid = %s", (pid,)
            ).fetchone()[0] == 0, 5)
            locker.execute("INSERT INTO locked VALUES (2)")
            got = nd.wait_for(2, timeout=10)
            assert [eval_id(g) for g in got][-1] == 2, got
        finally:
            locker.close()
            nd.close()


# A database owner's planner settings: the worker's kept plans stay ordered
# index scans of the queue (issue 24, item 12).
HOSTILE_PLANNER = {
    "enable_indexscan": "off", "enable_indexonlyscan": "off", "random_page_cost": "1e20",
    "jit": "on", "jit_above_cost": "0", "max_parallel_workers_per_gather": "8",
    "parallel_setup_cost": "0", "parallel_tuple_cost": "0", "plan_cache_mode": "force_custom_plan",
}


def test_a_database_owner_cannot_change_the_worker_s_plans(hard):
    rx = Receiver("ndjson")
    with admin(hard, "postgres") as c:
        c.execute("DROP DATABASE IF EXISTS planned WITH (FORCE)")
        fresh_role(c, "planner")
        c.execute("CREATE DATABASE planned OWNER planner")
    try:
        with login(hard, "planner", "planned") as o:
            for k, v in HOSTILE_PLANNER.items():
                o.execute(f"ALTER DATABASE planned SET {k} = '{v}'")
        with admin(hard, "planned") as c:
            c.execute("CREATE EXTENSION pg_emit")
            c.execute("CREATE TABLE t (id int PRIMARY KEY)")
            c.execute("CREATE TRIGGER out AFTER INSERT ON t FOR EACH ROW EXECUTE FUNCTION "
                      f"public.row_to_socket('127.0.0.1', {rx.port}, 'delivery=async', 'framing=ndjson')")
            assert c.execute("SHOW random_page_cost").fetchone()[0] == "1e+20"
            for i in range(200):
                c.execute("INSERT INTO t VALUES (%s)", (i,))
            assert len(rx.wait_for(200, timeout=30)) == 200

            def scans():
                return c.execute(
                    "SELECT coalesce(seq_scan, 0), coalesce(idx_scan, 0) FROM pg_catalog.pg_stat_user_tables "
                    "WHERE schemaname = 'emit' AND relname = 'outbox'").fetchone()
            # The worker reports its statistics after each transaction.
            assert wait_until(lambda: scans()[1] > 0, 10), scans()
            # CREATE EXTENSION's index builds each count as a scan of the
            # table, reported whenever that session flushes its statistics;
            # the worker's 200 deliveries would add many more.
            builds = c.execute("SELECT count(*) FROM pg_catalog.pg_index "
                               "WHERE indrelid = 'emit.outbox'::pg_catalog.regclass").fetchone()[0]
            assert scans()[0] <= builds, scans()
    finally:
        rx.close()
        with admin(hard, "postgres") as c:
            c.execute("DROP DATABASE planned WITH (FORCE)")


# --- Finding 3: no proxy from the server's environment ---

def test_proxy_variables_in_the_server_environment_are_ignored(hard, proxy):
    web = HttpReceiver()
    try:
        with admin(hard) as c:
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
                c.execute("SELECT public.send_http('http://169.254.169.254/latest/meta-data/', 'x')")
            assert "link-local" in str(e.value)
            assert c.execute("SELECT public.send_http(%s, 'x')", (web.url,)).fetchone()[0] == 200
        assert len(web.wait_for(1)) == 1
        time.sleep(0.2)
        assert proxy.connections == 0
    finally:
        web.close()


# --- Findings 4, 5, 8, 11, 13, 14: what a URL and its headers may say ---

def test_allowlist_url_entries_are_parsed_not_prefixes(hard):
    web = HttpReceiver()
    try:
        with admin(hard) as c:
            # 0.1.0 compared strings: http://127.0.0.1:4123 allowed :41234.
            c.execute(f"SET pg_emit.allowed_destinations = 'http://127.0.0.1:{web.port // 10}'")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute("SELECT public.send_http(%s, 'x')", (web.url,))
            c.execute(f"SET pg_emit.allowed_destinations = 'http://127.0.0.1:{web.port}/pg/'")
            base = f"http://127.0.0.1:{web.port}"
            for sneaky in ("/pg/../admin", "/pg/%2e%2e/admin", "/pg/..%2fadmin", "/pg/%2E%2E/admin",
                           "/pg/..;/admin"):
                with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
                    c.execute("SELECT public.send_http(%s, 'x')", (base + sneaky,))
                assert "segments" in str(e.value)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute("SELECT public.send_http(%s, 'x')", (base + "/pgx",))
            assert c.execute("SELECT public.send_http(%s, 'x')", (base + "/pg/ok",)).fetchone()[0] == 200
        assert [r[1] for r in web.wait_for(1, timeout=0.5)] == ["/pg/ok"]
    finally:
        web.close()


@pytest.mark.parametrize("headers", [
    '{"Host": "admin.internal"}', '{"host": "x"}', '{"Content-Length": "0"}',
    '{"Transfer-Encoding": "chunked"}', '{"X-Emit-Signature": "v1=00"}',
    '{"X-Emit-Timestamp": "1"}', '{"webhook-signature": "v1,AA=="}',
])
def test_callers_cannot_set_routing_or_signature_headers(hard, headers):
    with admin(hard) as c:
        with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
            c.execute("SELECT public.send_http('http://127.0.0.1:1/', 'x', 'POST', "
                      "'application/json', %s::jsonb)", (headers,))
        assert "cannot be set by the caller" in str(e.value)


def test_trigger_header_option_cannot_set_host(hard):
    with admin(hard) as c:
        c.execute("DROP TABLE IF EXISTS hosted")
        c.execute("CREATE TABLE hosted (id int)")
        c.execute("CREATE TRIGGER out AFTER INSERT ON hosted FOR EACH ROW EXECUTE FUNCTION "
                  "public.row_to_http('http://127.0.0.1:1/', 'header=Host: admin.internal')")
        with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
            c.execute("INSERT INTO hosted VALUES (1)")
        assert "Host" in str(e.value) and "out" in str(e.value)


@pytest.mark.parametrize("url", [
    "http://[::a9fe:a9fe]/", "http://[::ffff:0:a9fe:a9fe]/", "http://[64:ff9b::a9fe:a9fe]/",
    "http://[2002:a9fe:a9fe::1]/",
])
def test_ipv6_spellings_of_metadata_addresses_are_refused(hard, url):
    with admin(hard) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("SELECT public.send_http(%s, 'x')", (url,))


@pytest.mark.parametrize("port", ["65536", "99999999", "-5", "0"])
def test_invalid_url_ports_are_22023(hard, port):
    with admin(hard) as c:
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            c.execute(f"SELECT public.send_http('http://127.0.0.1:{port}/', 'x')")


def test_send_http_argument_errors_name_the_argument(hard):
    with admin(hard) as c:
        for args, name in ((("POST", None), "content_type"), ((None, "text/plain"), "method")):
            with pytest.raises(psycopg.errors.NullValueNotAllowed) as e:
                c.execute("SELECT public.send_http('http://127.0.0.1:1/', 'x', %s, %s)", args)
            assert name in str(e.value)
        deep = '{"a":' * 200 + "1" + "}" * 200
        with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
            c.execute("SELECT public.send_http('http://127.0.0.1:1/', 'x', 'POST', "
                      "'application/json', %s::jsonb)", (deep,))
        assert "headers" in str(e.value)
        with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
            c.execute("SELECT public.send_http('http://127.0.0.1:1/', 'x', repeat('x', 100000))")
        assert len(str(e.value)) < 400


def test_ordinary_roles_cannot_change_delivery_settings(hard):
    with admin(hard) as c:
        fresh_role(c, "writer")
    w = login(hard, "writer")
    try:
        for setting, value in (
            ("default_delivery", "async"), ("commit_buffer_size", "'2TB'"), ("on_error", "warning"),
            ("connect_timeout", "1"), ("write_timeout", "1"), ("failure_cooldown", "'1d'"),
            ("http_timeout", "1"), ("statement_batch_size", "1"),
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                w.execute(f"SET pg_emit.{setting} = {value}")
    finally:
        w.close()


# --- Finding 12: response bodies do not leak row data ---

def test_echoed_payloads_stay_out_of_warnings_and_stats(hard):
    echo = HttpReceiver(default=(400, {}, b""), echo=True)
    with admin(hard) as c:
        fresh_role(c, "clerk")
        c.execute("DROP TABLE IF EXISTS payroll")
        c.execute("CREATE TABLE payroll (id int, name text, salary int)")
        c.execute("GRANT INSERT ON payroll TO clerk")
        c.execute("GRANT SELECT (id, name) ON payroll TO clerk")
        c.execute("CREATE TRIGGER sync_out AFTER INSERT ON payroll FOR EACH ROW EXECUTE FUNCTION "
                  f"public.row_to_http('{echo.url}')")
        c.execute("CREATE TRIGGER async_out AFTER INSERT ON payroll FOR EACH ROW EXECUTE FUNCTION "
                  f"public.row_to_http('{echo.url}?async', 'delivery=async')")
    clerk = login(hard, "clerk")
    try:
        clerk.execute("INSERT INTO payroll VALUES (1, 'ann', 987654)")
        assert any("HTTP 400" in w for w in clerk.warnings), clerk.warnings
        assert not any("987654" in w for w in clerk.warnings), clerk.warnings
    finally:
        clerk.close()
    try:
        with admin(hard) as c:
            dest = echo.url + "?async"
            assert wait_until(lambda: c.execute(
                "SELECT response FROM emit.dead_letter WHERE destination = %s", (dest,)).fetchone(), 10)
            assert "987654" in c.execute(
                "SELECT response FROM emit.dead_letter WHERE destination = %s", (dest,)).fetchone()[0]
            last = c.execute("SELECT last_error FROM emit.stats WHERE destination = %s", (dest,)).fetchone()[0]
            assert "HTTP 400" in last and "987654" not in last
    finally:
        echo.close()


# --- Finding 9: no phantoms from a statement that failed in an exception block ---

def test_failed_statement_inside_an_exception_block_sends_nothing(hard):
    nd = Receiver("ndjson")
    try:
        with admin(hard) as c:
            c.execute("DROP TABLE IF EXISTS checked")
            c.execute("CREATE TABLE checked (id int CHECK (id < 3))")
            c.execute("CREATE TRIGGER out BEFORE INSERT ON checked FOR EACH ROW EXECUTE FUNCTION "
                      f"public.row_to_socket('127.0.0.1', {nd.port}, 'framing=ndjson')")
            c.execute("""DO $$ BEGIN
                           INSERT INTO checked VALUES (1), (2), (3);
                         EXCEPTION WHEN check_violation THEN NULL; END $$""")
            # An outer statement's own events are kept; only the failed
            # inner statement's go.
            c.execute("""CREATE FUNCTION pg_temp.try(i int) RETURNS int LANGUAGE plpgsql AS $$
                         BEGIN INSERT INTO checked VALUES (i * 10); RETURN i;
                         EXCEPTION WHEN check_violation THEN RETURN i; END $$""")
            c.execute("INSERT INTO checked SELECT pg_temp.try(g) FROM generate_series(1, 2) g")
            assert c.execute("SELECT array_agg(id ORDER BY id) FROM checked").fetchone()[0] == [1, 2]
        got = nd.wait_for(3, timeout=1)
        assert sorted(eval_id(g) for g in got) == [1, 2], got
    finally:
        nd.close()


# --- Finding 10: errors pass through pg_emit's hooks untouched ---

def test_errors_keep_their_fields_through_the_hooks(hard):
    with admin(hard) as c:
        c.execute("DROP TABLE IF EXISTS uniq CASCADE")
        c.execute("CREATE TABLE uniq (id int CONSTRAINT uniq_pk PRIMARY KEY)")
        c.execute("INSERT INTO uniq VALUES (1)")
        c.execute("CREATE OR REPLACE PROCEDURE add_uniq(i int) LANGUAGE plpgsql AS "
                  "$$ BEGIN INSERT INTO uniq VALUES (i); END $$")
        statements = {
            "copy": lambda: copy_rows(c, "COPY uniq FROM STDIN", "2\n1\n"),
            "call": lambda: c.execute("CALL add_uniq(1)"),
            "do": lambda: c.execute("DO $$ BEGIN INSERT INTO uniq VALUES (1); END $$"),
        }
        for what, run in statements.items():
            with pytest.raises(psycopg.errors.UniqueViolation) as e:
                run()
            d = e.value.diag
            assert (d.constraint_name, d.table_name, d.schema_name) == ("uniq_pk", "uniq", "public"), what
            assert d.context, what
            assert "backtrace" not in (d.message_detail or "").lower(), what
            assert d.message_detail == "Key (id)=(1) already exists.", what
        with pytest.raises(psycopg.errors.CheckViolation) as e:
            c.execute("ALTER TABLE uniq ADD CONSTRAINT negative CHECK (id < 0)")
        assert (e.value.diag.constraint_name, e.value.diag.table_name) == ("negative", "uniq")


def copy_rows(c, sql, data):
    with c.cursor().copy(sql) as cp:
        cp.write(data)


# --- Finding 7: DNS is bounded by the timeouts for HTTP too ---

class Blackhole:
    """A DNS server on loopback that reads queries and never answers."""

    def __init__(self, ip="127.0.0.153"):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((ip, 53))
        self.ip = ip

    def close(self):
        self.sock.close()


@pytest.fixture
def silent_dns_cluster():
    """A cluster whose /etc/resolv.conf (in its own mount namespace) names a
    server that never answers: glibc then waits 5 s × 2 attempts."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a mount namespace and port 53")
    hole = Blackhole()
    conf = tempfile.NamedTemporaryFile("w", suffix=".resolv.conf", delete=False)
    conf.write(f"nameserver {hole.ip}\noptions timeout:5 attempts:2\n")
    conf.close()
    os.chmod(conf.name, 0o644)
    c = Cluster("pg_emit-dns", port=54335)
    c.init().start(wrap=["unshare", "-m", "sh", "-c",
                         f'mount --bind {conf.name} /etc/resolv.conf && exec "$@"', "sh"])
    c.create_db(DB)
    with c.connect(DB) as conn:
        conn.execute("CREATE EXTENSION pg_emit")
    yield c
    c.destroy()
    hole.close()
    os.unlink(conf.name)


def test_http_name_lookup_obeys_the_timeouts(silent_dns_cluster):
    c = login(silent_dns_cluster, "postgres")
    try:
        c.execute("SET pg_emit.connect_timeout = '1s'")
        c.execute("SET pg_emit.http_timeout = '1s'")
        c.execute("SET pg_emit.failure_cooldown = 0")
        t = time.monotonic()
        assert c.execute("SELECT send_http('http://no-answer.example/', 'x')").fetchone()[0] == 0
        assert time.monotonic() - t < 2.5
        assert any("timed out" in w for w in c.warnings), c.warnings
        c.execute("CREATE TABLE t (id int)")
        c.execute("CREATE TRIGGER out AFTER INSERT ON t FOR EACH ROW EXECUTE FUNCTION "
                  "row_to_http('http://no-answer.example/', 'delivery=commit')")
        t = time.monotonic()
        c.execute("INSERT INTO t VALUES (1)")
        assert time.monotonic() - t < 2.5
    finally:
        c.close()
