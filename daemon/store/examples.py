"""The example store: SQLite in WAL mode, one row per example id, durable before anything is acked.

``seq`` numbers examples in commit order (strictly increasing, with gaps
where a duplicate was ignored); the learner reads forward from its high-water
mark. A redelivered duplicate (same ``example_id``) is ignored, so
an example is stored exactly once however often the broker sends it.

Retention (:meth:`Store.prune`): past ``store.max_mb`` of used pages, the
oldest ``train`` examples are deleted, down to ``PRUNE_TO`` of the limit so
that pruning runs in chunks rather than after every commit; holdout examples
go first only where they exceed ``HOLDOUT_SHARE`` of it, otherwise only when
no train example is left. Freed pages are reused by later
commits, so the file stops growing near the limit (no VACUUM: it would
rewrite the whole file and needs as much free space again). A pruned id is
forgotten: should its sender publish it again, it is stored as a new example.

Totals (:meth:`Store.totals`: examples stored, messages rejected) are the
store's, whoever wrote them and whenever: kept up to date by this writer's own
commits and prunes, and counted again at most every ``RECOUNT_S`` for what
another writer (``sprout store import``) added.

Label changes (``sprout labels``, :mod:`daemon.store.labels`) are rows of
``label_changes``; examples keep the label they were sent with, and every
reader returns it resolved through the changes (daemon/store/reader.py).
The table came after schema 1 without changing it: the writer creates it
where missing, and a reader finding none reads a store with no change.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from daemon.store.errors import StateDirError
from daemon.store.labels import Action, LabelChange, LabelMap
from daemon.store.reader import read_label_changes, stats
from daemon.store.records import Example, Rejection

SCHEMA_VERSION = 1
# Pruning goes down to this share of store.max_mb: one prune frees room for many commits.
PRUNE_TO = 0.9
# Most of the pruned store that holdout examples may keep; beyond it their oldest go first.
HOLDOUT_SHARE = 0.25
# How stale the totals may be about another process's writes; a count reads the whole (label, split) index.
RECOUNT_S = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS examples (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    example_id   TEXT    NOT NULL UNIQUE,
    label        TEXT    NOT NULL,
    split        TEXT    NOT NULL CHECK (split IN ('train', 'holdout')),
    content_type TEXT    NOT NULL,
    width        INTEGER NOT NULL,
    height       INTEGER NOT NULL,
    received_at  REAL    NOT NULL,
    image        BLOB    NOT NULL
);
CREATE INDEX IF NOT EXISTS examples_label_split ON examples (label, split);
CREATE TABLE IF NOT EXISTS rejections (
    reason TEXT PRIMARY KEY,
    count  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS label_changes (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    at         REAL    NOT NULL,
    action     TEXT    NOT NULL CHECK (action IN ('rename', 'merge', 'delete')),
    label      TEXT    NOT NULL,
    into_label TEXT
);
"""


@dataclass(frozen=True, slots=True)
class CommitResult:
    stored: int  # new rows
    duplicates: int  # ids already present (redeliveries, resends)
    rejected: int


@dataclass(frozen=True, slots=True)
class StoreTotals:
    examples: int  # stored now: every writer's, less what retention deleted
    rejected: int  # messages rejected, ever


class Store:
    """One writer (the intake thread); readers open their own connections with :meth:`open_reader`.

    >>> import tempfile, pathlib
    >>> s = Store(pathlib.Path(tempfile.mkdtemp()) / "examples.db")
    >>> s.stats()["total"]
    0
    >>> s.totals()
    StoreTotals(examples=0, rejected=0)
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = _connect(self.path)
            with self._db:
                self._db.executescript(_SCHEMA)
                self._db.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
                )
            version = int(self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])
        except sqlite3.DatabaseError as err:
            raise StateDirError(
                f"{self.path}: cannot open the example store: {err} (is it a Sprout state directory?)"
            ) from None
        except OSError as err:
            raise StateDirError(f"{self.path.parent}: cannot create the state directory: {err.strerror}") from None
        if version != SCHEMA_VERSION:
            raise StateDirError(
                f"{self.path}: store schema {version}, this Sprout reads {SCHEMA_VERSION}: upgrade Sprout"
            )
        self._lock = threading.Lock()
        self.pruned = 0  # examples deleted by retention since this process opened the store
        self.used = self.used_bytes()  # as of the last commit's prune: what the metrics show
        self._closed = False
        self._counted_at = -RECOUNT_S
        self._totals = self._count()

    def totals(self) -> StoreTotals:
        """Examples stored and messages rejected in this store, cheap enough for every status read.

        Never waits for the writer: a commit's fsync or a prune may hold the lock for seconds on a slow disk,
        and the main loop reads this every few seconds. While the lock is taken, the totals as of the last
        commit are the answer (that commit updates them itself).
        """
        if time.monotonic() - self._counted_at >= RECOUNT_S and self._lock.acquire(blocking=False):
            try:
                if not self._closed:
                    self._totals = self._count()
            finally:
                self._lock.release()
        return self._totals

    def _count(self) -> StoreTotals:
        self._counted_at = time.monotonic()
        examples = self._db.execute("SELECT COUNT(*) FROM examples").fetchone()[0]
        rejected = self._db.execute("SELECT COALESCE(SUM(count), 0) FROM rejections").fetchone()[0]
        return StoreTotals(examples, rejected)

    def commit(self, examples: Iterable[Example], rejections: Iterable[Rejection] = ()) -> CommitResult:
        """Write examples and rejection counts in one transaction; returns once it is on disk (fsynced)."""
        rows = [
            (e.example_id, e.label, e.split, e.content_type, e.width, e.height, e.received_at, e.image)
            for e in examples
        ]
        reasons: dict[str, int] = {}
        for r in rejections:
            reasons[r.reason.value] = reasons.get(r.reason.value, 0) + 1
        with self._lock, self._db:
            before = self._db.total_changes
            self._db.executemany(
                "INSERT OR IGNORE INTO examples "
                "(example_id, label, split, content_type, width, height, received_at, image) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            stored = self._db.total_changes - before
            self._db.executemany(
                "INSERT INTO rejections (reason, count) VALUES (?, ?) "
                "ON CONFLICT (reason) DO UPDATE SET count = count + excluded.count",
                reasons.items(),
            )
            rejected = sum(reasons.values())
            self._totals = StoreTotals(self._totals.examples + stored, self._totals.rejected + rejected)
        return CommitResult(stored=stored, duplicates=len(rows) - stored, rejected=rejected)

    def stats(self) -> dict[str, object]:
        return stats(self._db)

    def change_label(
        self, action: Action, label: str, into: str | None, max_label_chars: int, outputs: Iterable[str] = ()
    ) -> LabelChange:
        """Record a label change (:mod:`daemon.store.labels`), or raise :class:`daemon.store.labels.LabelError` saying why not.

        ``outputs``: the learner's classes, which count as known even when retention has deleted all their
        examples. Checked and written in one write transaction, so two changes at once cannot both pass
        checks that only one of them would pass after the other.
        """
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                labels = LabelMap.replay(read_label_changes(self._db, 0))
                stored = {labels.name(row[0]) for row in self._db.execute("SELECT DISTINCT label FROM examples")}
                labels.check(action, label, into, stored | set(outputs), max_label_chars)
                at = time.time()
                cursor = self._db.execute(
                    "INSERT INTO label_changes (at, action, label, into_label) VALUES (?, ?, ?, ?)",
                    (at, action.value, label, into),
                )
                self._db.commit()
            except BaseException:
                self._db.rollback()
                raise
        return LabelChange(cast(int, cursor.lastrowid), at, action, label, into)  # an INSERT sets lastrowid

    def used_bytes(self) -> int:
        """Bytes of pages holding data (the file's size less its free pages, which commits reuse)."""
        pages = self._db.execute("PRAGMA page_count").fetchone()[0]
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        return (pages - free) * self._db.execute("PRAGMA page_size").fetchone()[0]

    def prune(self, max_bytes: int) -> int:
        """Past ``max_bytes``, delete the oldest examples down to ``PRUNE_TO`` of it; returns how many.

        Holdout first only beyond ``HOLDOUT_SHARE`` of the target, then train, oldest first; holdout
        again only when no train example is left. Each round deletes the oldest rows whose images add
        up to the excess, then measures the pages again: deleting rows frees whole pages only as
        SQLite merges the emptied ones.
        """
        deleted = 0
        with self._lock:
            used = self.used = self.used_bytes()
            if used <= max_bytes:
                return 0
            target = int(max_bytes * PRUNE_TO)
            # Without its own bound the holdout, never pruned while train examples remain, would fill
            # the store in the end; the gates and the learner only use its most recent examples anyway.
            holdout_bytes = self._db.execute(
                "SELECT COALESCE(SUM(length(image)), 0) FROM examples WHERE split = 'holdout'"
            ).fetchone()[0]
            if holdout_bytes > HOLDOUT_SHARE * target:
                deleted += self._delete_oldest("holdout", holdout_bytes - int(HOLDOUT_SHARE * target))
                used = self.used_bytes()
            while used > target:
                has_train = self._db.execute("SELECT 1 FROM examples WHERE split = 'train' LIMIT 1").fetchone()
                n = self._delete_oldest("train" if has_train else "holdout", used - target)
                if n == 0:
                    break  # nothing left to delete: the tables' own pages exceed the limit
                deleted += n
                used = self.used_bytes()
            self.pruned += deleted
            self.used = used
            self._totals = StoreTotals(self._totals.examples - deleted, self._totals.rejected)
        return deleted

    def _delete_oldest(self, split: str, nbytes: int) -> int:
        """Delete the oldest examples of a split whose images add up to ``nbytes`` (at least one)."""
        last, n = None, 0
        # length() of a BLOB reads the record header only, not the image.
        for seq, size in self._db.execute(
            "SELECT seq, length(image) FROM examples WHERE split = ? ORDER BY seq LIMIT 10000", (split,)
        ):
            last, n, nbytes = seq, n + 1, nbytes - size
            if nbytes <= 0:
                break
        if last is not None:
            with self._db:
                self._db.execute("DELETE FROM examples WHERE split = ? AND seq <= ?", (split, last))
        return n

    def high_water_mark(self) -> int:
        return self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM examples").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._closed = True  # the totals stay readable, as last counted
            self._db.close()


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=30.0, check_same_thread=False)
    # Images are tens of kB: 64 KiB pages keep most of one in a page instead of a chain of
    # 4 KiB overflow pages (measured: ~2x faster commits). Takes effect when the file is created.
    db.execute("PRAGMA page_size = 65536")
    db.execute("PRAGMA journal_mode = WAL")
    # FULL: every commit fsyncs the WAL, so an acked example survives power loss, not only a crash.
    db.execute("PRAGMA synchronous = FULL")
    db.execute("PRAGMA busy_timeout = 30000")
    return db
