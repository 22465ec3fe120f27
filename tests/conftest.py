"""Fixtures: one real PostgreSQL 15 cluster for the session, with pg_emit
installed by `make test` (cargo pgrx install) before pytest starts."""

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from pgcluster import Cluster  # noqa: E402
from receivers import Receiver  # noqa: E402

DB = "emit_test"


@contextlib.contextmanager
def worker_settings(cluster, **settings):
    """`pg_emit.<name> = value` for the server (ALTER SYSTEM, reloaded)
    while the block runs, reset after it."""

    def apply(reset):
        with cluster.connect() as c:
            c.execute("LOAD 'pg_emit'")  # ALTER SYSTEM checks the setting exists
            for name, value in settings.items():
                if reset:
                    c.execute(f"ALTER SYSTEM RESET pg_emit.{name}")
                else:
                    c.execute(f"ALTER SYSTEM SET pg_emit.{name} = '{value}'")
            c.execute("SELECT pg_reload_conf()")

    apply(reset=False)
    try:
        yield
    finally:
        apply(reset=True)


@pytest.fixture(scope="session")
def cluster():
    c = Cluster("pg_emit-test", port=int(os.environ.get("PG_EMIT_TEST_PORT", "54329")))
    c.init().start()
    c.create_db(DB)
    with c.connect(DB) as conn:
        conn.execute("CREATE EXTENSION pg_emit")
    yield c
    c.destroy()


@pytest.fixture(scope="module")
def fast_retries(cluster):
    """Worker retry delays of 20–300 ms (reloaded), reset afterwards."""
    with worker_settings(cluster, retry_backoff_min="20ms", retry_backoff_max="300ms"):
        yield


class Session:
    """A connection that records the NOTICE/WARNING messages it receives."""

    def __init__(self, cluster, dbname=DB, user="postgres"):
        self.conn = cluster.connect(dbname, user)
        self.notices = []
        # A Diagnostic is only valid inside the callback: copy what we need.
        self.conn.add_notice_handler(
            lambda d: self.notices.append((d.severity_nonlocalized, d.sqlstate, d.message_primary))
        )

    def execute(self, sql, params=None):
        return self.conn.execute(sql, params)

    def one(self, sql, params=None):
        return self.conn.execute(sql, params).fetchone()[0]

    def warnings(self):
        return [msg for sev, _, msg in self.notices if sev == "WARNING"]

    def close(self):
        self.conn.close()


@pytest.fixture
def nd():
    """A receiver of newline-delimited messages on 127.0.0.1."""
    r = Receiver("ndjson")
    yield r
    r.close()


@pytest.fixture
def db(cluster):
    s = Session(cluster)
    yield s
    s.close()


@pytest.fixture
def dest(db, request):
    """A stored destination's name for this test (prefixed by its module),
    dropped afterwards."""
    module = request.module.__name__.removeprefix("test_")[:8]
    name = f"{module}_" + request.node.name.split("[")[0][-40:]
    yield name
    if db.one("SELECT count(*) FROM emit.stored_destinations WHERE name = %s", (name,)):
        db.execute("SELECT emit.drop_destination(%s)", (name,))


def attach(db, table, dest, *opts, v="text"):
    """Creates `table` (id, v) if need be, with an AFTER INSERT OR UPDATE
    row trigger sending to `dest` with trigger options `opts`."""
    extra = "".join(f", '{o}'" for o in opts)
    db.execute(f"CREATE TABLE IF NOT EXISTS {table} (id int PRIMARY KEY, v {v})")
    db.execute(f"CREATE TRIGGER out AFTER INSERT OR UPDATE ON {table} FOR EACH ROW "
               f"EXECUTE FUNCTION row_to_destination('{dest}'{extra})")


@pytest.fixture
def table(db, request):
    """A fresh table name per test, dropped afterwards."""
    node = request.node.name
    digest = hashlib.sha1(node.encode()).hexdigest()[:8]
    name = "t_" + re.sub(r"\W", "_", node.split("[")[0])[:40] + "_" + digest
    db.execute(f"DROP TABLE IF EXISTS {name} CASCADE")
    yield name
    db.execute(f"DROP TABLE IF EXISTS {name} CASCADE")


def wait_running(cluster, pid, text, timeout=10.0):
    """Waits until backend `pid` is executing a statement containing `text`
    (a cancel sent earlier would be ignored by an idle backend)."""
    with cluster.connect() as c:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            row = c.execute(
                "SELECT state, query FROM pg_stat_activity WHERE pid = %s", (pid,)
            ).fetchone()
            if row and row[0] == "active" and text in row[1]:
                time.sleep(0.1)  # past parsing, into the wait
                return
            time.sleep(0.01)
    raise AssertionError(f"backend {pid} never ran {text!r}")


@pytest.fixture(scope="session")
def pki():
    """A throwaway CA, a server certificate for 127.0.0.1/localhost, client
    certificates (client.pem; expired.pem, expired) and another CA
    (other_ca.pem), for HTTPS and brokers over TLS."""
    d = tempfile.mkdtemp(prefix="pg_emit-pki-")
    os.chmod(d, 0o755)

    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=pg_emit test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=localhost")
    with open(os.path.join(d, "san.ext"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "san.ext")
    # Client certificates: one valid, one that expired in 2020 (`openssl
    # ca` is what sets past dates in OpenSSL 3.0), and a CA no one trusts.
    with open(os.path.join(d, "ca.cnf"), "w") as f:
        f.write("[ca]\ndefault_ca = own\n[own]\ndatabase = index.txt\nnew_certs_dir = .\n"
                "serial = ca.srl\ndefault_md = sha256\npolicy = any\nx509_extensions = client\n"
                "[any]\ncommonName = supplied\n"
                "[client]\nbasicConstraints = CA:FALSE\nextendedKeyUsage = clientAuth\n")
    open(os.path.join(d, "index.txt"), "w").close()
    for name in ("client", "expired"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN=pg_emit {name}")
    with open(os.path.join(d, "client.ext"), "w") as f:
        f.write("basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    run("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-out",
        "client.pem", "-days", "2", "-extfile", "client.ext")
    run("ca", "-batch", "-config", "ca.cnf", "-cert", "ca.pem", "-keyfile", "ca.key", "-notext",
        "-in", "expired.csr", "-out", "expired.pem", "-startdate", "20200101000000Z",
        "-enddate", "20200102000000Z")
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "other_ca.key", "-out",
        "other_ca.pem", "-days", "2", "-subj", "/CN=someone else's CA")
    for f in os.listdir(d):
        os.chmod(os.path.join(d, f), 0o644)
    return d


@pytest.fixture
def secret_file():
    """A key file as a DBA would make it: readable by the server's OS user only."""
    d = tempfile.mkdtemp(prefix="pg_emit-key-")
    os.chmod(d, 0o755)
    path = os.path.join(d, "signing.key")

    def write(key):
        with open(path, "w") as f:
            f.write(key + "\n")
        os.chmod(path, 0o600)
        if os.geteuid() == 0:
            shutil.chown(path, "postgres", "postgres")
        return path

    yield write
    shutil.rmtree(d, ignore_errors=True)


def docs_text():
    """The README and every page of docs/, one after the other: tests run
    the snippets they show."""
    import glob
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [os.path.join(root, "README.md")] + sorted(glob.glob(os.path.join(root, "docs", "*.md")))
    return "\n".join(open(p).read() for p in paths)


def docs_block(lang, marker):
    """The ```lang block of the README or docs/ that contains `marker`
    (`tests/test_docs.py` checks that every block is run by some test)."""
    blocks = docs_text().split(f"```{lang}\n")[1:]
    return next(b.split("```", 1)[0] for b in blocks if marker in b)
