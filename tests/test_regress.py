"""Runs the pg_regress suite in pg_test/ against the session cluster."""

import os
import shutil
import subprocess
import tempfile

from pgcluster import BIN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Beside the server's binaries, in Debian's layout and in the pinned builds
# (scripts/install-postgres.sh).
PG_REGRESS = os.path.join(os.path.dirname(BIN), "lib/pgxs/src/test/regress/pg_regress")


def test_pg_regress_suite(cluster):
    tests = sorted(f[:-4] for f in os.listdir(os.path.join(ROOT, "pg_test", "sql")) if f.endswith(".sql"))
    assert tests
    out = tempfile.mkdtemp(prefix="pg_emit-regress-")
    cluster.create_db("emit_regress")
    r = subprocess.run(
        [
            # --bindir: a relocatable build's pg_regress would look for
            # psql where that build was configured, not where it is.
            PG_REGRESS, "--use-existing", f"--bindir={BIN}", f"--host={cluster.sock}", f"--port={cluster.port}",
            "--user=postgres", "--dbname=emit_regress",
            f"--inputdir={os.path.join(ROOT, 'pg_test')}", f"--outputdir={out}", *tests,
        ],
        capture_output=True, text=True,
    )
    diffs = os.path.join(out, "regression.diffs")
    detail = open(diffs).read() if os.path.exists(diffs) else ""
    assert r.returncode == 0, f"{r.stdout}\n{detail}\n(results kept in {out})"
    shutil.rmtree(out)
