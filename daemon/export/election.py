"""One exporter at a time: the exporter role's candidates, and the lease that elects one of them.

Any number of ``sprout run --role exporter`` processes may run for a model (on several hosts, for a spare
that takes over). Each is a candidate: it tries to take the model's export lease every
``RETRY_S``; the one that holds it exports and publishes (:class:`daemon.export.schedule.Exporting`, on the
checkpoint in the shared state folder), the others stand by, serving downloads and the notice. The lease
is held by a live process only, and the engine that grants it frees it when that process dies:

- on a PostgreSQL store, a session-level advisory lock on the store's database (``EXPORT_LOCK``, one per
  model): the server releases it when the holder's session ends, a crash or a lost connection included;
- on a SQLite store (one host, or a shared folder whose file system has working ``flock``: NFS v4), an
  exclusive ``flock`` on ``STATE/export.lock``: the kernel releases it when the holder exits.

The holder checks every ``CHECK_S`` that it still holds the lease (the PostgreSQL session answers); when it
does not, it kills the export in flight and exits (70): what it had not published is redone by the next
holder, and publishing is atomic, so a version is never half-written. What a lease cannot rule out is a
holder whose connection is cut while its publish runs: it stops within ``CHECK_S``, but the server may hand
the lease on sooner only if it noticed the lost session first (TCP keepalive, minutes by default).
"""

from __future__ import annotations

import abc
import fcntl
import logging
import os
import socket
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from daemon.common.lifecycle import left
from daemon.export.job import ExportJob
from daemon.export.schedule import Exporting
from daemon.store.database import EXPORT_LOCK, PostgresDatabase, connect
from daemon.store.location import StoreLocation

log = logging.getLogger("sprout.export")

RETRY_S = 2.0  # a candidate tries for the lease this often: how soon a spare takes over
CHECK_S = 1.0  # the holder checks it still holds it this often


class Lease(abc.ABC):
    """The right to export one model, held by at most one live process."""

    where: str  # what grants it, for the logs

    @abc.abstractmethod
    def try_acquire(self) -> bool:
        """Take it if free; never waits."""

    @abc.abstractmethod
    def held(self) -> bool:
        """Still ours (after :meth:`try_acquire` gave it)."""

    @abc.abstractmethod
    def release(self) -> None: ...


class FileLease(Lease):
    """An exclusive ``flock`` on a file: the kernel frees it when the process ends, however it ends."""

    def __init__(self, path: Path):
        self.path = path
        self.where = f"flock on {path}"
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)  # who holds it, for an operator who looks
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        return True

    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the lock
            self._fd = None


class PostgresLease(Lease):
    """A session-level advisory lock on the store's database: freed when the holder's session ends."""

    def __init__(self, location: StoreLocation, model: str):
        self.location, self.model = location, model
        self.where = f"advisory lock on {location.postgres_url}"
        self._db: PostgresDatabase | None = None

    def try_acquire(self) -> bool:
        if self._db is not None:
            return self.held()
        db = connect(self.location, application_name=f"sprout-{self.model}-exporter")
        assert isinstance(db, PostgresDatabase)
        if db.try_session_lock(EXPORT_LOCK, zlib.crc32(self.model.encode())):
            self._db = db
            return True
        db.close()
        return False

    def held(self) -> bool:
        return self._db is not None and self._db.session_alive()

    def release(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def lease_for(location: StoreLocation, state_dir: Path, model: str) -> Lease:
    if location.postgres_url is not None:
        return PostgresLease(location, model)
    return FileLease(state_dir / "export.lock")


class LeaseLost(Exception):
    """The exporter no longer holds the export lease."""


class ElectedExporting:
    """The exporter role's export part: a candidate until it takes the lease, then the model's exporter."""

    name = "election"

    def __init__(
        self,
        job: ExportJob,
        lease: Lease,
        learned: Callable[[], int],
        on_elected: Callable[[Exporting], None] = lambda exporting: None,
    ):
        self.job, self.lease, self.learned, self.on_elected = job, lease, learned, on_elected
        self.inner: Exporting | None = None  # made once elected: it repairs the registry as its one writer
        self.error: BaseException | None = None
        self._stop_requested = threading.Event()
        self._thread = threading.Thread(target=self.run, name="sprout-election", daemon=True)

    @property
    def elected(self) -> bool:
        return self.inner is not None

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive() and (self.inner is None or self.inner.alive())

    def stop(self, deadline: float) -> bool:
        self._stop_requested.set()
        done = self.inner.stop(deadline) if self.inner is not None else True
        if self._thread.ident is not None:
            self._thread.join(left(deadline))
        self.lease.release()
        return done and not self._thread.is_alive()

    def run(self) -> None:
        try:
            log.info("export candidate: trying for the lease (%s) every %.0fs", self.lease.where, RETRY_S)
            while not self._stop_requested.is_set():
                if self.lease.try_acquire():
                    break
                self._stop_requested.wait(RETRY_S)
            else:
                return
            log.info("elected: this process exports and publishes %s (%s)", self.job.model.name, self.lease.where)
            self.inner = Exporting(self.job, self.learned, lambda: None)  # the checkpoint on disk is the snapshot
            self.inner.start()
            self.on_elected(self.inner)
            while not self._stop_requested.wait(CHECK_S):
                if not self.lease.held():
                    raise LeaseLost(f"lost the export lease ({self.lease.where}): another candidate may take it")
        except BaseException as err:  # the daemon notices the dead thread and exits 70 for a restart
            self.error = err
            log.error("exporter: %s; killing the export in flight and exiting", err)
            if self.inner is not None:
                self.inner.stop(time.monotonic() + 5)
            self.lease.release()


class CheckpointProgress:
    """Examples learned as of the checkpoint in the state folder, re-read when the file changes."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._seen: tuple[int, int] | None = None
        self._learned = 0
        self.high_water_mark = 0  # the last example the checkpoint learned past

    def __call__(self) -> int:
        from daemon.learning import checkpoint  # torch: the exporter's process has it anyway

        path = self.folder / checkpoint.CHECKPOINT_NAME
        try:
            stat = path.stat()
        except OSError:
            return self._learned
        if (stat.st_mtime_ns, stat.st_size) != self._seen:
            try:
                saved = checkpoint.load(self.folder)
            except checkpoint.CheckpointError as err:
                log.warning("exporter: %s", err)
                return self._learned
            self._seen = (stat.st_mtime_ns, stat.st_size)
            self._learned = saved.trained if saved is not None else 0
            self.high_water_mark = saved.high_water_mark if saved is not None else 0
        return self._learned
