"""The .deb that `make package` built for one PostgreSQL version (in
$PG_EMIT_PACKAGE, with $PG_BIN that version's binaries): it installs into
a PostgreSQL without pg_emit, `CREATE EXTENSION pg_emit` works, events go
out in sync and async delivery, and removing the package takes every file
away. Run by `make package-test` (it replaces what `make install` put
there, so the integration suite does not run it)."""

import json
import os
import subprocess

import pytest

from pgcluster import BIN, Cluster, wait_until
from receivers import Receiver

DEB = os.environ.get("PG_EMIT_PACKAGE")
pytestmark = pytest.mark.skipif(not DEB, reason="make package-test runs this")


def sh(*cmd, check=True):
    root = [] if os.geteuid() == 0 else ["sudo"]
    return subprocess.run(root + list(cmd), check=check, capture_output=True, text=True)


def field(name):
    return subprocess.run(["dpkg-deb", "-f", DEB, name], check=True, capture_output=True,
                          text=True).stdout.strip()


def test_package_installs_works_and_removes_cleanly():
    major = subprocess.run([f"{BIN}/pg_config", "--version"], check=True, capture_output=True,
                           text=True).stdout.split()[1].split(".")[0]
    package = field("Package")
    assert package == f"postgresql-{major}-pg-emit"
    upstream, revision = field("Version").rsplit("-", 1)
    assert revision.isdigit()
    depends = [d.strip().split()[0] for d in field("Depends").split(",")]
    assert f"postgresql-{major}" in depends and "libc6" in depends
    files = [line.split()[-1].lstrip(".") for line in subprocess.run(
        ["dpkg-deb", "-c", DEB], check=True, capture_output=True, text=True).stdout.splitlines()
        if not line.startswith("d")]
    lib = f"/usr/lib/postgresql/{major}/lib/pg_emit.so"
    ext = f"/usr/share/postgresql/{major}/extension"
    assert lib in files
    assert f"/usr/share/doc/{package}/copyright" in files
    for f in ("pg_emit.control", "pg_emit--0.3.0.sql", "pg_emit--0.1.0--0.2.0.sql",
              "pg_emit--0.2.0--0.3.0.sql"):
        assert f"{ext}/{f}" in files
    # A server without pg_emit: what `make install` copied goes first.
    for f in files:
        sh("rm", "-f", f)

    registered = sh("dpkg-query", "-W", "-f=${Status}", f"postgresql-{major}", check=False)
    if "install ok installed" in registered.stdout:
        sh("apt-get", "install", "-y", "-qq", os.path.abspath(DEB))
    else:
        # 14, 16, 17 and 18 are the pinned builds, laid out here as Debian
        # lays out its server (scripts/install-postgres.sh) but not dpkg
        # packages: the one dependency dpkg cannot see is waived, nothing
        # else.
        sh("dpkg", "--ignore-depends", f"postgresql-{major}", "-i", DEB)
    try:
        assert all(os.path.exists(f) for f in files)
        cluster = Cluster(f"pg_emit-package-{major}", port=54341)
        cluster.init().start()
        rx = Receiver("ndjson")
        try:
            dest = f"tcp://127.0.0.1:{rx.port}?framing=ndjson"
            with cluster.connect() as c:
                c.execute("CREATE EXTENSION pg_emit")
                assert c.execute("SELECT extversion FROM pg_extension "
                                 "WHERE extname = 'pg_emit'").fetchone()[0] == upstream
                c.execute("SELECT send_message(%s, '{\"via\":\"sync\"}', 'sync')", (dest,))
                c.execute("CREATE TABLE t (id int PRIMARY KEY)")
                c.execute("CREATE TRIGGER out AFTER INSERT ON t FOR EACH ROW EXECUTE FUNCTION "
                          f"row_to_destination('{dest}', 'delivery=async')")
                c.execute("INSERT INTO t VALUES (1)")
                got = [json.loads(m) for m in rx.wait_for(2, timeout=20)]
                assert got[0] == {"via": "sync"} and got[1]["new"] == {"id": 1}
                assert wait_until(lambda: c.execute(
                    "SELECT count(*) FROM emit.outbox").fetchone()[0] == 0, 10)
                c.execute("DROP EXTENSION pg_emit CASCADE")
        finally:
            rx.close()
            cluster.destroy()
    finally:
        sh("dpkg", "--purge", package)
    assert not any(os.path.exists(f) for f in files)
