"""A throwaway PostgreSQL cluster for the tests: ``initdb`` + ``pg_ctl`` on a temp dir and a free
port (Debian's postgresql package; about a second to start). No system service is used or needed.

As root (CI containers), the cluster runs as the system user ``paletta-pg`` (created if missing),
since PostgreSQL refuses to run as root. Durability is off (fsync, full-page writes): the tests
restart and kill the server, never the machine.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

USER = "paletta-pg"


def bindir() -> Path | None:
    """The PostgreSQL server binaries (initdb, pg_ctl), or None when PostgreSQL is not installed."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(versions[-1]).parent if versions else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgCluster:
    """One cluster: ``url(name)`` for SQLAlchemy, ``new_database()`` for a fresh empty database."""

    def __init__(self, root: Path):
        bins = bindir()
        if bins is None:
            pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
        self.bin = bins
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        self._names = itertools.count()
        self._as: list[str] = []
        if os.geteuid() == 0:
            try:
                pwd.getpwnam(USER)
            except KeyError:
                subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
                               check=True)
            root.mkdir(parents=True, exist_ok=True)
            shutil.chown(root, USER)
            os.chmod(root, 0o700)
            self._as = ["runuser", "-u", USER, "--"]
        self._run("initdb", "-D", str(self.data), "-U", "paletta", "-A", "trust", "--no-sync", "-E", "UTF8")
        self.start()

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run([*self._as, str(self.bin / tool), *args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, cwd=self.root)
        if done.returncode:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")

    def start(self) -> None:
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root} "
                   "-c fsync=off -c full_page_writes=off -c synchronous_commit=off -c max_connections=300")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-o", options, "-w", "-t", "60",
                  "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self, down_s: float = 0.0) -> None:
        """Stop (dropping every connection), stay down ``down_s`` seconds, start again."""
        self.stop()
        time.sleep(down_s)
        self.start()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://paletta@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        import psycopg

        name = f"t{os.getpid()}_{next(self._names)}"
        with psycopg.connect(f"postgresql://paletta@127.0.0.1:{self.port}/postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)


@contextlib.contextmanager
def throwaway_cluster() -> Iterator[PgCluster]:
    """A cluster in a fresh temp dir (outside pytest's root-only tmp folders: the cluster's user
    must reach it), stopped and removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="paletta-pg-"))
    try:
        cluster = PgCluster(root)
        try:
            yield cluster
        finally:
            cluster.stop("immediate")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """The session's PostgreSQL cluster (started on first use); each test takes its own database."""
    with throwaway_cluster() as cluster:
        yield cluster


# The job store a test's servers use: ``@both_stores`` runs a test on SQLite and on PostgreSQL.
both_stores = pytest.mark.parametrize("database", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture
def database(request: pytest.FixtureRequest) -> str:
    """"" (SQLite in the data dir, the default) or a fresh PostgreSQL database's URL."""
    if getattr(request, "param", "sqlite") == "sqlite":
        return ""
    return request.getfixturevalue("pg_cluster").new_database()
