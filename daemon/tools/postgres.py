"""A private PostgreSQL server: started by the tests, the benchmarks and ``sprout cluster-demo``.

Debian's ``postgresql`` binaries (``initdb``, ``postgres``) on a data folder of its own, listening on
a free loopback port with trust authentication and no Unix socket, so that it neither needs nor
touches the machine's own server. Run as root, the server runs as the ``postgres`` user, as
PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import time
from pathlib import Path

from daemon.tools.broker import end_process, free_port, reachable


class PostgresError(Exception):
    pass


def postgres_bindir() -> Path:
    """The folder of ``initdb`` and ``postgres``: on PATH, or Debian's newest /usr/lib/postgresql/<major>/bin."""
    if found := shutil.which("initdb"):
        return Path(found).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if not versions:
        raise PostgresError(
            "PostgreSQL is not installed: `make test` installs Debian's 'postgresql' package (scripts/test-tools.sh)"
        )
    return versions[-1].parent


class PrivatePostgres:
    """One server process; ``start`` again after ``stop`` reuses its port and data."""

    def __init__(self, workdir: Path, port: int | None = None):
        self.workdir = Path(workdir)
        self.data = self.workdir / "data"
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._bin = postgres_bindir()
        self._user = self._run_as()

    @staticmethod
    def _run_as() -> str | None:
        if os.geteuid() != 0:
            return None
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise PostgresError(
                "running as root needs a 'postgres' user to run the server as (Debian's package makes it)"
            ) from None
        return "postgres"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self, timeout_s: float = 30.0) -> PrivatePostgres:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._user is not None:
            shutil.chown(self.workdir, self._user)
        if not (self.data / "PG_VERSION").exists():
            self._initdb()
        log = open(self.workdir / "postgres.log", "ab")
        self.proc = subprocess.Popen(
            [
                str(self._bin / "postgres"),
                "-D", str(self.data),
                "-p", str(self.port),
                "-c", "listen_addresses=127.0.0.1",
                "-c", "unix_socket_directories=",
                "-c", "max_connections=200",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            user=self._user,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + timeout_s
        while not self._accepts():
            if self.proc.poll() is not None:
                raise PostgresError(f"postgres exited with {self.proc.returncode}: see {self.workdir / 'postgres.log'}")
            if time.monotonic() > deadline:
                self.kill()
                raise PostgresError(f"postgres did not accept connections on port {self.port} within {timeout_s}s")
            time.sleep(0.05)
        return self

    def _initdb(self) -> None:
        out = subprocess.run(
            [
                str(self._bin / "initdb"),
                "-D", str(self.data),
                "-U", "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",  # a scratch server: its files need not reach the disk before it starts
            ],
            capture_output=True,
            text=True,
            user=self._user,
        )  # fmt: skip
        if out.returncode != 0:
            raise PostgresError(f"initdb failed ({out.returncode}): {out.stderr.strip()}")

    def _accepts(self) -> bool:
        if not reachable("127.0.0.1", self.port, 0.2):
            return False
        import psycopg

        try:
            psycopg.connect(self.url(), connect_timeout=2).close()
        except psycopg.OperationalError:  # listening, still starting up
            return False
        return True

    def create_database(self, name: str) -> str:
        """A new, empty database; returns its URL."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def stop(self, sig: int = signal.SIGINT, timeout_s: float = 30.0) -> None:
        """SIGINT: PostgreSQL's fast shutdown (sessions ended, a checkpoint written); SIGKILL: a crash."""
        end_process(self.proc, sig, timeout_s)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def __enter__(self) -> PrivatePostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
