"""A throwaway PostgreSQL cluster for tests, the demo and benchmarks: of
the version whose binaries are in $PG_BIN (15 unless told).

initdb refuses to run as root, so as root every server command runs as the
`postgres` OS user (runuser); as any other user it runs directly. The
cluster listens on a Unix socket in its own directory only: no TCP port is
opened, so nothing outside the machine can reach it.
"""

import os
import shutil
import subprocess
import tempfile
import time

import psycopg

BIN = os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin")


# /usr/sbin is not on every root PATH (cron, CI runners, `env -i`).
RUNUSER = shutil.which("runuser") or "/usr/sbin/runuser"


def _as_server_user(cmd):
    if os.geteuid() == 0:
        return [RUNUSER, "-u", "postgres", "--"] + cmd
    return cmd


class Cluster:
    def __init__(self, name="pg_emit", port=54329, conf=None):
        self.root = tempfile.mkdtemp(prefix=f"{name}-")
        os.chmod(self.root, 0o755)
        self.data = os.path.join(self.root, "data")
        self.sock = self.root
        self.log = os.path.join(self.root, "server.log")
        self.port = port
        self.conf = {
            "listen_addresses": "''",
            "unix_socket_directories": f"'{self.sock}'",
            "port": str(port),
            "fsync": "off",
            "shared_buffers": "128MB",
            "max_connections": "50",
            "max_prepared_transactions": "4",
        }
        self.conf.update(conf or {})
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")

    def run(self, *cmd, check=True):
        return subprocess.run(
            _as_server_user(list(cmd)),
            check=check,
            capture_output=True,
            text=True,
        )

    def init(self):
        self.run(
            f"{BIN}/initdb", "-D", self.data, "-U", "postgres", "--auth=trust",
            "-E", "UTF8", "--locale=C.UTF-8", "--no-sync",
        )
        self.write_conf()
        return self

    def write_conf(self):
        lines = "".join(f"{k} = {v}\n" for k, v in self.conf.items())
        conf = os.path.join(self.data, "postgresql.auto.conf")
        subprocess.run(
            _as_server_user(["tee", conf]), input=lines, text=True,
            check=True, capture_output=True,
        )

    def set_conf(self, **kv):
        """Changes postgresql.auto.conf; takes effect on reload or restart."""
        self.conf.update({k: str(v) for k, v in kv.items()})
        self.write_conf()

    def start(self, env=None, wrap=()):
        """`env`: extra environment for the server (e.g. SSL_CERT_FILE);
        `wrap`: a command the server is started under (e.g. unshare)."""
        r = subprocess.run(
            list(wrap) + _as_server_user(
                [f"{BIN}/pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "60", "start"]),
            capture_output=True, text=True, env={**os.environ, **(env or {})},
        )
        if r.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {r.stdout}{r.stderr}\n{self.tail_log()}")
        return self

    def stop(self, mode="fast"):
        return self.run(f"{BIN}/pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "60", "stop", check=False)

    def reload(self):
        self.run(f"{BIN}/pg_ctl", "-D", self.data, "reload")

    def tail_log(self, n=40):
        try:
            with open(self.log) as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def dsn(self, dbname="postgres", user="postgres"):
        return f"host={self.sock} port={self.port} dbname={dbname} user={user}"

    def connect(self, dbname="postgres", user="postgres", autocommit=True):
        return psycopg.connect(self.dsn(dbname, user), autocommit=autocommit)

    def create_db(self, name):
        with self.connect() as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            c.execute(f'CREATE DATABASE "{name}"')

    def destroy(self):
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def wait_until(pred, timeout=10.0, every=0.02):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(every)
    return pred()
