"""Every ```sql block of the README and docs/ runs: each page in a
database of its own (with the `orders` table its examples assume), each
block through psql as one script, stopping at the first error.

The example host names (hooks.example.com, ...) resolve to 127.0.0.1 in
the server's own mount namespace, and pg_emit.allowed_destinations admits
only 127.0.0.1: a snippet that sends goes nowhere but this machine. Python,
JavaScript and TypeScript blocks are run by the tests that name them with
`docs_block` (test_examples, test_http, test_standards, test_live), and
test_every_code_block_is_run_by_a_test checks that none is left out."""

import ast
import glob
import os
import re
import subprocess
import tempfile

import pytest

from pgcluster import BIN, Cluster, _as_server_user

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
HOSTS = ["hooks.example.com", "hooks2.example.com", "cache.example.com", "receiver.internal",
         "redis.internal", "nats.internal"]
# What the examples assume exists.
PRELUDE = """
CREATE TABLE orders (id int PRIMARY KEY, total numeric, status text, account_id int,
                     tenant text, customer text, note text, updated_at timestamptz);
"""
ALLOW = "ALTER SYSTEM SET pg_emit.allowed_destinations = '127.0.0.1'"


@pytest.fixture(scope="module")
def docs_cluster():
    if os.geteuid() != 0:
        pytest.skip("needs root for a mount namespace with its own /etc/hosts")
    hosts = tempfile.NamedTemporaryFile("w", suffix=".hosts", delete=False)
    hosts.write("127.0.0.1 localhost " + " ".join(HOSTS) + "\n")
    hosts.close()
    os.chmod(hosts.name, 0o644)
    c = Cluster("pg_emit-docs", port=54344, conf={"shared_preload_libraries": "'pg_emit'",
                                                   "wal_level": "logical"})
    c.init().start(wrap=["unshare", "-m", "sh", "-c",
                         f'mount --bind {hosts.name} /etc/hosts && exec "$@"', "sh"])
    with c.connect() as conn:
        conn.execute("LOAD 'pg_emit'")
        conn.execute(ALLOW)
        conn.execute("SELECT pg_reload_conf()")
        for role in ("app_owner", "ops"):
            conn.execute(f"CREATE ROLE {role}")
    yield c
    c.destroy()
    os.unlink(hosts.name)


def sql_blocks(path):
    return re.findall(r"```sql\n(.*?)```", open(path).read(), re.S)


@pytest.mark.parametrize("page", PAGES, ids=[os.path.relpath(p, ROOT) for p in PAGES])
def test_every_sql_block_runs(docs_cluster, page):
    blocks = sql_blocks(page)
    if not blocks:
        pytest.skip("no SQL here")
    db = "docs_" + re.sub(r"\W", "_", os.path.basename(page)[:-3]).lower()
    docs_cluster.create_db(db)
    with docs_cluster.connect(db) as c:
        c.execute(PRELUDE)
        if "CREATE EXTENSION pg_emit" not in blocks[0]:
            c.execute("CREATE EXTENSION pg_emit")
    try:
        for n, block in enumerate(blocks):
            if "CREATE EXTENSION pg_emit" in block:
                # A block that starts over: as on a database without it.
                with docs_cluster.connect(db) as c:
                    c.execute("DROP EXTENSION IF EXISTS pg_emit CASCADE")
            r = subprocess.run(
                _as_server_user([f"{BIN}/psql", "-X", "-q", "-v", "ON_ERROR_STOP=1",
                                 "-h", docs_cluster.sock, "-p", str(docs_cluster.port),
                                 "-U", "postgres", "-d", db, "-f", "-"]),
                input=block, capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, f"{os.path.relpath(page, ROOT)}, SQL block {n + 1}:\n{block}\n{r.stderr}"
    finally:
        with docs_cluster.connect() as c:
            # A page may change settings (the allowlist, say): not the next.
            c.execute("ALTER SYSTEM RESET ALL")
            c.execute("LOAD 'pg_emit'")
            c.execute(ALLOW)
            c.execute("SELECT pg_reload_conf()")
            c.execute(f'DROP DATABASE "{db}" WITH (FORCE)')


RUNNABLE = ("python", "js", "ts")


def test_every_code_block_is_run_by_a_test():
    """A block of code in one of RUNNABLE is run by the test that names it
    with `docs_block(lang, marker)`: a new snippet without such a test, or
    one edited so that its test no longer finds it, fails here."""
    called = set()
    for path in glob.glob(os.path.join(ROOT, "tests", "*.py")):
        for lang, marker in re.findall(r"""docs_block\(\s*"(\w+)",\s*('[^']*'|"[^"]*")""", open(path).read()):
            called.add((lang, ast.literal_eval(marker)))
    unrun = []
    for page in PAGES:
        for lang, block in re.findall(r"```(\w+)\n(.*?)```", open(page).read(), re.S):
            if lang in RUNNABLE and not any(lang == k and m in block for k, m in called):
                unrun.append(f"{os.path.relpath(page, ROOT)}: ```{lang} {block.splitlines()[0]}")
    assert unrun == []
    # Every other language is data or a shell line, not a program.
    langs = {lang for page in PAGES for lang in re.findall(r"^```(\w+)$", open(page).read(), re.M)}
    assert langs - set(RUNNABLE) <= {"sql", "json", "sh", "nginx"}, langs
