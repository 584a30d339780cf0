"""The example store: SQLite in WAL mode, one row per example id, durable before anything is acked.

``seq`` numbers examples in commit order (strictly increasing, with gaps
where a duplicate was ignored); the learner reads forward from its high-water
mark. A redelivered duplicate (same ``example_id``) is ignored, so
an example is stored exactly once however often the broker sends it.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from daemon.wire import Example, Rejection

SCHEMA_VERSION = 1

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
"""


@dataclass(frozen=True, slots=True)
class CommitResult:
    stored: int  # new rows
    duplicates: int  # ids already present (redeliveries, resends)
    rejected: int


class StoreError(Exception):
    """The store cannot be opened or written; the message says what to check."""


class Store:
    """One writer (the intake thread); readers open their own connections with :meth:`open_reader`.

    >>> import tempfile, pathlib
    >>> s = Store(pathlib.Path(tempfile.mkdtemp()) / "examples.db")
    >>> s.stats()["total"]
    0
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
            raise StoreError(f"{self.path}: cannot open the example store: {err} (is it a Sprout state directory?)") from None
        except OSError as err:
            raise StoreError(f"{self.path.parent}: cannot create the state directory: {err.strerror}") from None
        if version != SCHEMA_VERSION:
            raise StoreError(f"{self.path}: store schema {version}, this Sprout reads {SCHEMA_VERSION}: upgrade Sprout")
        self._lock = threading.Lock()

    def commit(self, examples: Iterable[Example], rejections: Iterable[Rejection] = ()) -> CommitResult:
        """Write examples and rejection counts in one transaction; returns once it is on disk (fsynced)."""
        rows = [
            (e.example_id, e.label, e.split, e.content_type, e.width, e.height, e.received_at, e.image) for e in examples
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
        return CommitResult(stored=stored, duplicates=len(rows) - stored, rejected=sum(reasons.values()))

    def stats(self) -> dict[str, object]:
        return stats(self._db)

    def high_water_mark(self) -> int:
        return self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM examples").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def open_reader(path: Path) -> sqlite3.Connection:
    """A read-only connection for another thread or process (stats, the learner)."""
    if not Path(path).exists():
        raise StoreError(f"{path}: no example store here (check --state / state_dir)")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0, check_same_thread=False)
    db.execute("PRAGMA busy_timeout = 30000")
    return db


def stats(db: sqlite3.Connection) -> dict[str, object]:
    """Totals as JSON-ready data: examples, per label, per split, rejected by reason."""
    per_label: dict[str, int] = {}
    per_split: dict[str, int] = {"train": 0, "holdout": 0}
    total = 0
    for label, split, count in db.execute("SELECT label, split, COUNT(*) FROM examples GROUP BY label, split"):
        per_label[label] = per_label.get(label, 0) + count
        per_split[split] += count
        total += count
    rejected = dict(db.execute("SELECT reason, count FROM rejections ORDER BY reason").fetchall())
    return {
        "total": total,
        "per_label": dict(sorted(per_label.items())),
        "per_split": per_split,
        "rejected": rejected,
        "rejected_total": sum(rejected.values()),
    }


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


@dataclass(frozen=True, slots=True)
class StoredExample:
    seq: int
    label: str
    split: str
    image: bytes


class StoreReader:
    """The learner's read-only view of the store, on its own connection (WAL lets it read while intake writes)."""

    def __init__(self, path: Path):
        self._db = open_reader(path)

    def after(self, seq: int, limit: int) -> list[StoredExample]:
        """The next examples in commit order, both splits."""
        rows = self._db.execute(
            "SELECT seq, label, split, image FROM examples WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit)
        ).fetchall()
        return [StoredExample(*row) for row in rows]

    def by_seq(self, seqs: list[int]) -> list[StoredExample]:
        """Examples by seq, in the order asked (replay, holdout)."""
        if not seqs:
            return []
        found: dict[int, StoredExample] = {}
        for start in range(0, len(seqs), 500):  # SQLite's bound-parameter limit
            chunk = seqs[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self._db.execute(f"SELECT seq, label, split, image FROM examples WHERE seq IN ({marks})", chunk):
                found[row[0]] = StoredExample(*row)
        return [found[s] for s in seqs if s in found]

    def labels_up_to(self, seq: int, split: str) -> list[tuple[int, str]]:
        """(seq, label) of every example of a split up to seq: the index replay and holdout sample from."""
        return self._db.execute(
            "SELECT seq, label FROM examples WHERE split = ? AND seq <= ? ORDER BY seq", (split, seq)
        ).fetchall()

    def high_water_mark(self) -> int:
        return self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM examples").fetchone()[0]

    def close(self) -> None:
        self._db.close()
