"""One connection to the example store's database, SQLite or PostgreSQL, behind the few calls the store makes.

The store's SQL is written once, in what both engines take (``INSERT ... ON CONFLICT``, ``RETURNING``,
``length()`` of a blob), with ``?`` placeholders that the PostgreSQL connection turns into psycopg's
``%s``. What differs lives here: how a write transaction is serialised with every other writer, how
the store's size is measured, how a read-only connection is made, and what a lost connection does.

Writes on PostgreSQL take one advisory lock for their transaction (:data:`WRITE_LOCK`). Without it two
intake processes committing at once could make seq 11 visible before seq 10, and a learner reading
``seq > 10`` after seeing 11 would never learn 10; under the lock, seqs become visible in their order,
as they do in SQLite, whose writer lock does the same.
"""

from __future__ import annotations

import abc
import functools
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from daemon.store.errors import StoreError, StoreUnavailable
from daemon.store.location import StoreLocation

if TYPE_CHECKING:
    import psycopg

Row = tuple[Any, ...]
T = TypeVar("T")

# PostgreSQL advisory locks are (int, int) pairs: this space, and one key per job.
LOCK_SPACE = 0x53707274  # "Sprt"
WRITE_LOCK = 1  # every write transaction on the examples, rejections and label changes
MIGRATION_LOCK = 2  # held while migrations are checked and applied (several nodes may start at once)
EXPORT_LOCK = 3  # held by the one exporter of a model for as long as it exports (daemon/export/election.py)


class Database(abc.ABC):
    dialect: ClassVar[str]

    def __init__(self, where: str):
        self.where = where  # for messages: the file, or the URL (which never holds the password)

    @abc.abstractmethod
    def query(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        """Every row of a query."""

    def one(self, sql: str, params: Sequence[object] = ()) -> Row | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def scalar(self, sql: str, params: Sequence[object] = ()) -> Any:
        row = self.one(sql, params)
        return None if row is None else row[0]

    @abc.abstractmethod
    def run(self, sql: str, params: Sequence[object] = ()) -> int:
        """Run one statement; returns the rows it changed."""

    @abc.abstractmethod
    def run_many(self, sql: str, rows: Iterable[Sequence[object]]) -> int:
        """Run one statement per row of parameters; returns the rows they changed in all."""

    @abc.abstractmethod
    @contextmanager
    def writing(self) -> Iterator[None]:
        """One write transaction, taken in turn with every other writer of the store; rolled back on error."""

    @abc.abstractmethod
    def apply(self, script: str) -> None:
        """Run a script of several statements as one write transaction (a migration)."""

    @abc.abstractmethod
    def has_table(self, name: str) -> bool: ...

    @abc.abstractmethod
    def used_bytes(self) -> int:
        """What ``store.max_mb`` bounds: SQLite's pages in use; PostgreSQL's stored image bytes; and the photos
        in the blob folder."""

    @abc.abstractmethod
    def close(self) -> None: ...


class SqliteDatabase(Database):
    dialect = "sqlite"

    def __init__(self, path: Path, read_only: bool = False):
        super().__init__(str(path))
        if read_only:
            if not Path(path).exists():
                raise StoreError(f"{path}: no example store here (check --state / state_dir)")
            db = sqlite3.connect(
                f"file:{path}?mode=ro", uri=True, timeout=30.0, check_same_thread=False, isolation_level=None
            )
        else:
            # isolation_level None: no implicit BEGIN; writing() opens each write transaction itself.
            db = sqlite3.connect(path, timeout=30.0, check_same_thread=False, isolation_level=None)
            # Images are tens of kB: 64 KiB pages keep most of one in a page instead of a chain of
            # 4 KiB overflow pages (measured: ~2x faster commits). Takes effect when the file is created.
            db.execute("PRAGMA page_size = 65536")
            db.execute("PRAGMA journal_mode = WAL")
            # FULL: every commit fsyncs the WAL, so an acked example survives power loss, not only a crash.
            db.execute("PRAGMA synchronous = FULL")
        db.execute("PRAGMA busy_timeout = 30000")
        self.connection = db

    def query(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        return self.connection.execute(sql, params).fetchall()

    def run(self, sql: str, params: Sequence[object] = ()) -> int:
        return self.connection.execute(sql, params).rowcount

    def run_many(self, sql: str, rows: Iterable[Sequence[object]]) -> int:
        return self.connection.executemany(sql, rows).rowcount  # summed over the rows by sqlite3

    @contextmanager
    def writing(self) -> Iterator[None]:
        self.connection.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self.connection.in_transaction:  # SQLite may have rolled back itself (a full disk)
                self.connection.execute("ROLLBACK")
            raise
        self.connection.execute("COMMIT")

    def apply(self, script: str) -> None:
        try:
            self.connection.executescript(f"BEGIN IMMEDIATE;\n{script}\nCOMMIT;")
        except BaseException:
            if self.connection.in_transaction:
                self.connection.execute("ROLLBACK")
            raise

    def has_table(self, name: str) -> bool:
        return self.one("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)) is not None

    def used_bytes(self) -> int:
        """Bytes of pages holding data (the file's size less its free pages, which commits reuse), and of the
        photos in the blob folder (store.blob_dir)."""
        pages = self.scalar("PRAGMA page_count")
        free = self.scalar("PRAGMA freelist_count")
        return int((pages - free) * self.scalar("PRAGMA page_size")) + int(self.scalar("SELECT bytes FROM blob_usage"))

    def close(self) -> None:
        self.connection.close()


@functools.lru_cache(maxsize=256)
def _placeholders(sql: str) -> str:
    """psycopg's ``%s`` for sqlite3's ``?`` (the store's SQL holds no other ``?`` nor ``%``)."""
    return sql.replace("?", "%s")


class PostgresDatabase(Database):
    """A psycopg connection in autocommit mode: every read sees what is committed now, and no reader
    holds a transaction open (which would keep PostgreSQL from reclaiming what retention deletes).

    A connection lost between two calls (the server restarted, a failover) is made again at the next
    call; a read that finds it lost is tried once more on a new one. A write that loses it fails:
    intake keeps its batch un-acked and commits it again (example ids make that safe).
    """

    dialect = "postgresql"

    def __init__(self, location: StoreLocation, read_only: bool = False, application_name: str = "sprout"):
        assert location.postgres_url is not None
        super().__init__(location.postgres_url)
        self._location = location
        self._read_only = read_only
        self._application_name = application_name
        self._in_transaction = False
        self._conn = self._connect()

    def _connect(self) -> psycopg.Connection[Row]:
        import psycopg  # here, not at the top: a SQLite store never loads it

        options: dict[str, Any] = {"autocommit": True, "application_name": self._application_name}
        if self._location.password_file is not None:
            try:
                options["password"] = self._location.password_file.read_text().splitlines()[0]
            except (OSError, IndexError) as err:
                raise StoreError(
                    f"store.password_file {self._location.password_file}: cannot read the database password "
                    f"from its first line: {getattr(err, 'strerror', None) or 'empty file'}"
                ) from None
        options.setdefault("connect_timeout", 10)
        try:
            conn = psycopg.connect(self.where, **options)
        except psycopg.OperationalError as err:
            why = " ".join(str(err).split())
            raise StoreUnavailable(
                f"{self.where}: cannot connect to the example store: {why} (check store.url, that the server "
                "is up, and that this user may log in: store.password_file, PGPASSWORD or ~/.pgpass)"
            ) from None
        if self._read_only:
            conn.execute("SET default_transaction_read_only = on")
        else:
            # Intake acks once commit() returns: the commit must be on the server's disk by then, whatever
            # the server's default (synchronous_commit = off would lose the last acked examples in a crash).
            conn.execute("SET synchronous_commit = on")
        return conn

    def _connection(self) -> psycopg.Connection[Row]:
        if self._conn.closed or self._conn.broken:
            self._conn = self._connect()
        return self._conn

    def _read(self, do: Callable[[psycopg.Connection[Row]], T]) -> T:
        import psycopg

        try:
            return do(self._connection())
        except psycopg.OperationalError:
            if self._in_transaction or not self._conn.broken:
                raise
            return do(self._connection())  # the server went away between two calls: once more, anew

    def query(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        # binary: images come back as their bytes, not as hex text twice their size.
        return self._read(lambda c: c.execute(_placeholders(sql), params, binary=True).fetchall())

    def run(self, sql: str, params: Sequence[object] = ()) -> int:
        return self._connection().execute(_placeholders(sql), params).rowcount

    def run_many(self, sql: str, rows: Iterable[Sequence[object]]) -> int:
        with self._connection().cursor() as cursor:
            cursor.executemany(_placeholders(sql), rows)  # pipelined: one round trip for the lot
            return cursor.rowcount  # summed over the statements by psycopg

    @contextmanager
    def writing(self) -> Iterator[None]:
        conn = self._connection()
        with conn.transaction():
            self._in_transaction = True
            try:
                conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_SPACE, WRITE_LOCK))
                yield
            finally:
                self._in_transaction = False

    def apply(self, script: str) -> None:
        with self.writing():
            self._conn.execute(script.encode())  # bytes: no placeholders, several statements

    @contextmanager
    def session_lock(self, key: int) -> Iterator[None]:
        """An advisory lock held by this connection until the block ends (waits for it)."""
        conn = self._connection()
        conn.execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_SPACE, key))
        try:
            yield
        finally:
            if not conn.broken:
                conn.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_SPACE, key))

    def try_session_lock(self, key: int, sub: int = 0) -> bool:
        """Take the advisory lock (key, sub) for this connection's session if it is free; never waits.

        Held until :meth:`close`, or until the session ends: the server releases it when the process dies
        or its connection is lost. On the connection as it is: one made again would not hold it.
        """
        import psycopg

        try:
            row = self._conn.execute(
                "SELECT pg_try_advisory_lock(%s, %s)", (LOCK_SPACE, (key << 16) | (sub & 0xFFFF))
            ).fetchone()
        except psycopg.OperationalError:
            return False
        return bool(row and row[0])

    def session_alive(self) -> bool:
        """The session (and so every session lock it took) still stands: one round trip, no reconnecting."""
        import psycopg

        if self._conn.closed or self._conn.broken:
            return False
        try:
            self._conn.execute("SELECT 1")
        except psycopg.OperationalError:
            return False
        return True

    def has_table(self, name: str) -> bool:
        return bool(self.scalar("SELECT to_regclass(?) IS NOT NULL", (name,)))

    def used_bytes(self) -> int:
        """The stored images' bytes, in rows or in the blob folder, kept by the examples table's triggers
        (daemon/store/schema.py).

        PostgreSQL's files are the wrong measure: rows deleted by retention leave their space in the
        files for later rows (autovacuum marks it free), so the files stop growing without shrinking.
        """
        return int(self.scalar("SELECT image_bytes FROM store_usage"))

    def close(self) -> None:
        self._conn.close()


def connect(location: StoreLocation, read_only: bool = False, application_name: str = "sprout") -> Database:
    """A connection to the store at ``location``: a writer's, or a reader's that cannot write."""
    if location.postgres_url is not None:
        return PostgresDatabase(location, read_only, application_name)
    assert location.sqlite_path is not None
    return SqliteDatabase(location.sqlite_path, read_only)
